// Few-row product y (m, n) = x (m, k) @ W.T, 2 <= m <= 16 (batched decoding), on the tile-interleaved
// bit-plane layout (amq/runtime/layout.py), with the tensor cores' mma.sync (m16n8k16, bf16).
//
// Why CUDA and not the Triton tile kernel: at 16 rows the Triton kernel is bound by latency at low
// occupancy (docs/benchmarks.md, "A profile of the decode kernels"), and its 2- and 3-bit forms are
// slower than 4 bits although they read fewer bytes. Here each thread unpacks its own words straight
// into the registers of the mma's A operand, so no shared-memory shuffle runs per weight; only the
// activations go through shared memory, once per tile for the whole block.
//
// The trick that makes this fit the layout: a dot product does not care in which order its terms
// come, so the mma's k slots may hold any weights of the row, as long as the activations in the B
// operand are the matching ones. In a single-plane word, codes j and j + 16 / P0 sit 16 bits apart,
// at input features k and k + 128 of the tile (W = 256 * P0 / 32 words per tile: code j of word c is
// feature c + W * j). One shift and one and-or turn both into the bf16 pair (128 + code, 128 + code')
// at once, and the activations are staged as the matching pairs (x[k], x[k + 128]). At 3 bits the
// codes j and j + 8 of a column's 48-bit string are paired the same way, from two words that
// `column_words` assembles once per column.
//
// What keeps the main loop short (at 8-16 rows the kernel is bound by instruction issue; counted with
// scripts/count_tile_instructions.py: 501 / 576 / 504 instructions per K tile at 2 / 3 / 4 bits, 16
// rows, groups of 128, where the first version issued 652 / 797 / 663; timed in docs/benchmarks.md,
// "The CUDA tile kernel"):
// - Each pair's and-or is one lop3 (`and_or`): with the mask and the magic number both immediates,
//   nvcc emits an and and an or.
// - A tile's groups are counted on from the tile's first (no division per tile), and each row's
//   scales and zero points of a tile come in one load.
// - Each mma's two B registers come from one 64-bit shared-memory load. The activation pairs are
//   staged so that the two an mma takes, pairs kk and kk + W of the tile, sit side by side: pair p at
//   column (p % W) * S + p / W of its row, S = 128 / W + 2. The two spare words per run give the
//   lanes' columns strides of 8 banks (4 * tq * S = 40 tq or 24 tq words) and the row offsets
//   2 * (r & 3) spread the rows, so a half warp's 64-bit loads touch 32 different banks; the staging
//   stores have at most 4-way conflicts (2-way at 2 and 3 bits).
//
// Arithmetic: per group, the codes become bf16 weights in registers, w = (code - zr) * s + (zr - z) * s,
// zr = round(zero): 128 + code - (128 + zr) is exact, and (zr - z) * s is at most half a step, so the
// weight carries about one bf16 rounding, as the dequantize-and-cuBLAS prefill path's. The mma adds in
// float32. Split-K slices (blockIdx.y) write float32 partial sums; the last slice of a row block to
// finish (a counter per block) adds them in slice order, so the result does not depend on which slice
// finished first, and sets the counter back to 0 (no memset per call: CUDA-graph safe).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int TILE = 256;              // input features per tile: the layout's tile for every width here
constexpr int PAIRS = TILE / 2;        // activation pairs (k, k + 128) per tile and activation row
constexpr int WARPS = 4;
constexpr int BLOCK_ROWS = 16 * WARPS;  // weight rows per block (16 per warp: the mma's M)

// The staged activations of words of W per tile and row (W = 256 * P0 / 32): pair p of a row at
// column (p % W) * S + p / W, so pairs kk and kk + W (one mma's two B registers) are adjacent; rows
// XSTRIDE words apart (a multiple of 32 banks) plus 2 * (r & 3) (see the header).
template <int W>
struct Staging {
  static constexpr int S = PAIRS / W + 2;
  static constexpr int XSTRIDE = (W * S + 6 + 31) / 32 * 32;
  static __device__ __forceinline__ int row(int r) { return r * XSTRIDE + 2 * (r & 3); }
};

__device__ __forceinline__ __nv_bfloat162 as_bf2(uint32_t u) { return *reinterpret_cast<__nv_bfloat162*>(&u); }
__device__ __forceinline__ uint32_t as_u32(__nv_bfloat162 v) { return *reinterpret_cast<uint32_t*>(&v); }

