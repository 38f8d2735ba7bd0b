"""Bit-plane, tile-interleaved layout of packed codes: the form the Triton kernels read.

amq stores codes as one dense little-endian bit stream (`amq.quantizers.packed.pack_codes`): 8 codes
of b bits fill b bytes, so a 3-bit code can straddle two bytes. A GPU kernel wants every code at a
fixed place in a 32-bit word, and wants to unpack a loaded word without reshaping registers, so
`convert` rewrites each layer once:

- *planes*: the b bits are split into power-of-two widths (3 = 2 + 1, 4 = 4, 8 = 8); a plane of
  width p holds 32 / p codes per int32 word. The planes hold exactly b bits per weight, like the bit
  stream, so memory is unchanged.
- *tile interleaving*: the input features are cut into tiles of T (a power of two, 256 for Llama
  shapes). In a plane of width p a tile is W = T * p / 32 words, and code e of the tile sits in word
  e % W at bit p * (e // W). A kernel loads the W words of a tile once; shifting them all by p * j
  gives codes j * W .. j * W + W - 1, a contiguous run, which it multiplies by a contiguous run of
  activations. No gathers, no register reshapes.
"""

from __future__ import annotations

import torch

WORD_BITS = 32
MAX_TILE = 256
SPLIT_MAX = 4  # most K-slices the GEMV kernel cuts a product into (layers of few rows fill the GPU)


def plane_widths(bits: int) -> tuple[int, ...]:
    """The power-of-two widths, largest first, whose sum is `bits` (3 -> (2, 1), 6 -> (4, 2))."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits}: codes hold 1 to 8 bits")
    return tuple(p for p in (8, 4, 2, 1) if bits & p)


def tile_size(in_features: int, bits: int, group_size: int) -> int | None:
    """The largest power-of-two tile <= 256 that divides in_features, whose runs (T * p / 32 codes of
    the widest plane p) lie inside one group and are whole words for every plane; None if none."""
    widths = plane_widths(bits)
    t = MAX_TILE
    while t >= WORD_BITS:
        run = t * widths[0] // WORD_BITS
        if in_features % t == 0 and group_size % run == 0 and all(t * p % WORD_BITS == 0 for p in widths):
            return t
        t //= 2
    return None


def pack_planes(codes: torch.Tensor, bits: int, tile: int) -> list[torch.Tensor]:
    """int32 planes (out, in * p / 32) of uint8 codes (out, in); the lowest bits go to the first plane."""
    out_f, in_f = codes.shape
    if in_f % tile:
        raise ValueError(f"tile={tile} does not divide in_features={in_f}")
    c = codes.to(torch.int64).view(out_f, in_f // tile, tile)
    planes, offset = [], 0
    for p in plane_widths(bits):
        per_word, words = WORD_BITS // p, tile * p // WORD_BITS
        part = ((c >> offset) & ((1 << p) - 1)).view(out_f, in_f // tile, per_word, words)  # code e -> (e // W, e % W)
        shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64).view(1, 1, -1, 1) * p
        word = (part << shifts).sum(dim=2)  # < 2**32: fits int64, wraps to int32 below
        word = torch.where(word >= 2**31, word - 2**32, word)
        planes.append(word.to(torch.int32).reshape(out_f, -1).contiguous())
        offset += p
    return planes


def unpack_planes(planes: list[torch.Tensor], bits: int, in_features: int, tile: int) -> torch.Tensor:
    """Inverse of `pack_planes`: int32 codes (out, in); the CPU path and the tests use it."""
    codes: torch.Tensor | None = None
    offset = 0
    for plane, p in zip(planes, plane_widths(bits), strict=True):
        per_word, words = WORD_BITS // p, tile * p // WORD_BITS
        w = plane.view(plane.shape[0], in_features // tile, 1, words)
        shifts = torch.arange(per_word, device=plane.device, dtype=torch.int32).view(1, 1, -1, 1) * p
        part = ((w >> shifts) & ((1 << p) - 1)).reshape(plane.shape[0], in_features)
        codes = part << offset if codes is None else codes | (part << offset)
        offset += p
    assert codes is not None
    return codes


def gemv_workspace(out_features: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The split-K scratch of one layer's GEMV: SPLIT_MAX float32 partial sums per row and one
    counter per block of 8 rows (the smallest block the kernel uses). Both are zero between calls:
    the kernel resets what it used, so no memset runs per product."""
    blocks = -(-out_features // 8)
    return torch.zeros((SPLIT_MAX, out_features), dtype=torch.float32, device=device), torch.zeros(blocks, dtype=torch.int32, device=device)
