"""Bit-plane, tile-interleaved layout of packed codes: the form the Triton kernels read.

amq stores codes as one dense little-endian bit stream (`amq.quantizers.packed.pack_codes`): 8 codes
of b bits fill b bytes, so a 3-bit code can straddle two bytes. A GPU kernel wants every code at a
fixed place in a 32-bit word, and wants to unpack a loaded word without reshaping registers, so
`convert` rewrites each layer once:

- *planes*: the b bits are split into power-of-two widths (3 = 2 + 1, 4 = 4, 8 = 8); a plane of
  width p holds 32 / p codes per int32 word. The planes hold b bits per weight, like the bit stream
  (up to the narrow plane's padding below).
- *tile interleaving*: the input features are cut into tiles of T (a power of two, 256 for Llama
  shapes). In the widest plane (width p) a tile is W = T * p / 32 words, and code e of the tile sits
  in word e % W at bit p * (e // W). A kernel loads the W words of a tile once; shifting them all by
  p * j gives codes j * W .. j * W + W - 1, a contiguous run, which it multiplies by a contiguous run
  of activations. No gathers, no register reshapes.
- *spans of the narrow plane*: a narrower plane (width q < p, as the 1 of 3 = 2 + 1) also keeps W
  words per column block, one word per column, so run j of tile t finds its bits in the same column
  at a shift that is the same for the whole run: R = p / q consecutive tiles share a span of W
  words, and code e = j * W + c of tile t = R * u + h sits in word u * W + c at bit
  q * (h * 32 / p + j). The kernels thus unpack both planes with constant or uniform shifts and no
  duplicated loads. A row whose tile count is not a multiple of R pads its last span with zero bits
  (at most R - 1 tiles of q-bit codes per row). At 3 bits that costs nothing on 4096-wide rows,
  0.8% on 11008-wide ones (43 tiles of 256) and 3.7% on SmolLM2's 576-wide ones (9 tiles of 64).
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


def pack_planes(codes: torch.Tensor, bits: int, tile: int) -> list[torch.Tensor]:
    """int32 planes (out, spans * W) of uint8 codes (out, in); the lowest bits go to the first plane."""
    out_f, in_f = codes.shape
    if in_f % tile:
        raise ValueError(f"tile={tile} does not divide in_features={in_f}")
    widest, tiles = plane_widths(bits)[0], in_f // tile
    words = tile * widest // WORD_BITS  # W: words per tile in every plane
    planes, offset = [], 0
    for p, r in zip(plane_widths(bits), span_tiles(bits), strict=True):
        part = (codes.to(torch.int64) >> offset) & ((1 << p) - 1)
        spans = -(-tiles // r)
        part = torch.nn.functional.pad(part, (0, spans * r * tile - in_f))  # the last span's missing tiles: zero bits
        # code e = j * W + c of tile h of span u -> word u * W + c, bit p * (h * runs + j)
        part = part.view(out_f, spans, r * (WORD_BITS // widest), words)
        shifts = torch.arange(r * (WORD_BITS // widest), device=codes.device, dtype=torch.int64).view(1, 1, -1, 1) * p
        word = (part << shifts).sum(dim=2)  # < 2**32: fits int64, wraps to int32 below
        word = torch.where(word >= 2**31, word - 2**32, word)
        planes.append(word.to(torch.int32).reshape(out_f, -1).contiguous())
        offset += p
    return planes


def unpack_planes(planes: list[torch.Tensor], bits: int, in_features: int, tile: int) -> torch.Tensor:
    """Inverse of `pack_planes`: int32 codes (out, in); the CPU path and the tests use it."""
    widest = plane_widths(bits)[0]
    words = tile * widest // WORD_BITS
    codes: torch.Tensor | None = None
    offset = 0
    for plane, p, r in zip(planes, plane_widths(bits), span_tiles(bits), strict=True):
        per_word = WORD_BITS // p
        w = plane.view(plane.shape[0], -1, 1, words)
        shifts = torch.arange(per_word, device=plane.device, dtype=torch.int32).view(1, 1, -1, 1) * p
        part = ((w >> shifts) & ((1 << p) - 1)).reshape(plane.shape[0], -1)[:, :in_features]
        codes = part << offset if codes is None else codes | (part << offset)
        offset += p
    assert codes is not None
    return codes


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
