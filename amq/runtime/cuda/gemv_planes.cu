// One-row product y = x @ W.T on the tile-interleaved bit-plane layout (amq/runtime/layout.py).
//
// Why CUDA and not Triton: batch-1 decoding reads every weight once, so the product should cost
// its bytes. The Triton GEMV executes 9-11 instructions per weight (docs/benchmarks.md, "A profile
// of the decode kernels"): each thread holds one row's words of many columns, so every activation
// is loaded, converted and summed once per row. Here a thread loads 4 consecutive words (one 16-byte
// load) for each of R rows, and each activation it loads serves all R rows: per weight that leaves
// one shift, one and-or (the code into the mantissa of 1.0) and one fused multiply-add.
//
// Layout (per row, wide plane of width P0): word c of tile t holds code j * W + c of the tile at
// bit P0 * j (W = T * P0 / 32 words per tile, RUNS = 32 / P0 runs). With a narrow plane (P1 = 1 of
// 3 = 2 + 1), column c's 16 codes form one 48-bit string, code j at bits 3 j: its first 32 bits are
// the wide word, the rest the half (t % 2) of narrow word (t / 2) * W + c (two tiles share one span
// of W narrow words). A run of W codes lies inside one quantization group.
//
// Arithmetic (as the Triton kernels): f = 1 + code / 2^B (B = P0 + P1) is built by or-ing the code
// into float32 1.0; per group, sum (code - zero) * scale * x = scale * (2^B * sum f x - (2^B + zero)
// * sum x). Per thread the affine step is applied to its own partial sums, so no cross-thread sum
// runs inside the loop; the warps of a block split the row's words and add their sums in a fixed
// order at the end (deterministic, no atomics, nothing to reset between calls: CUDA-graph safe).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <cuda_runtime.h>

namespace {

template <typename X>
struct Act;

template <>
struct Act<__nv_bfloat16> {
  static __device__ __forceinline__ void unpack4(uint2 u, float* f) {
    f[0] = __uint_as_float(u.x << 16);
    f[1] = __uint_as_float(u.x & 0xffff0000u);
    f[2] = __uint_as_float(u.y << 16);
    f[3] = __uint_as_float(u.y & 0xffff0000u);
  }
  static __device__ __forceinline__ __nv_bfloat16 cast(float v) { return __float2bfloat16(v); }
};

template <>
struct Act<__half> {
  static __device__ __forceinline__ void unpack4(uint2 u, float* f) {
    const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&u.x));
    const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&u.y));
    f[0] = a.x;
    f[1] = a.y;
    f[2] = b.x;
    f[3] = b.y;
  }
  static __device__ __forceinline__ __half cast(float v) { return __float2half(v); }
};

// Bits [shift, shift + width) of w moved to [to, to + width); the loops that call it are unrolled,
// so both shifts are constants.
__device__ __forceinline__ uint32_t field(uint32_t w, int shift, int to, int width) {
  const uint32_t mask = ((1u << width) - 1u) << to;
  return (shift >= to ? (w >> (shift - to)) : (w << (to - shift))) & mask;
}

// float32 1 + code / 2^B of run j, from the wide word w0 and the narrow word w1 (already shifted
// to its tile's share). Run j is bits B * j .. of its column's string: w0's 32 bits, then w1's. Most
// runs lie in one word (at 3 bits, 15 of 16), so they cost one shift and one mask, as 2 or 4 bits do.
template <int P0, int P1>
__device__ __forceinline__ float code_float(uint32_t w0, uint32_t w1, int j) {
  constexpr int B = P0 + P1;
  constexpr int BASE = 23 - B;
  const int lo = j * B;
  uint32_t v;
  if (lo + B <= 32) {
    v = field(w0, lo, BASE, B);
  } else if (lo >= 32) {
    v = field(w1, lo - 32, BASE, B);
  } else {  // the run straddles the two words
    v = field(w0, lo, BASE, 32 - lo) | field(w1, 0, BASE + 32 - lo, B - (32 - lo));
  }
  return __uint_as_float(v | 0x3F800000u);
}

