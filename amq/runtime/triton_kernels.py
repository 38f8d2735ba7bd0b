"""Triton kernels that multiply by tile-interleaved bit-plane weights (see `amq.runtime.layout`).

The kernels share one loading step. A program loads the W words of one tile of its rows once
(one coalesced load per plane); for each of the 32 / p shifts j it gets codes j * W .. j * W + W - 1,
a contiguous run inside one quantization group, so each run needs one scale and zero per row:

- `_gemv_kernel`: one activation row (batch-1 decoding), accumulating `w * x` in float32 registers,
  where the faster CUDA GEMV (`amq.runtime.cuda_gemv`) is not built or does not take the layer;
- `_gemm_kernel`: a few rows (batched decoding): each run is dequantized to the activation dtype and
  multiplied on the tensor cores (`tl.dot`, the weight as the first operand);
- `_gemm_paired_kernel`: the same for widths of at most 4 bits, but the codes go to the tensor cores
  undequantized (`_paired_codes`: two per integer operation with one plane, one field of the column's
  string at 3 bits), and the scale and zero point are applied once per group to the products' sums;
- `_dequant_kernel`: the whole weight into a transient bf16/fp16 tensor, for prefill, where cuBLAS on the
  dequantized weight wins (the weight is read once for thousands of tokens).

In the float32 kernels, codes become floats without an int-to-float conversion (a quarter-rate instruction that bounded the
first version): the code's bits are or-ed into the mantissa of 1.0, giving exactly 1 + code / 256,
so `(code - zero) * scale == f * (256 * scale) - (256 + zero) * scale`, one fused multiply-add per
weight. The float32 rounding of that form is below 1e-4 of a quantization step, far under bf16's.
Only `amq.runtime.linear` imports this module, and only on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from amq.runtime.cuda_gemv import gemv
from amq.runtime.cuda_mma import mma, preferred
from amq.runtime.layout import SPLIT_MAX, TILE_ROWS_MAX, plane_widths, runs_per_group


@triton.jit
def _field(w, shift: tl.constexpr, to: tl.constexpr, width: tl.constexpr):
    """Bits shift .. shift + width - 1 of the int32 words w, moved to bits to .. (constant shifts;
    the mask drops what an arithmetic right shift copies in)."""
    MASK: tl.constexpr = ((1 << width) - 1) << to
    if shift >= to:
        return (w >> (shift - to)) & MASK
    else:
        return (w << (to - shift)) & MASK


@triton.jit
def _run(words0, words1, j: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr):
    """float32 1 + code / 2**B (B = P0 + P1 bits) for run j of tile t: (BN, W0).

    The code goes to the top of the mantissa (bit 23 - B up), then or 0x3F800000 (float32 1.0);
    there the constant 2**B that `_affine` subtracts again is as small as it can be. Run j is bits
    B * j .. of its column's string (`amq.runtime.layout`): the wide word's 32 bits, then the narrow
    word's (`words1`, shifted to tile t's share by `_load_tile`). Most runs lie in one word, so they
    unpack with one shift and one mask, as a single-plane width does."""
    v = _code(words0, words1, j, P0 + P1, 23 - P0 - P1)
    return (v | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _code(words0, words1, j: tl.constexpr, B: tl.constexpr, to: tl.constexpr):
    """The B-bit code of run j, at bits to .. of int32 words: bits B * j .. of its column's string."""
    LO: tl.constexpr = j * B
    if LO + B <= 32:
        v = _field(words0, LO, to, B)
    elif LO >= 32:
        v = _field(words1, LO - 32, to, B)
    else:  # the run straddles the two words
        N0: tl.constexpr = 32 - LO
        v = _field(words0, LO, to, N0) | _field(words1, 0, to + N0, B - N0)
    return v