// A column's words as the pairs below read them: a single-plane word as it is; at 3 bits the 48-bit
// string (w, w1) rearranged once into two words whose halves hold codes j and j + 8 side by side, so
// that each pair then costs one shift and one and-or, as at 2 and 4 bits (four operations before).
// lo: string bits 0..15 and 24..39 (pairs j <= 4); hi: string bits 15..30 and 39..54 (pairs 5..7).
template <int P0, int P1>
__device__ __forceinline__ uint2 column_words(uint32_t w, uint32_t w1) {
  if constexpr (P1 == 0) {
    return make_uint2(w, 0u);
  } else {
    const uint32_t h = __funnelshift_r(w, w1, 24);  // string bits 24..55: code j + 8 at bit 3j
    return make_uint2(__byte_perm(w, h, 0x5410), ((w >> 15) & 0xFFFFu) | ((h << 1) & 0xFFFF0000u));
  }
}

// (x & mask) | magic in one instruction: `magic` comes from a register the compiler cannot fold
// into an immediate (an and-or with two immediates takes two instructions).
template <uint32_t MASK>
__device__ __forceinline__ uint32_t and_or(uint32_t x, uint32_t magic) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(x), "n"(MASK), "r"(magic));
  return d;
}

// The bf16 pair (128 + code j, 128 + code j + 16 / P0) of a column's words (`column_words`); `magic`
// holds 0x43004300, the bf16 pair (128, 128).
template <int P0, int P1>
__device__ __forceinline__ uint32_t pair_codes(uint2 c, int j, uint32_t magic) {
  if constexpr (P1 == 0) {
    return and_or<((1u << P0) - 1u) * 0x10001u>(c.x >> (P0 * j), magic);
  } else {
    return and_or<0x00070007u>(j <= 4 ? c.x >> (3 * j) : c.y >> (3 * (j - 5)), magic);
  }
}

// Per row and group: bf16 scale, 128 + round(zero) and (round(zero) - zero) * scale.
struct Affine {
  __nv_bfloat16 s, m, f;
};

__device__ __forceinline__ Affine affine(__half sc, __half ze) {
  const float s = __half2float(sc), z = __half2float(ze);
  const float zr = fminf(fmaxf(rintf(z), -128.f), 127.f);  // 128 + zr stays an exact bf16 integer
  return {__float2bfloat16(s), __float2bfloat16(128.f + zr), __float2bfloat16((zr - z) * s)};
}

__device__ __forceinline__ uint32_t dequant(uint32_t v, const Affine& lo, const Affine& hi) {
  const __nv_bfloat162 d = __hsub2(as_bf2(v), __halves2bfloat162(lo.m, hi.m));  // code - zr, exact
  return as_u32(__hfma2(d, __halves2bfloat162(lo.s, hi.s), __halves2bfloat162(lo.f, hi.f)));
}