// GPT: quantization groups per tile (1 where a group spans one tile or more); RUNS / GPT runs per
// group. A block's KW warps share R rows and split their words; a thread takes U 16-byte loads of
// each row per step.
template <int P0, int P1, int GPT, int R, int KW, int U, typename X>
__global__ void __launch_bounds__(32 * KW) gemv_planes_kernel(
    const X* __restrict__ x,
    const int32_t* __restrict__ p0,
    const int32_t* __restrict__ p1,
    const __half* __restrict__ scale,
    const __half* __restrict__ zero,
    X* __restrict__ y,
    int n,
    int k,
    int tile,
    int group) {
  constexpr int RUNS = 32 / P0;
  constexpr int RPG = RUNS / GPT;
  constexpr float TWO_B = float(1 << (P0 + P1));
  const int w_tile = tile * P0 / 32;             // W: words per tile and plane
  const int stride0 = k / 32 * P0;               // wide words per row
  const int tiles = k / tile;
  const int stride1 = (tiles + 1) / 2 * w_tile;  // narrow words per row (spans of two tiles)
  const int quads = stride0 / 4;
  const int groups = k / group;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int row0 = blockIdx.x * R;

  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.f;

  for (int base = warp * 32 + lane; base < quads; base += 32 * KW * U) {
    // Everything a step reads is loaded before any of it is used: the words of every row, the
    // activations, the scales and zero points, so one memory latency covers the step. (Loading
    // the next step while computing this one needs twice the registers and measured slower.)
    uint4 w0[U][R], w1[U][R];
    uint2 xr[U][RUNS];
    __half sc[U][R][GPT], ze[U][R][GPT];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int qd = base + u * 32 * KW;
      const bool live = qd < quads;
      const int q = live ? qd * 4 : 0;
      const int t = q / w_tile;
      const int c = q - t * w_tile;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const bool ok = live && row0 + r < n;
        const size_t row = ok ? row0 + r : 0;
        w0[u][r] = ok ? __ldg(reinterpret_cast<const uint4*>(p0 + row * stride0 + q)) : make_uint4(0, 0, 0, 0);
        if constexpr (P1 > 0) {
          w1[u][r] = ok ? __ldg(reinterpret_cast<const uint4*>(p1 + row * stride1 + (t / 2) * w_tile + c)) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int gi = 0; gi < GPT; ++gi) {
          const int g = (t * tile + gi * RPG * w_tile) / group;
          sc[u][r][gi] = scale[row * groups + g];
          ze[u][r][gi] = zero[row * groups + g];
        }
      }
#pragma unroll
      for (int j = 0; j < RUNS; ++j) xr[u][j] = __ldg(reinterpret_cast<const uint2*>(x + (size_t)t * tile + j * w_tile + c));
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int qd = base + u * 32 * KW;
      if (qd >= quads) break;
      const int half_shift = ((qd * 4 / w_tile) & 1) * 16;  // tile t's bits in its span's narrow words
      uint32_t n0[R][4], n1[R][4];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        n0[r][0] = w0[u][r].x; n0[r][1] = w0[u][r].y; n0[r][2] = w0[u][r].z; n0[r][3] = w0[u][r].w;
        if constexpr (P1 > 0) {
          n1[r][0] = w1[u][r].x >> half_shift; n1[r][1] = w1[u][r].y >> half_shift;
          n1[r][2] = w1[u][r].z >> half_shift; n1[r][3] = w1[u][r].w >> half_shift;
        } else {
          n1[r][0] = n1[r][1] = n1[r][2] = n1[r][3] = 0u;
        }
      }