@triton.jit
def _paired_codes(words0, words1, j: tl.constexpr, HALF: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr):
    """bf16 128 + code of run j (BN, W) of a tile, exact for codes below 128 (0x4300 is bf16 128.0,
    whose mantissa's last bit is 1.0): no rounding of the weight.

    With one plane, runs j and j + HALF (HALF = 16 / P0) sit 16 bits apart in a word, so one shift,
    and, or makes both bf16 bit patterns at once: half the integer work per code of the float32
    form `_run` builds. With two (3 = 2 + 1), each run's code is one field of its column's string."""
    if P1 == 0:
        HI: tl.constexpr = j >= HALF
        SH: tl.constexpr = (j - HALF) * P0 if HI else j * P0
        v = ((words0 >> SH) & (((1 << P0) - 1) * 0x10001)) | 0x43004300
        if HI:
            v = v >> 16
    else:
        v = _code(words0, words1, j, P0 + P1, 0) | 0x4300
    return v.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _load_tile(p0, p1, offs_n, n_mask, t, K, cols, T: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, W0: tl.constexpr):
    """The W0 words per row of tile t in the wide plane, and of its span in the narrow one, shifted so
    that tile t's share of each column's string comes first."""
    words0 = tl.load(p0 + offs_n[:, None] * (K * P0 // 32) + t * W0 + cols[None, :], mask=n_mask[:, None], other=0)
    words1 = words0
    if P1 > 0:
        R: tl.constexpr = P0 // P1
        stride1 = ((K // T + R - 1) // R) * W0
        words1 = tl.load(p1 + offs_n[:, None] * stride1 + (t // R) * W0 + cols[None, :], mask=n_mask[:, None], other=0)
        words1 = words1 >> ((t % R) * (32 // P0) * P1)  # tile t is tile t % R of its span: its share, lowest first
    return words0, words1


@triton.jit
def _affine(s, z, offs_n, n_mask, g, groups, B: tl.constexpr):
    """Per row of group g: (2**B * scale, -(2**B + zero) * scale), so w = f * a + b."""
    sc = tl.load(s + offs_n * groups + g, mask=n_mask, other=0.0).to(tl.float32)
    ze = tl.load(z + offs_n * groups + g, mask=n_mask, other=0.0).to(tl.float32)
    return sc * (1 << B), -(ze + (1 << B)) * sc


@triton.jit
def _gemv_tile(
    acc,
    words0,
    words1,
    x,
    s,
    z,
    offs_n,
    m,
    t,
    K,
    cols,
    groups,
    G: tl.constexpr,
    T: tl.constexpr,
    P0: tl.constexpr,
    P1: tl.constexpr,
    W0: tl.constexpr,
    GPT: tl.constexpr,
    RPG: tl.constexpr,
):
    """Adds one tile's products: sum_k (f_k a + b) x_k = a sum_k f_k x_k + b sum_k x_k per group.

    Per weight that is one fused multiply-add on top of unpacking; the scale and the zero point
    are applied once per group, row and column of the run (`acc` (BN, W0) is reduced over its
    columns only at the end, so no cross-thread sum runs inside the loop)."""
    for gi in tl.static_range(GPT):
        a, b = _affine(s, z, offs_n, m, (t * T + gi * RPG * W0) // G, groups, P0 + P1)
        k0 = t * T + gi * RPG * W0
        xv = tl.load(x + k0 + cols, mask=(k0 + cols) < K, other=0.0).to(tl.float32)
        part = _run(words0, words1, gi * RPG, P0, P1) * xv[None, :]
        xs = xv
        for r in tl.static_range(1, RPG):
            xv = tl.load(x + k0 + r * W0 + cols, mask=(k0 + r * W0 + cols) < K, other=0.0).to(tl.float32)
            part += _run(words0, words1, gi * RPG + r, P0, P1) * xv[None, :]
            xs += xv
        acc += part * a[:, None] + b[:, None] * xs[None, :]
    return acc


def _gemv_configs() -> list[triton.Config]:
    # (BN, TPI, warps, stages[, SPLIT]). The 64- and 128-row blocks on 4 warps give each thread several rows of the
    # same columns, so one converted activation serves them all: 5-11% faster at 2 and 3 bits on one H200
    shapes = [
        (16, 1, 4, 3),
        (16, 2, 4, 2),
        (32, 2, 4, 2),
        (16, 4, 4, 1),
        (32, 4, 8, 1),
        (64, 2, 8, 2),
        (8, 4, 4, 2),
        (32, 1, 4, 3),
        (64, 1, 4, 3),
        (128, 1, 4, 2),
    ]
    splits = [(16, 2, 4, 2, 2), (16, 2, 4, 2, 4), (32, 2, 4, 2, 2), (32, 2, 4, 2, 4), (8, 2, 4, 2, 4), (16, 4, 4, 1, 2), (64, 2, 8, 2, 4)]
    splits += [(128, 1, 4, 2, 4), (128, 2, 8, 2, 4), (64, 1, 4, 3, 4), (64, 2, 4, 2, 4), (32, 4, 4, 1, 2)]
    return [triton.Config({"BN": bn, "TPI": tpi, "SPLIT": 1}, num_warps=w, num_stages=st) for bn, tpi, w, st in shapes] + [
        triton.Config({"BN": bn, "TPI": tpi, "SPLIT": sp}, num_warps=w, num_stages=st) for bn, tpi, w, st, sp in splits if sp <= SPLIT_MAX
    ]


@triton.autotune(configs=_gemv_configs(), key=["N", "K", "P0", "P1", "G", "T"])
@triton.jit
def _gemv_kernel(
    x,
    p0,
    p1,
    s,
    z,
    y,
    partial,
    count,
    N,
    K,
    G: tl.constexpr,
    T: tl.constexpr,
    P0: tl.constexpr,
    P1: tl.constexpr,
    W0: tl.constexpr,
    RUNS: tl.constexpr,
    GPT: tl.constexpr,
    RPG: tl.constexpr,
    BN: tl.constexpr,
    TPI: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Program (i, j) takes BN rows and the j-th of SPLIT slices of the tiles, TPI (1, 2 or 4) tiles
    per iteration with all their words loaded before any is used (bytes in flight).

    With SPLIT > 1, a layer with few rows (4096) still fills the GPU. Each slice writes its float32
    sums to `partial`; the last slice of a row block to finish (a counter per block, acquire/release)
    adds the slices in order, so the result does not depend on which finished first, writes y and
    sets the counter back to 0 for the next call (no memset: CUDA-graph friendly)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    cols = tl.arange(0, W0)
    groups = K // G
    tiles = K // T
    per = (tiles + SPLIT - 1) // SPLIT
    t_lo = pid_k * per
    t_hi = t_lo + per  # the last slice may run past the tiles: masked below
    acc = tl.zeros((BN, W0), dtype=tl.float32)
    for i in range(0, per, TPI):  # bounds free of program_id (the loop is the same for every program)
        t0 = t_lo + i
        ma = n_mask & (t0 < t_hi) & (t0 < tiles)
        a0, a1 = _load_tile(p0, p1, offs_n, ma, t0, K, cols, T, P0, P1, W0)
        if TPI >= 2:
            mb = n_mask & (t0 + 1 < t_hi) & (t0 + 1 < tiles)
            b0, b1 = _load_tile(p0, p1, offs_n, mb, t0 + 1, K, cols, T, P0, P1, W0)
        if TPI >= 4:
            mc = n_mask & (t0 + 2 < t_hi) & (t0 + 2 < tiles)
            md = n_mask & (t0 + 3 < t_hi) & (t0 + 3 < tiles)
            c0, c1 = _load_tile(p0, p1, offs_n, mc, t0 + 2, K, cols, T, P0, P1, W0)
            d0, d1 = _load_tile(p0, p1, offs_n, md, t0 + 3, K, cols, T, P0, P1, W0)
        acc = _gemv_tile(acc, a0, a1, x, s, z, offs_n, ma, t0, K, cols, groups, G, T, P0, P1, W0, GPT, RPG)
        if TPI >= 2:
            acc = _gemv_tile(acc, b0, b1, x, s, z, offs_n, mb, t0 + 1, K, cols, groups, G, T, P0, P1, W0, GPT, RPG)
        if TPI >= 4:
            acc = _gemv_tile(acc, c0, c1, x, s, z, offs_n, mc, t0 + 2, K, cols, groups, G, T, P0, P1, W0, GPT, RPG)
            acc = _gemv_tile(acc, d0, d1, x, s, z, offs_n, md, t0 + 3, K, cols, groups, G, T, P0, P1, W0, GPT, RPG)
    out = tl.sum(acc, axis=1)
    if SPLIT == 1:
        tl.store(y + offs_n, out.to(y.dtype.element_ty), mask=n_mask)
    else:
        tl.store(partial + pid_k * N + offs_n, out, mask=n_mask)
        done = tl.atomic_add(count + pid_n, 1, sem="acq_rel")
        if done == SPLIT - 1:
            total = tl.zeros((BN,), dtype=tl.float32)
            for sl in tl.static_range(SPLIT):
                total += tl.load(partial + sl * N + offs_n, mask=n_mask, other=0.0, cache_modifier=".cg")
            tl.store(y + offs_n, total.to(y.dtype.element_ty), mask=n_mask)
            tl.atomic_xchg(count + pid_n, 0)


def _gemm_configs() -> list[triton.Config]:
    # measured on one H200 (docs/benchmarks.md): 64 rows, 4 warps, 4 slices won most Llama-2-7B shapes at 16 rows;
    # 128 rows on 4 warps runs 3 bits 8% faster on 11008 x 4096 (a sweep of 54 shapes, "A profile of the decode kernels")
    shapes = [(64, 4, 2, 4), (64, 4, 3, 4), (64, 4, 2, 2), (32, 4, 2, 4), (128, 8, 2, 2), (64, 8, 2, 1), (16, 4, 2, 4), (32, 4, 2, 1), (128, 4, 2, 4)]
    return [triton.Config({"BN": bn, "SPLIT": sp}, num_warps=w, num_stages=st) for bn, w, st, sp in shapes if sp <= SPLIT_MAX]


@triton.autotune(configs=_gemm_configs(), key=["M", "N", "K", "P0", "P1", "G", "T"])
@triton.jit
def _gemm_kernel(
    x,
    p0,
    p1,
    s,
    z,
    y,
    partial,
    count,
    M,
    N,
    K,
    G: tl.constexpr,
    T: tl.constexpr,
    P0: tl.constexpr,
    P1: tl.constexpr,
    W0: tl.constexpr,
    RUNS: tl.constexpr,
    GPT: tl.constexpr,
    RPG: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """y.T (BN, BM) += W (BN, W0) @ x.T (W0, BM) per run: the dequantized weight is the dot's first
    operand, so it stays in registers (the compiler converts the loaded words to the operand layout
    once) instead of going through shared memory as a transposed second operand; and the K slices
    (SPLIT, as in `_gemv_kernel`) fill the GPU on layers of few rows."""
    pid_n, pid_k, offs_n, offs_m, n_mask, m_mask, cols, groups, tiles, per = _tile_block(M, N, K, G, T, W0, BM, BN, SPLIT)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for i in range(0, per):
        t = pid_k * per + i
        live = t < tiles  # the last slice may run past the tiles
        words0, words1 = _load_tile(p0, p1, offs_n, n_mask & live, t, K, cols, T, P0, P1, W0)
        for gi in tl.static_range(GPT):
            a, b = _affine(s, z, offs_n, n_mask & live, (t * T + gi * RPG * W0) // G, groups, P0 + P1)
            for r in tl.static_range(RPG):
                k = t * T + (gi * RPG + r) * W0
                f = _run(words0, words1, gi * RPG + r, P0, P1)
                xt = tl.load(x + offs_m[None, :] * K + k + cols[:, None], mask=m_mask[None, :] & live, other=0.0)
                acc += tl.dot((f * a[:, None] + b[:, None]).to(xt.dtype), xt)
    _store_rows(acc, y, partial, count, pid_n, pid_k, offs_m, offs_n, m_mask, n_mask, M, N, BM, BN, SPLIT)


@triton.jit
def _tile_block(M, N, K, G: tl.constexpr, T: tl.constexpr, W0: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr):
    """A tile-kernel program's rows, activation rows, columns of a run and its share of the tiles."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_m = tl.arange(0, BM)
    tiles = K // T
    per = (tiles + SPLIT - 1) // SPLIT
    return pid_n, pid_k, offs_n, offs_m, offs_n < N, offs_m < M, tl.arange(0, W0), K // G, tiles, per


@triton.jit
def _store_rows(acc, y, partial, count, pid_n, pid_k, offs_m, offs_n, m_mask, n_mask, M, N, BM: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr):
    """Writes y.T's block (BN, BM); with SPLIT > 1 the last slice of the row block adds the partial sums
    in order (see `_gemv_kernel`)."""
    at = offs_m[None, :] * N + offs_n[:, None]
    mask = m_mask[None, :] & n_mask[:, None]
    if SPLIT == 1:
        tl.store(y + at, acc.to(y.dtype.element_ty), mask=mask)
    else:
        tl.store(partial + pid_k * M * N + at, acc, mask=mask)
        done = tl.atomic_add(count + pid_n, 1, sem="acq_rel")
        if done == SPLIT - 1:
            total = tl.zeros((BN, BM), dtype=tl.float32)
            for sl in tl.static_range(SPLIT):
                total += tl.load(partial + sl * M * N + at, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(y + at, total.to(y.dtype.element_ty), mask=mask)
            tl.atomic_xchg(count + pid_n, 0)


def _paired_configs() -> list[triton.Config]:
    # (BN, warps, stages, SPLIT), measured on one H200 at 1 and 16 rows on the Llama-2-7B shapes; the two 64-row,
    # 3-stage shapes (the next tile's loads issued a step ahead) won a sweep of 36 shapes at 2 and 4 bits, 16 rows:
    # 7-17% less time than the former picks (docs/benchmarks.md, "Pipelined loads in the paired kernel")
    shapes = [
        (32, 4, 2, 1),
        (32, 4, 2, 2),
        (32, 4, 2, 4),
        (64, 4, 2, 1),
        (64, 4, 2, 2),
        (64, 4, 2, 4),
        (64, 4, 3, 2),
        (64, 4, 3, 4),
        (128, 4, 2, 1),
        (128, 4, 2, 2),
        (128, 8, 2, 2),
        (128, 8, 3, 4),
    ]
    return [triton.Config({"BN": bn, "SPLIT": sp}, num_warps=w, num_stages=st) for bn, w, st, sp in shapes if sp <= SPLIT_MAX]


@triton.autotune(configs=_paired_configs(), key=["M", "N", "K", "P0", "P1", "G", "T"])
@triton.jit
def _gemm_paired_kernel(
    x,
    p0,
    p1,
    s,
    z,
    y,
    partial,
    count,
    M,
    N,
    K,
    G: tl.constexpr,
    T: tl.constexpr,
    P0: tl.constexpr,
    P1: tl.constexpr,
    W0: tl.constexpr,
    RUNS: tl.constexpr,
    GPT: tl.constexpr,
    RPG: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """y.T (BN, BM) += W (BN, W0) @ x.T (W0, BM) as `_gemm_kernel` does, for P0 + P1 <= PAIRED_MAX_BITS.

    Per group, the tensor cores take the codes as bf16 128 + code (`_paired_codes`) and, in a second
    dot with ones, the activations' sums; then (code - zero) * scale summed over the group is
    scale * (sum (128 + code) x - (128 + zero) sum x), in float32, once per row and group. The float32
    cancellation of the 128 offset costs about 7 of float32's 24 bits, far below bf16's 8."""
    pid_n, pid_k, offs_n, offs_m, n_mask, m_mask, cols, groups, tiles, per = _tile_block(M, N, K, G, T, W0, BM, BN, SPLIT)
    ones = tl.full((BN, W0), 1.0, tl.bfloat16)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for i in range(0, per):
        t = pid_k * per + i
        live = t < tiles  # the last slice may run past the tiles
        words0, words1 = _load_tile(p0, p1, offs_n, n_mask & live, t, K, cols, T, P0, P1, W0)
        for gi in tl.static_range(GPT):
            g = (t * T + gi * RPG * W0) // G
            sc = tl.load(s + offs_n * groups + g, mask=n_mask & live, other=0.0).to(tl.float32)
            ze = tl.load(z + offs_n * groups + g, mask=n_mask & live, other=0.0).to(tl.float32)
            part = tl.zeros((BN, BM), dtype=tl.float32)
            xs = tl.zeros((BN, BM), dtype=tl.float32)
            for r in tl.static_range(RPG):
                k = t * T + (gi * RPG + r) * W0
                xt = tl.load(x + offs_m[None, :] * K + k + cols[:, None], mask=m_mask[None, :] & live, other=0.0)
                part = tl.dot(_paired_codes(words0, words1, gi * RPG + r, RUNS // 2, P0, P1), xt, part)
                xs = tl.dot(ones, xt, xs)
            acc += part * sc[:, None] - (sc * (ze + 128.0))[:, None] * xs
    _store_rows(acc, y, partial, count, pid_n, pid_k, offs_m, offs_n, m_mask, n_mask, M, N, BM, BN, SPLIT)


@triton.jit
def _dequant_kernel(
    p0,
    p1,
    s,
    z,
    w,
    N,
    K,
    G: tl.constexpr,
    T: tl.constexpr,
    P0: tl.constexpr,
    P1: tl.constexpr,
    W0: tl.constexpr,
    RUNS: tl.constexpr,
    GPT: tl.constexpr,
    RPG: tl.constexpr,
    BN: tl.constexpr,
):
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    t = tl.program_id(1)
    n_mask = offs_n < N
    cols = tl.arange(0, W0)
    groups = K // G
    words0, words1 = _load_tile(p0, p1, offs_n, n_mask, t, K, cols, T, P0, P1, W0)
    for gi in tl.static_range(GPT):
        a, b = _affine(s, z, offs_n, n_mask, (t * T + gi * RPG * W0) // G, groups, P0 + P1)
        for r in tl.static_range(RPG):
            k = t * T + (gi * RPG + r) * W0
            f = _run(words0, words1, gi * RPG + r, P0, P1)
            v = f * a[:, None] + b[:, None]
            tl.store(w + offs_n[:, None] * K + k + cols[None, :], v.to(w.dtype.element_ty), mask=n_mask[:, None])


# widths the paired tile kernel takes (bf16 activations): 1 to 4 bits (3 bits: 4-22% faster than `_gemm_kernel` at 16
# rows on one H100, docs/benchmarks.md); 8 bits (codes >= 128), 5 and 6 (not measured) and fp16 activations stay on it
PAIRED_MAX_BITS = 4


def _planes(planes: list[torch.Tensor], bits: int, tile: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """The two plane tensors (the first twice for a single plane) and the kernels' layout constants."""
    widths = plane_widths(bits)
    if len(widths) > 2:
        raise ValueError(f"bits={bits}: the kernels read at most two planes")
    p0, p1 = widths[0], widths[1] if len(widths) > 1 else 0
    w0, runs = tile * p0 // 32, 32 // p0
    rpg = runs_per_group(bits, tile, group_size)
    meta = {"T": tile, "P0": p0, "P1": p1, "W0": w0, "RUNS": runs, "GPT": runs // rpg, "RPG": rpg}
    return planes[0], planes[-1], meta


def product(
    x: torch.Tensor,
    planes: list[torch.Tensor],
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    tile: int,
    n: int,
    workspace: tuple[torch.Tensor, torch.Tensor],
    cuda_gemv: bool = True,
    cuda_mma: bool = True,
) -> torch.Tensor:
    """y (m, n) = x (m, k) @ W.T for 1 to TILE_ROWS_MAX rows (decoding): for one row the CUDA GEMV
    (`amq.runtime.cuda_gemv`, where it is built and takes the product; `cuda_gemv=False`: never)
    or the Triton one; for more, the CUDA tile kernel (`amq.runtime.cuda_mma`, at the widths and rows
    where it is the faster, where it is built and takes the product; `cuda_mma=False`: never) or the Triton one (it needs runs of >= 16 codes). `workspace`
    (`layout.split_workspace`) must not be used by two launches running at once (on different streams)."""
    m, k = x.shape
    if m > TILE_ROWS_MAX:
        raise ValueError(f"{m} rows: the decode kernels take at most {TILE_ROWS_MAX}")
    if m == 1 and cuda_gemv:
        y = gemv(x, planes, scale, zero, bits, group_size, tile, n)
        if y is not None:
            return y
    if cuda_mma and preferred(bits, m, n):
        y = mma(x, planes, scale, zero, bits, group_size, tile, n, workspace)
        if y is not None:
            return y
    p0, p1, meta = _planes(planes, bits, tile, group_size)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    partial, count = workspace
    if m == 1:
        _gemv_kernel[lambda c: (triton.cdiv(n, c["BN"]), c["SPLIT"])](x, p0, p1, scale, zero, y, partial, count, n, k, G=group_size, **meta)
    elif bits <= PAIRED_MAX_BITS and x.dtype == torch.bfloat16:
        bm = max(16, triton.next_power_of_2(m))
        _gemm_paired_kernel[lambda c: (triton.cdiv(n, c["BN"]), c["SPLIT"])](x, p0, p1, scale, zero, y, partial, count, m, n, k, G=group_size, BM=bm, **meta)
    else:
        bm = max(16, triton.next_power_of_2(m))
        _gemm_kernel[lambda c: (triton.cdiv(n, c["BN"]), c["SPLIT"])](x, p0, p1, scale, zero, y, partial, count, m, n, k, G=group_size, BM=bm, **meta)
    return y


def dequantize(
    planes: list[torch.Tensor], scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int, tile: int, n: int, k: int, dtype: torch.dtype
) -> torch.Tensor:
    """The weight (n, k) in `dtype`, for a cuBLAS matmul."""
    p0, p1, meta = _planes(planes, bits, tile, group_size)
    w = torch.empty((n, k), dtype=dtype, device=p0.device)
    _dequant_kernel[(triton.cdiv(n, 32), k // tile)](p0, p1, scale, zero, w, n, k, G=group_size, BN=32, num_warps=4, **meta)
    return w


# torch.compile sees the decode kernels as one opaque operator: it then neither traces nor
# re-autotunes each call site (150 s of compile for a 7B decode step, against 25 s this way), and
# the compiled step still launches them inside its CUDA graph. The split-K scratch is back to zero
# after every call, so to the outside the operator is pure (no mutated arguments declared).
@torch.library.custom_op("amq::planes_mm", mutates_args=())
def planes_mm(
    x: torch.Tensor,
    planes: list[torch.Tensor],
    scale: torch.Tensor,
    zero: torch.Tensor,
    partial: torch.Tensor,
    count: torch.Tensor,
    bits: int,
    group_size: int,
    tile: int,
    n: int,
) -> torch.Tensor:
    return product(x, planes, scale, zero, bits, group_size, tile, n, (partial, count))


@planes_mm.register_fake
def _planes_mm_shape(x, planes, scale, zero, partial, count, bits, group_size, tile, n):  # noqa: ANN001, ANN202
    return x.new_empty((x.shape[0], n))
