"""Bit-plane, tile-interleaved layout of packed codes: the form the Triton kernels read.

amq stores codes as one dense little-endian bit stream (`amq.quantizers.packed.pack_codes`): 8 codes
of b bits fill b bytes, so a 3-bit code can straddle two bytes. A GPU kernel wants every code at a
fixed place in a 32-bit word, and wants to unpack a loaded word without reshaping registers, so
`convert` rewrites each layer once:

- *planes*: b is split into power-of-two widths (3 = 2 + 1, 4 = 4, 8 = 8), one int32 tensor each;
  a plane of width p holds p bits per weight, so the planes hold b bits per weight, like the bit
  stream (up to the narrow plane's padding below). A single-plane width holds 32 / p codes per word.
- *tile interleaving*: the input features are cut into tiles of T (a power of two, 256 for Llama
  shapes). In the widest plane (width p) a tile is W = T * p / 32 words, and code e of the tile sits
  in word e % W at bit p * (e // W). A kernel loads the W words of a tile once; shifting them all by
  p * j gives codes j * W .. j * W + W - 1, a contiguous run, which it multiplies by a contiguous run
  of activations. No gathers, no register reshapes.
- *a column's codes as one bit string*: with two or more planes (3 = 2 + 1) the codes of column c
  of a tile, runs j = 0 .. 32 / p - 1 (p the widest plane), form one little-endian string of
  b * 32 / p bits, code j at bits b * j .. b * j + b - 1. The widest plane's word holds the first
  32 bits of it, and each narrower plane (width q) the next 32 * q / p. So most runs lie whole in
  one word and unpack as a single-plane width does, one shift and one mask (at 3 bits, 15 of 16
  runs; run 10 takes 2 bits from the wide word and 1 from the narrow one). Splitting each code
  into its planes' bits instead (the layout before this one) took two shifts and two masks per
  weight, and 3-bit products ran 9-16% slower (docs/benchmarks.md, "3-bit codes as one string").
- *spans of the narrow plane*: a narrower plane also keeps W words per column block, one word per
  column, so tile t's share of it lies in the same column: R = p / q consecutive tiles share a span
  of W words, and tile t = R * u + h's 32 * q / p bits of column c sit in word u * W + c from bit
  h * 32 * q / p. A kernel shifts the loaded narrow words once per tile and then unpacks with
  constant shifts, with no duplicated loads. A row whose tile count is not a multiple of R pads its
  last span with zero bits (at most R - 1 tiles of q-bit codes per row). At 3 bits that costs
  nothing on 4096-wide rows, 0.8% on 11008-wide ones (43 tiles of 256) and 3.7% on SmolLM2's
  576-wide ones (9 tiles of 64).
"""

from __future__ import annotations

import torch

WORD_BITS = 32
MAX_TILE = 256
SPLIT_MAX = 4  # most K-slices a kernel cuts a product into (layers of few rows fill the GPU)
TILE_ROWS_MAX = 16  # most activation rows of the tile kernel; more go through dequantize + cuBLAS