__device__ __forceinline__ void mma(float* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One tile's NG scales (or zero points) of a row, read as one load of 2 * NG bytes (the caller checks
// 16-byte aligned tensors; a row holds a multiple of NG groups).
template <int NG>
struct alignas(2 * NG) Halves {
  __half v[NG];
};

// What one tile needs, loaded a tile ahead: this lane's words of its two rows (16-byte loads), their
// scales and zero points, and this thread's share of the activations to stage.
template <int P0, int P1, int NG, int MT>
struct Tile {
  static constexpr int NU = TILE * P0 / 32 / 16;  // 16-byte loads per lane and row (1 at 2-3 bits, 2 at 4)
  uint4 w[2][NU];
  uint4 n[2];
  Halves<NG> sc[2], ze[2];
  uint4 xl[MT], xh[MT];
};

// NG: quantization groups per tile (256 / group; 1 for groups of 256 or more). MT: 8-row slices of
// the activations (1: m <= 8, 2: m <= 16).
template <int P0, int P1, int NG, int MT>
__global__ void __launch_bounds__(32 * WARPS) mma_planes_kernel(
    const __nv_bfloat16* __restrict__ x,
    const int32_t* __restrict__ p0,
    const int32_t* __restrict__ p1,
    const __half* __restrict__ scale,
    const __half* __restrict__ zero,
    __nv_bfloat16* __restrict__ y,
    float* __restrict__ partial,
    int* __restrict__ count,
    int m,
    int n,
    int k,
    int group,
    int split) {
  constexpr int W = TILE * P0 / 32;  // wide words per tile and row
  constexpr int HALF = 16 / P0;      // pairs per word (codes j and j + HALF); 8 at 3 bits
  using T = Tile<P0, P1, NG, MT>;
  constexpr int NU = T::NU;
  using X = Staging<W>;
  __shared__ __align__(16) uint32_t xs[2][MT * 8 * X::XSTRIDE];

  const int lane = threadIdx.x % 32;
  const int g = lane / 4, tq = lane % 4;
  const int tiles = k / TILE;
  const int per = (tiles + split - 1) / split;
  const int t_lo = blockIdx.y * per;
  const int t_hi = min(tiles, t_lo + per);
  int rows[2];
  rows[0] = blockIdx.x * BLOCK_ROWS + (threadIdx.x / 32) * 16 + g;  // the mma's rows g and g + 8
  rows[1] = rows[0] + 8;
  const size_t stride0 = (size_t)k / 32 * P0;
  const size_t stride1 = (size_t)((tiles + 1) / 2) * W;  // the narrow plane: spans of two tiles
  const int groups = k / group;

  auto load = [&](T& tl, int t) {
    // the tile's groups: NG from group t * NG on, or for groups of whole tiles the one holding tile t
    const int gi = NG > 1 ? t : t * TILE / group;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const bool ok = rows[r] < n;
      const size_t row = ok ? rows[r] : 0;
#pragma unroll
      for (int u = 0; u < NU; ++u) {
        tl.w[r][u] = ok ? __ldg(reinterpret_cast<const uint4*>(p0 + row * stride0 + (size_t)t * W + u * 16 + 4 * tq)) : make_uint4(0, 0, 0, 0);
      }
      if constexpr (P1 > 0) {
        tl.n[r] = ok ? __ldg(reinterpret_cast<const uint4*>(p1 + row * stride1 + (size_t)(t / 2) * W + 4 * tq)) : make_uint4(0, 0, 0, 0);
      }
      tl.sc[r] = ok ? reinterpret_cast<const Halves<NG>*>(scale + row * groups)[gi] : Halves<NG>{};
      tl.ze[r] = ok ? reinterpret_cast<const Halves<NG>*>(zero + row * groups)[gi] : Halves<NG>{};
    }
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      const int c = threadIdx.x + i * 32 * WARPS;  // chunk: activation row c / 16, pairs 8 * (c % 16) ..
      const int r = c >> 4, kc = (c & 15) * 8;
      if (r < m) {
        const __nv_bfloat16* src = x + (size_t)r * k + (size_t)t * TILE + kc;
        tl.xl[i] = __ldg(reinterpret_cast<const uint4*>(src));
        tl.xh[i] = __ldg(reinterpret_cast<const uint4*>(src + PAIRS));
      } else {
        tl.xl[i] = tl.xh[i] = make_uint4(0, 0, 0, 0);
      }
    }
  };

  auto stage = [&](const T& tl, uint32_t* dst) {
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      const int c = threadIdx.x + i * 32 * WARPS;
      const int kc = (c & 15) * 8;  // pairs kc .. kc + 7: one run of W, consecutive in it
      uint32_t* d = dst + X::row(c >> 4) + (kc % W) * X::S + kc / W;
      const uint32_t l[4] = {tl.xl[i].x, tl.xl[i].y, tl.xl[i].z, tl.xl[i].w};
      const uint32_t h[4] = {tl.xh[i].x, tl.xh[i].y, tl.xh[i].z, tl.xh[i].w};
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        d[2 * q * X::S] = __byte_perm(l[q], h[q], 0x5410);        // (x[k], x[k + 128]) of the even k
        d[(2 * q + 1) * X::S] = __byte_perm(l[q], h[q], 0x7632);  // and of the odd one
      }
    }
  };

  float acc[MT][4];
  uint32_t magic;
  asm volatile("mov.b32 %0, 0x43004300;" : "=r"(magic));  // opaque to the compiler: see and_or
