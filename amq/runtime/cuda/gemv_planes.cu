// One-row product y = x @ W.T on the tile-interleaved bit-plane layout (amq/runtime/layout.py).
//
// Why CUDA and not Triton: batch-1 decoding reads every weight once, so the product should cost
// its bytes. The Triton GEMV executes 9-11 instructions per weight (docs/benchmarks.md, "A profile
// of the decode kernels"): each thread holds one row's words of many columns, so every activation
// is loaded, converted and summed once per row. Here a thread loads 4 consecutive words (one 16-byte
// load) for each row of its block, and each activation it loads serves all those rows: per weight
// that leaves one shift, one and-or (the code into the mantissa of 1.0) and one fused multiply-add.
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

// (x & MASK) | one in one instruction; `one` holds 0x3F800000 in a register the compiler cannot fold.
template <uint32_t MASK>
__device__ __forceinline__ uint32_t and_or(uint32_t x, uint32_t one) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(x), "n"(MASK), "r"(one));
  return d;
}

// w's bits from `shift` on moved to bit `to` (the mask is applied by the caller).
__device__ __forceinline__ uint32_t moved(uint32_t w, int shift, int to) { return shift >= to ? (w >> (shift - to)) : (w << (to - shift)); }

// float32 1 + code / 2^B of run j, from the wide word w0 and the narrow word w1 (already shifted
// to its tile's share). Run j is bits B * j .. of its column's string: w0's 32 bits, then w1's. Most
// runs lie in one word (at 3 bits, 15 of 16), so they cost one shift and one and-or, as 2 or 4 bits do.
template <int P0, int P1>
__device__ __forceinline__ float code_float(uint32_t w0, uint32_t w1, int j, uint32_t one) {
  constexpr int B = P0 + P1;
  constexpr int BASE = 23 - B;
  constexpr uint32_t MASK = ((1u << B) - 1u) << BASE;
  const int lo = j * B;
  uint32_t v;
  if (lo + B <= 32) {
    v = and_or<MASK>(moved(w0, lo, BASE), one);
  } else if (lo >= 32) {
    v = and_or<MASK>(moved(w1, lo - 32, BASE), one);
  } else {  // the run straddles the two words
    v = field(w0, lo, BASE, 32 - lo) | field(w1, 0, BASE + 32 - lo, B - (32 - lo)) | 0x3F800000u;
  }
  return __uint_as_float(v);
}

// GPT: quantization groups per tile (1 where a group spans one tile or more); RUNS / GPT runs per
// group. A block's KW warps share R * C rows and split their words, one 16-byte load per thread and
// row at a time. A thread walks the block's rows in C chunks of R for the same columns: its
// activations are loaded once for all of them, and the next chunk's words are loaded while this
// chunk's are multiplied, so each thread keeps a load in flight without holding every row at once.
template <int P0, int P1, int GPT, int R, int KW, int C, typename X>
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
  constexpr int ROWS = R * C;
  constexpr float TWO_B = float(1 << (P0 + P1));
  const int w_tile = tile * P0 / 32;             // W: words per tile and plane
  const int stride0 = k / 32 * P0;               // wide words per row
  const int tiles = k / tile;
  const int stride1 = (tiles + 1) / 2 * w_tile;  // narrow words per row (spans of two tiles)
  const int quads = stride0 / 4;
  const int groups = k / group;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int row0 = blockIdx.x * ROWS;

  float acc[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) acc[r] = 0.f;
  uint32_t one;
  asm volatile("mov.b32 %0, 0x3F800000;" : "=r"(one));  // opaque to the compiler: see and_or

  // A chunk: R rows' words of this thread's 4 columns per run, with their scales and zero points.
  struct Chunk {
    uint4 w0[R], w1[R];
    __half sc[R][GPT], ze[R][GPT];
  };
  for (int qd = warp * 32 + lane; qd < quads; qd += 32 * KW) {
    const int q = qd * 4;
    const int t = q / w_tile;
    const int c = q - t * w_tile;
    const int half_shift = (t & 1) * 16;  // tile t's bits in its span's narrow words
    auto load = [&](Chunk& ch, int first) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const bool ok = first + r < n;
        const size_t row = ok ? first + r : 0;
        ch.w0[r] = ok ? __ldg(reinterpret_cast<const uint4*>(p0 + row * stride0 + q)) : make_uint4(0, 0, 0, 0);
        if constexpr (P1 > 0) {
          ch.w1[r] = ok ? __ldg(reinterpret_cast<const uint4*>(p1 + row * stride1 + (t / 2) * w_tile + c)) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int gi = 0; gi < GPT; ++gi) {
          const int g = (t * tile + gi * RPG * w_tile) / group;
          ch.sc[r][gi] = scale[row * groups + g];
          ch.ze[r][gi] = zero[row * groups + g];
        }
      }
    };
    // Everything the first chunk reads is loaded before any of it is used (its words, scales, zero
    // points and the activations), so one memory latency covers it; later chunks' latency hides
    // behind the chunk before.
    Chunk cur;
    load(cur, row0);
    uint2 xr[RUNS];