#pragma unroll
      for (int gi = 0; gi < GPT; ++gi) {
        float part[R];
#pragma unroll
        for (int r = 0; r < R; ++r) part[r] = 0.f;
        float xs = 0.f;
#pragma unroll
        for (int jj = 0; jj < RPG; ++jj) {
          const int j = gi * RPG + jj;
          float xv[4];
          Act<X>::unpack4(xr[u][j], xv);
          xs += (xv[0] + xv[1]) + (xv[2] + xv[3]);
#pragma unroll
          for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int v = 0; v < 4; ++v) part[r] = fmaf(code_float<P0, P1>(n0[r][v], n1[r][v], j), xv[v], part[r]);
          }
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {  // the group's affine step, on this thread's partial sums
          acc[r] = fmaf(__half2float(sc[u][r][gi]), TWO_B * part[r] - (TWO_B + __half2float(ze[u][r][gi])) * xs, acc[r]);
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < R; ++r) {
    float v = acc[r];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    acc[r] = v;
  }
  __shared__ float sums[KW][R];
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) sums[warp][r] = acc[r];
  }
  __syncthreads();
  if (threadIdx.x < R && row0 + (int)threadIdx.x < n) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < KW; ++w) total += sums[w][threadIdx.x];
    y[row0 + threadIdx.x] = Act<X>::cast(total);
  }
}

struct Args {
  const void* x;
  const int32_t* p0;
  const int32_t* p1;
  const __half* scale;
  const __half* zero;
  void* y;
  int n, k, tile, group;
};

template <int P0, int P1, int GPT, int R, int KW, int U, typename X>
void launch(const Args& a, cudaStream_t stream) {
  gemv_planes_kernel<P0, P1, GPT, R, KW, U, X><<<(a.n + R - 1) / R, 32 * KW, 0, stream>>>(
      static_cast<const X*>(a.x), a.p0, a.p1, a.scale, a.zero, static_cast<X*>(a.y), a.n, a.k, a.tile, a.group);
}

// The block shapes each width was measured to want (SHAPES in cuda_gemv.py; docs/benchmarks.md):
// 0 = 4 rows on 4 warps, 1 = 8 rows on 4 warps, 2 = 4 rows on 2 warps with two loads per thread
// and row. Only those are built.
template <int P0, int P1, int GPT, typename X>
bool by_shape(int shape, const Args& a, cudaStream_t s) {
  constexpr bool narrow = P0 <= 2;  // 2 and 3 bits: shapes 0 and 2; 4 bits: 1 and 2; 8 bits: 1
  if constexpr (narrow) {
    if (shape == 0) { launch<P0, P1, GPT, 4, 4, 1, X>(a, s); return true; }
  } else {
    if (shape == 1) { launch<P0, P1, GPT, 8, 4, 1, X>(a, s); return true; }
  }
  if constexpr (P0 <= 4) {
    if (shape == 2) { launch<P0, P1, GPT, 4, 2, 2, X>(a, s); return true; }
  }
  return false;
}

template <int P0, int P1, typename X>
bool by_groups(int gpt, int shape, const Args& a, cudaStream_t s) {
  switch (gpt) {
    case 1: return by_shape<P0, P1, 1, X>(shape, a, s);
    case 2: return by_shape<P0, P1, 2, X>(shape, a, s);
    default: return false;
  }
}

template <typename X>
bool by_width(int p0w, int p1w, int gpt, int shape, const Args& a, cudaStream_t s) {
  if (p0w == 2 && p1w == 0) return by_groups<2, 0, X>(gpt, shape, a, s);
  if (p0w == 2 && p1w == 1) return by_groups<2, 1, X>(gpt, shape, a, s);
  if (p0w == 4 && p1w == 0) return by_groups<4, 0, X>(gpt, shape, a, s);
  if (p0w == 8 && p1w == 0) return by_groups<8, 0, X>(gpt, shape, a, s);
  return false;
}

}  // namespace

// y (1, n) = x (1, k) @ W.T with bf16 (else fp16) activations; false: no kernel for these widths
// and shape. The caller (cuda_gemv.py) checks shapes, dtypes and alignment.
bool amq_gemv_planes(const void* x, bool bf16, const int32_t* p0, const int32_t* p1, const void* scale, const void* zero, void* y,
                     int p0w, int p1w, int n, int k, int tile, int group, int gpt, int shape, cudaStream_t stream) {
  const Args a{x, p0, p1, static_cast<const __half*>(scale), static_cast<const __half*>(zero), y, n, k, tile, group};
  return bf16 ? by_width<__nv_bfloat16>(p0w, p1w, gpt, shape, a, stream) : by_width<__half>(p0w, p1w, gpt, shape, a, stream);
}