#pragma unroll
  for (int i = 0; i < MT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

  T cur, nxt;
  if (t_lo < t_hi) load(cur, t_lo);
  int buf = 0;
  for (int t = t_lo; t < t_hi; ++t) {
    stage(cur, xs[buf]);
    __syncthreads();  // the double buffer: the other half was last read before this barrier
    if (t + 1 < t_hi) load(nxt, t + 1);  // in flight while this tile is multiplied
    Affine af[2][NG];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
#pragma unroll
      for (int i = 0; i < NG; ++i) af[r][i] = affine(cur.sc[r].v[i], cur.ze[r].v[i]);
    }
    const uint32_t* xb = xs[buf];
    const int nshift = (t & 1) * 16;  // tile t's half of its span's narrow words
#pragma unroll
    for (int u = 0; u < NU; ++u) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        uint32_t na = 0, nb = 0;
        if constexpr (P1 > 0) {
          na = (&cur.n[0].x)[e] >> nshift;
          nb = (&cur.n[1].x)[e] >> nshift;
        }
        const uint2 wa = column_words<P0, P1>((&cur.w[0][u].x)[e], na), wb = column_words<P0, P1>((&cur.w[1][u].x)[e], nb);
#pragma unroll
        for (int j = 0; j < HALF; j += 2) {  // k slots 2tq (+1): pair j; slots 2tq + 8 (+9): pair j + 1
          constexpr int GH = NG >= 2 ? NG / 2 : 0;
          const int lo0 = W * j * NG / TILE, lo1 = W * (j + 1) * NG / TILE;
          const uint32_t a0 = dequant(pair_codes<P0, P1>(wa, j, magic), af[0][lo0], af[0][lo0 + GH]);
          const uint32_t a1 = dequant(pair_codes<P0, P1>(wb, j, magic), af[1][lo0], af[1][lo0 + GH]);
          const uint32_t a2 = dequant(pair_codes<P0, P1>(wa, j + 1, magic), af[0][lo1], af[0][lo1 + GH]);
          const uint32_t a3 = dequant(pair_codes<P0, P1>(wb, j + 1, magic), af[1][lo1], af[1][lo1 + GH]);
          const int col = (u * 16 + 4 * tq + e) * X::S + j;  // pairs kk and kk + W, kk = u * 16 + 4tq + e + W * j
#pragma unroll
          for (int i = 0; i < MT; ++i) {
            const uint2 b = *reinterpret_cast<const uint2*>(xb + X::row(i * 8 + g) + col);
            mma(acc[i], a0, a1, a2, a3, b.x, b.y);
          }
        }
      }
    }
    cur = nxt;
    buf ^= 1;
  }

  // acc[i]: (row g, activation rows i * 8 + 2tq, + 1), then (row g + 8, the same two)
  auto each = [&](auto&& f) {
#pragma unroll
    for (int i = 0; i < MT; ++i) {
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const int r = i * 8 + 2 * tq + (v & 1), row = rows[v >> 1];
        if (r < m && row < n) f(acc[i][v], (size_t)r * n + row);
      }
    }
  };
  if (split == 1) {
    each([&](float a, size_t at) { y[at] = __float2bfloat16(a); });
    return;
  }
  float* mine = partial + (size_t)blockIdx.y * m * n;
  each([&](float a, size_t at) { mine[at] = a; });
  __threadfence();
  __syncthreads();
  __shared__ bool last;
  if (threadIdx.x == 0) last = atomicAdd(count + blockIdx.x, 1) == split - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  each([&](float, size_t at) {
    float total = 0.f;
    for (int sl = 0; sl < split; ++sl) total += __ldcg(partial + (size_t)sl * m * n + at);
    y[at] = __float2bfloat16(total);
  });
  if (threadIdx.x == 0) count[blockIdx.x] = 0;
}

struct Args {
  const __nv_bfloat16* x;
  const int32_t* p0;
  const int32_t* p1;
  const __half* scale;
  const __half* zero;
  __nv_bfloat16* y;
  float* partial;
  int* count;
  int m, n, k, group, split;
};

template <int P0, int P1, int NG, int MT>
void launch(const Args& a, cudaStream_t stream) {
  const dim3 grid((a.n + BLOCK_ROWS - 1) / BLOCK_ROWS, a.split);
  mma_planes_kernel<P0, P1, NG, MT><<<grid, 32 * WARPS, 0, stream>>>(a.x, a.p0, a.p1, a.scale, a.zero, a.y, a.partial, a.count, a.m, a.n, a.k, a.group, a.split);
}

template <int P0, int P1, int NG>
bool by_rows(const Args& a, cudaStream_t s) {
  if (a.m <= 8) {
    launch<P0, P1, NG, 1>(a, s);
  } else {
    launch<P0, P1, NG, 2>(a, s);
  }
  return true;
}

template <int P0, int P1>
bool by_groups(const Args& a, cudaStream_t s) {
  if (a.group % TILE == 0) return by_rows<P0, P1, 1>(a, s);
  switch (a.group) {
    case 128: return by_rows<P0, P1, 2>(a, s);
    case 64: return by_rows<P0, P1, 4>(a, s);
    case 32: return by_rows<P0, P1, 8>(a, s);
    default: return false;
  }
}

}  // namespace

// false: no kernel for these widths, tile, group or rows (the caller, cuda_mma.py, then uses the
// Triton tile kernel). The caller checks dtypes, contiguity and alignment.
bool amq_mma_planes(const void* x, const int32_t* p0, const int32_t* p1, const void* scale, const void* zero, void* y, float* partial, int* count,
                    int p0w, int p1w, int m, int n, int k, int tile, int group, int split, cudaStream_t stream) {
  if (tile != TILE || m < 1 || m > 16 || split < 1 || k % TILE != 0) return false;
  const Args a{static_cast<const __nv_bfloat16*>(x), p0, p1, static_cast<const __half*>(scale), static_cast<const __half*>(zero),
               static_cast<__nv_bfloat16*>(y), partial, count, m, n, k, group, split};
  if (p0w == 2 && p1w == 0) return by_groups<2, 0>(a, stream);
  if (p0w == 2 && p1w == 1) return by_groups<2, 1>(a, stream);
  if (p0w == 4 && p1w == 0) return by_groups<4, 0>(a, stream);
  return false;
}