def plane_widths(bits: int) -> tuple[int, ...]:
    """The power-of-two widths, largest first, whose sum is `bits` (3 -> (2, 1), 6 -> (4, 2))."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits}: codes hold 1 to 8 bits")
    return tuple(p for p in (8, 4, 2, 1) if bits & p)


def tile_size(in_features: int, bits: int, group_size: int, max_tile: int = MAX_TILE) -> int | None:
    """The largest power-of-two tile <= `max_tile` (256: what the kernels are tuned for; larger ones
    only to measure, `scripts/bench_serving.py --micro-tiles`) that divides in_features, whose runs
    (T * p / 32 codes of the widest plane p) are whole words and lie inside one group; None if none."""
    if max_tile < WORD_BITS or max_tile & (max_tile - 1):
        raise ValueError(f"max_tile={max_tile}: a power of two >= {WORD_BITS}")
    widest = plane_widths(bits)[0]
    t = max_tile
    while t >= WORD_BITS:
        run = t * widest // WORD_BITS
        if in_features % t == 0 and group_size % run == 0:
            return t
        t //= 2
    return None


def runs_per_group(bits: int, tile: int, group_size: int) -> int:
    """How many of a tile's runs (32 / p of them, W = tile * p / 32 codes each, p the widest plane)
    share one quantization group; `tile_size` makes the group a whole number of runs."""
    widest = plane_widths(bits)[0]
    runs = WORD_BITS // widest
    return min(runs, group_size // (tile * widest // WORD_BITS))


def span_tiles(bits: int) -> tuple[int, ...]:
    """Per plane, how many tiles share one block of its words (1 for the widest, p / q for a q-bit plane)."""
    widths = plane_widths(bits)
    return tuple(widths[0] // p for p in widths)


def _columns(bits: int, tile: int) -> tuple[int, int]:
    """(runs, W): a tile's runs (32 / p, p the widest plane) and the words of each run's column block."""
    widest = plane_widths(bits)[0]
    return WORD_BITS // widest, tile * widest // WORD_BITS


def pack_planes(codes: torch.Tensor, bits: int, tile: int) -> list[torch.Tensor]:
    """int32 planes (out, spans * W) of uint8 codes (out, in), widest plane first."""
    out_f, in_f = codes.shape
    if in_f % tile:
        raise ValueError(f"tile={tile} does not divide in_features={in_f}")
    runs, words = _columns(bits, tile)
    tiles = in_f // tile
    # code e = j * W + c of tile t -> bits b * j .. of column c's string (at most 7 * 8 = 56 bits: int64)
    string = (codes.to(torch.int64).view(out_f, tiles, runs, words) << _steps(runs, bits, codes.device)).sum(dim=2)
    planes, offset = [], 0
    for p, r in zip(plane_widths(bits), span_tiles(bits), strict=True):
        share = runs * p  # bits of a column's string this plane holds per tile
        part = (string >> offset) & ((1 << share) - 1)
        spans = -(-tiles // r)
        part = torch.nn.functional.pad(part, (0, 0, 0, spans * r - tiles))  # the last span's missing tiles: zero bits
        word = (part.view(out_f, spans, r, words) << _steps(r, share, codes.device)).sum(dim=2)  # < 2**32
        word = torch.where(word >= 2**31, word - 2**32, word)
        planes.append(word.to(torch.int32).reshape(out_f, -1).contiguous())
        offset += share
    return planes


def unpack_planes(planes: list[torch.Tensor], bits: int, in_features: int, tile: int) -> torch.Tensor:
    """Inverse of `pack_planes`: int32 codes (out, in); the CPU path and the tests use it."""
    runs, words = _columns(bits, tile)
    tiles = in_features // tile
    rows = planes[0].shape[0]
    if len(planes) == 1:  # the string is the word: int32 is enough (and twice as fast on a CPU as int64)
        string = planes[0].view(rows, -1, words)[:, :tiles]
    else:
        string = torch.zeros((rows, tiles, words), dtype=torch.int64, device=planes[0].device)
        offset = 0
        for plane, p, r in zip(planes, plane_widths(bits), span_tiles(bits), strict=True):
            share = runs * p
            w = (plane.to(torch.int64) & 0xFFFFFFFF).view(rows, -1, 1, words)
            part = ((w >> _steps(r, share, plane.device)) & ((1 << share) - 1)).reshape(rows, -1, words)[:, :tiles]
            string |= part << offset
            offset += share
    codes = (string.unsqueeze(2) >> _steps(runs, bits, string.device, string.dtype)) & ((1 << bits) - 1)
    return codes.reshape(rows, in_features).to(torch.int32)


def _steps(n: int, width: int, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Shifts 0, width, .., (n - 1) * width along dim 2 of a (rows, blocks, n, W) tensor."""
    return (torch.arange(n, device=device, dtype=dtype) * width).view(1, 1, -1, 1)


def split_workspace(out_features: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The split-K scratch of the GEMV and the tile kernel for layers of up to `out_features` rows:
    SPLIT_MAX x TILE_ROWS_MAX float32 partial sums per row and one counter per block of 8 rows (the
    smallest block a kernel uses). Both are zero between calls (the kernels reset what they used), so
    no memset runs per product. Layers that run one after another on one stream can share one:
    `amq.runtime.convert` gives every layer of a model on a device the same."""
    blocks = -(-out_features // 8)
    return (
        torch.zeros(SPLIT_MAX * TILE_ROWS_MAX * out_features, dtype=torch.float32, device=device),
        torch.zeros(blocks, dtype=torch.int32, device=device),
    )