#pragma unroll
    for (int j = 0; j < RUNS; ++j) xr[j] = __ldg(reinterpret_cast<const uint2*>(x + (size_t)t * tile + j * w_tile + c));
#pragma unroll
    for (int ci = 0; ci < C; ++ci) {
      Chunk next;
      if (ci + 1 < C) load(next, row0 + (ci + 1) * R);
      uint32_t n0[R][4], n1[R][4];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        n0[r][0] = cur.w0[r].x; n0[r][1] = cur.w0[r].y; n0[r][2] = cur.w0[r].z; n0[r][3] = cur.w0[r].w;
        if constexpr (P1 > 0) {
          n1[r][0] = cur.w1[r].x >> half_shift; n1[r][1] = cur.w1[r].y >> half_shift;
          n1[r][2] = cur.w1[r].z >> half_shift; n1[r][3] = cur.w1[r].w >> half_shift;
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
          Act<X>::unpack4(xr[j], xv);
          xs += (xv[0] + xv[1]) + (xv[2] + xv[3]);
#pragma unroll
          for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int v = 0; v < 4; ++v) part[r] = fmaf(code_float<P0, P1>(n0[r][v], n1[r][v], j, one), xv[v], part[r]);
          }
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {  // the group's affine step, on this thread's partial sums
          acc[ci * R + r] = fmaf(__half2float(cur.sc[r][gi]), TWO_B * part[r] - (TWO_B + __half2float(cur.ze[r][gi])) * xs, acc[ci * R + r]);
        }
      }
      if (ci + 1 < C) cur = next;
    }
  }

#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    float v = acc[r];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    acc[r] = v;
  }
  __shared__ float sums[KW][ROWS];
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) sums[warp][r] = acc[r];
  }
  __syncthreads();
  for (int r = threadIdx.x; r < ROWS && row0 + r < n; r += 32 * KW) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < KW; ++w) total += sums[w][r];
    y[row0 + r] = Act<X>::cast(total);
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

template <int P0, int P1, int GPT, int R, int KW, int C, typename X>
void launch(const Args& a, cudaStream_t stream) {
  gemv_planes_kernel<P0, P1, GPT, R, KW, C, X><<<(a.n + R * C - 1) / (R * C), 32 * KW, 0, stream>>>(
      static_cast<const X*>(a.x), a.p0, a.p1, a.scale, a.zero, static_cast<X*>(a.y), a.n, a.k, a.tile, a.group);
}

// Block shapes (SHAPES in cuda_gemv.py: rows per chunk, warps, chunks). Each width is built only at
// the shape cuda_gemv.py names for it (AMQ_SHAPE_2/3/4/8; docs/benchmarks.md, "The GEMV's row
// chunks"). AMQ_GEMV_ALL_SHAPES builds every shape for every width, for scripts/bench_gemv.py
// --all-shapes to re-measure them on another GPU.
template <int P0, int P1, int GPT, int SHAPE, typename X>
bool at_shape(const Args& a, cudaStream_t s) {
  if constexpr (SHAPE == 0) launch<P0, P1, GPT, 2, 2, 2, X>(a, s);
  if constexpr (SHAPE == 1) launch<P0, P1, GPT, 4, 2, 2, X>(a, s);
  if constexpr (SHAPE == 2) launch<P0, P1, GPT, 4, 4, 2, X>(a, s);
  if constexpr (SHAPE == 3) launch<P0, P1, GPT, 8, 4, 1, X>(a, s);
  return SHAPE >= 0 && SHAPE <= 3;
}

template <int P0, int P1, int GPT, typename X>
bool by_shape(int shape, const Args& a, cudaStream_t s) {
#ifdef AMQ_GEMV_ALL_SHAPES
  switch (shape) {
    case 0: return at_shape<P0, P1, GPT, 0, X>(a, s);
    case 1: return at_shape<P0, P1, GPT, 1, X>(a, s);
    case 2: return at_shape<P0, P1, GPT, 2, X>(a, s);
    case 3: return at_shape<P0, P1, GPT, 3, X>(a, s);
    default: return false;
  }
#else
  constexpr int mine = P0 == 2 ? (P1 == 0 ? AMQ_SHAPE_2 : AMQ_SHAPE_3) : (P0 == 4 ? AMQ_SHAPE_4 : AMQ_SHAPE_8);
  return shape == mine && at_shape<P0, P1, GPT, mine, X>(a, s);
#endif
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
