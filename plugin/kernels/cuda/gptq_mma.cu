// gptq-bridge's CUDA kernels for 4-bit and 3-bit GPTQ weights (built by cuda_build.py, driven by
// cuda_gptq.py; the file is named for its first layout, q4mma).
//
// Few rows (m <= 32): out[m, n] = sum_k x[m, k] w[k, n] on the tensor cores, computed transposed: one
// mma.sync m16n8k16 takes 16 output columns as its M side (A = dequantized weight) and 8 activation rows as its
// N side (B = x), so a single row wastes no weight traffic.
//
// Weight layout "q4mma", made once by cuda_gptq.shuffle(): rows ("slots") sorted by group as in slot_layout,
// padded to a multiple of 256 (q4_few_rows takes whole batches of 4 chunks), then cut into 16-column tiles and
// 64-slot chunks. A chunk of a tile is 32 lanes x 4 words: lane (g = lane / 4, t = lane % 4), word j holds
// exactly the eight 4-bit values lane's A fragment needs for k-tile j, so a warp reads 512 contiguous bytes per
// chunk, one 16-byte load per lane:
//   bits  0-3 : slot 16t+4j+0, column g      bits 16-19: slot 16t+4j+1, column g
//   bits  4-7 : slot 16t+4j+0, column g+8    bits 20-23: slot 16t+4j+1, column g+8
//   bits  8-11: slot 16t+4j+2, column g      bits 24-27: slot 16t+4j+3, column g
//   bits 12-15: slot 16t+4j+2, column g+8    bits 28-31: slot 16t+4j+3, column g+8
// The mma's logical k (2t, 2t+1 | 2t+8, 2t+9 of k-tile j) maps to slots 16t+4j+(0, 1 | 2, 3): the same
// permutation for A and B, so the product is unchanged, and lane t's activations for the whole chunk are 16
// consecutive halves (two 16-byte loads per row).
//
// 3-bit layout "q3mma" (cuda_gptq.shuffle3): the same 32 values per lane and chunk, in 16 pairs p = 4j + h
// (h as the four rows of the table above: (slot +0, +1) of column g, of g + 8, (+2, +3) of g, of g + 8) packed
// into 3 words: word i holds pairs 5i..5i+4, pair 5i+f at bits 3f..3f+2 (first slot) and 16+3f..18+3f (second);
// pair 15's two values are spread over the spare bits 15 and 31 of the three words (bit i in word i). Slots are
// padded to a multiple of 256 too, and chunks go in quads: a tile's quad is 3 x 32 lanes x 16 bytes, lane's 16-byte
// word i holding word i of the quad's four chunks, so a warp reads 1,536 contiguous bytes per quad.
//
// Dequantization, two values per instruction: lop3 puts a pair's fields (bits 0-3 / 0-2 and 16-19 / 16-18,
// after a shift) into the mantissas of the half2 (1024, 1024), giving (1024 + q0, 1024 + q1) exactly; minus
// (1024 + z) is the exact integer q - z; times the scale rounds once, the same float16 weight the reference
// kernel makes. Accumulation is float32.
//
// Split-K: the grid is (column blocks, splits); each split writes float32 partials, and the last block of a
// column block to finish (an arrival counter, reset by that block) sums them in a fixed order: one launch,
// deterministic.

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int kWarps = 4;  // a block: 4 warps, one 16-column tile each
constexpr int kThreads = kWarps * 32;
constexpr int kCols = kWarps * 16;  // columns per block
constexpr int kUnroll = 4;  // chunks loaded before any is used: 64 bytes a lane in flight (3-bit: 48, a quad)
static_assert(kUnroll == 4, "load_batch's 3-bit path loads exactly one quad of chunks");

// (1024 + q_lo, 1024 + q_hi) as a half2: w's bits under kMask (one field in each 16-bit half, at bit 0) put into
// the mantissas of (1024, 1024).
template <uint32_t kMask>
__device__ __forceinline__ uint32_t magic_pair(uint32_t w) {
  uint32_t h;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(h) : "r"(w), "n"(kMask), "n"(0x64006400));  // (w & m) | c
  return h;
}

// Pair h (0..3) of k-tile j (0..3) of a lane's chunk, as (1024 + q, 1024 + q'): pair 0 = slots (s, s + 1) of
// column g, 1 = the same slots of column g + 8, 2 = slots (s + 2, s + 3) of column g, 3 = those of g + 8, with
// s = 16t + 4j. 4-bit: word j holds its four pairs at bits 4h..4h+3 and 16+4h..19+4h. 3-bit: pair p = 4j + h
// sits in word p / 5 at bits 3(p % 5).. and 16 + 3(p % 5).. for p < 15; pair 15 is spread over the spare bits
// 15 and 31 of the three words (bit i of its values in word i). (Measured and not kept, docs/PERFORMANCE.md:
// leaving the fields at bits 3-8 in place and undoing their 2^k with one fma instead of the subtract, one shift
// a word: 0-5% slower for 4-bit, 3-12% slower for 3-bit.)
template <int BITS>
__device__ __forceinline__ uint32_t raw_pair(const uint32_t (&w)[4], int j, int h) {
  if (BITS == 4) return magic_pair<0x000F000F>(w[j] >> (4 * h));
  const int p = 4 * j + h;
  if (p < 15) return magic_pair<0x00070007>(w[p / 5] >> (3 * (p % 5)));
  return ((w[0] >> 15) & 0x00010001) | ((w[1] >> 14) & 0x00020002) | ((w[2] >> 13) & 0x00040004) | 0x64006400;
}

// floor(n / d) for a runtime d (slots per group) without a division: umulhi(n, magic) >> shift, exact for
// every n < 2^31. With s = floor(log2 d): a power of two is (2^31, s - 1); otherwise magic = ceil(2^(32+s) / d),
// which fits 32 bits, and writing n = qd + r, n * magic / 2^(32+s) < q + (d - 1) / d + n (d - 1) / (d 2^(32+s)),
// below q + 1 while n (d - 1) < 2^(32+s), true for n < 2^31 since d - 1 < 2^(s+1). (The division it replaces
// cost ~30 instructions a chunk, a quarter of the few-rows kernel's.)
struct GroupDivider {
  uint32_t magic;
  uint32_t shift;
  __host__ __device__ __forceinline__ uint32_t operator()(uint32_t n) const {
#ifdef __CUDA_ARCH__
    return __umulhi(n, magic) >> shift;
#else
    return static_cast<uint32_t>((uint64_t{n} * magic) >> 32) >> shift;  // the same product, for gb_group_of
#endif
  }
  static GroupDivider of(uint32_t d) {  // d >= 2
    uint32_t s = 31;
    while (!(d >> s)) --s;
    if ((d & (d - 1)) == 0) return {1u << 31, s - 1};
    return {static_cast<uint32_t>(((uint64_t{1} << (32 + s)) + d - 1) / d), s};
  }
};

// (q - z) * s for a raw pair: an exact subtract, then one rounding: the reference kernel's float16 weight.
__device__ __forceinline__ uint32_t dequant_raw(uint32_t raw, __half2 z, __half2 s) {
  __half2 v = __hmul2(__hsub2(*reinterpret_cast<__half2*>(&raw), z), s);
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Programmatic dependent launch (Hopper): the few-rows kernel is launched while the gather of x before it is
// still running, so its blocks are already resident when the gather ends; each waits here for the gather's
// writes before it reads x. No-op where the launch had no programmatic dependency, and on older GPUs (GB_PDL 0:
// never used). (Loading the first weights before the wait was measured too: 2-5% slower for 3-bit.)
#ifndef GB_PDL
#define GB_PDL 1
#endif

__device__ __forceinline__ void wait_for_inputs() {
#if GB_PDL && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void let_dependents_launch() {
#if GB_PDL && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

// Weights are read once: keep them out of L1.
__device__ __forceinline__ uint4 load_once(const uint4* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}

// One 64-slot chunk of one lane: 4 k-tiles, each one mma per 8-row tile.
template <int MT, int BITS>
__device__ __forceinline__ void chunk_mma(float (&acc)[MT][4], const uint32_t (&words)[4], int chunk, int g, int t,
                                          int col,
                                          const __half2* __restrict__ sz, const __half* __restrict__ x, int M,
                                          int N, GroupDivider group_of, int ldx) {
  const int slot = chunk * 64 + 16 * t;  // this lane's 16 slots lie in one group (16 divides P)
  const size_t grp = group_of(slot);
  const __half2 sz0 = sz[grp * N + col], sz8 = sz[grp * N + col + 8];
  const __half2 s0 = __low2half2(sz0), z0 = __high2half2(sz0);
  const __half2 s8 = __low2half2(sz8), z8 = __high2half2(sz8);
  uint32_t xb[MT][8];
#pragma unroll
  for (int r = 0; r < MT; ++r) {
    const int m = r * 8 + g;
    if (m < M) {
      const uint4* xp = reinterpret_cast<const uint4*>(x + (size_t)m * ldx + slot);
      const uint4 lo = xp[0], hi = xp[1];
      xb[r][0] = lo.x; xb[r][1] = lo.y; xb[r][2] = lo.z; xb[r][3] = lo.w;
      xb[r][4] = hi.x; xb[r][5] = hi.y; xb[r][6] = hi.z; xb[r][7] = hi.w;
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) xb[r][i] = 0;
    }
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t a0 = dequant_raw(raw_pair<BITS>(words, j, 0), z0, s0);
    const uint32_t a1 = dequant_raw(raw_pair<BITS>(words, j, 1), z8, s8);
    const uint32_t a2 = dequant_raw(raw_pair<BITS>(words, j, 2), z0, s0);
    const uint32_t a3 = dequant_raw(raw_pair<BITS>(words, j, 3), z8, s8);
#pragma unroll
    for (int r = 0; r < MT; ++r) mma_16816(acc[r], a0, a1, a2, a3, xb[r][2 * j], xb[r][2 * j + 1]);
  }
}

// One lane's words of the kLoad chunks c, c + 1, ... (word j of chunk u in w[u][j]; kLoad <= kUnroll). 4-bit: one
// 16-byte load a chunk (its four k-tile words). 3-bit: chunks come in whole quads (c a multiple of 4, kLoad 4),
// three 16-byte loads a quad; load i brings word i of each of the four chunks.
template <int BITS, int kLoad = kUnroll>
__device__ __forceinline__ void load_batch(uint32_t (&w)[kUnroll][4], const uint4* wp, int c) {
  static_assert(BITS == 4 || kLoad == 4, "3-bit chunks are loaded a quad at a time");
  if (BITS == 4) {
#pragma unroll
    for (int u = 0; u < kLoad; ++u) {
      const uint4 q = load_once(wp + (size_t)(c + u) * 32);
      w[u][0] = q.x; w[u][1] = q.y; w[u][2] = q.z; w[u][3] = q.w;
    }
  } else {
    const uint4 p0 = load_once(wp + (size_t)c * 24), p1 = load_once(wp + (size_t)c * 24 + 32),
                p2 = load_once(wp + (size_t)c * 24 + 64);
    w[0][0] = p0.x; w[0][1] = p1.x; w[0][2] = p2.x; w[0][3] = 0;
    w[1][0] = p0.y; w[1][1] = p1.y; w[1][2] = p2.y; w[1][3] = 0;
    w[2][0] = p0.z; w[2][1] = p1.z; w[2][2] = p2.z; w[2][3] = 0;
    w[3][0] = p0.w; w[3][1] = p1.w; w[3][2] = p2.w; w[3][3] = 0;
  }
}

// Blocks per SM each few-rows kernel is built for, i.e. a register cap (65,536 / (128 threads x blocks)): up to
// 8 rows 48 registers (4-bit) or 64 (3-bit), 64 for 16 rows, 128 for 32. Uncapped, ptxas hoists more of the four
// chunks' loads and math than fits (up to 184 registers), and the kernel measured up to 11% slower on an H100
// 80GB HBM3 (2026-11-28, bench/kernels.py); 3-bit at 8 rows was 3-7% faster with 64 registers than 48.
constexpr int few_rows_min_blocks(int mt, int bits) { return mt == 1 ? (bits == 4 ? 10 : 8) : mt == 2 ? 8 : 4; }

// MT tiles of 8 rows (m <= 8 * MT). Each lane loads its words of kUnroll consecutive chunks, then does their
// math; a split is whole batches (the host pads chunks and splits to multiples of 4), so there is no bound to
// check per chunk and the compiler may interleave the four chunks. (Measured on the H100 and not kept,
// docs/PERFORMANCE.md: issuing the next step's loads before this step's math, also with the scales and
// activations; a cp.async ring in shared memory 4 or 8 chunks deep. Each was 3-20% slower: the math between
// loads, not the loads in flight, is what this kernel waits on.)
template <int MT, int BITS>
__global__ void __launch_bounds__(kThreads, few_rows_min_blocks(MT, BITS)) q4_few_rows(
    const uint4* __restrict__ qw,     // 4-bit: [tiles][chunks][32 lanes] x 4 words; 3-bit: [tiles][quads][3][32] x 4
    const __half2* __restrict__ sz,   // [groups][N]: (scale, 1024 + zero)
    const __half* __restrict__ x,     // [M][ldx], columns in slot order, chunks * 64 of them
    const __half* __restrict__ bias,  // [N] or null
    __half* __restrict__ out,         // [M][ldo]
    float* __restrict__ ws,           // [splits][M][N] partials (unused with one split)
    int* __restrict__ counters,       // [column blocks], zero between calls
    int M, int N, int chunks, GroupDivider group_of, int ldx, int ldo, int per_split) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tile = blockIdx.x * kWarps + warp;
  const int c_begin = blockIdx.y * per_split;
  const int c_end = min(chunks, c_begin + per_split);
  float acc[MT][4];
#pragma unroll
  for (int r = 0; r < MT; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = 0.f;

  if (tile < (N >> 4)) {
    const uint4* wp = qw + (size_t)tile * chunks * 8 * BITS + lane;  // a chunk is 8 * BITS uint4 of a tile
    const int col = tile * 16 + g;
    wait_for_inputs();  // x may come from the gather launched just before this kernel
    for (int c = c_begin; c < c_end; c += kUnroll) {
      uint32_t w[kUnroll][4];
      load_batch<BITS>(w, wp, c);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) chunk_mma<MT, BITS>(acc, w[u], c + u, g, t, col, sz, x, M, N, group_of, ldx);
    }
  }

  // acc[r]: c0 = (column g, row 2t), c1 = (g, 2t + 1), c2 = (g + 8, 2t), c3 = (g + 8, 2t + 1)
  const bool one_split = gridDim.y == 1;
  if (tile < (N >> 4)) {
#pragma unroll
    for (int r = 0; r < MT; ++r) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = r * 8 + 2 * t + (i & 1);
        const int n = tile * 16 + g + (i >> 1) * 8;
        if (m < M) {
          if (one_split) {
            const float b = bias ? __half2float(bias[n]) : 0.f;
            out[(size_t)m * ldo + n] = __float2half(acc[r][i] + b);
          } else {
            ws[((size_t)blockIdx.y * M + m) * N + n] = acc[r][i];
          }
        }
      }
    }
  }
  if (one_split) return;

  __shared__ int last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&counters[blockIdx.x], 1) == (int)gridDim.y - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  const int n0 = blockIdx.x * kCols;
  if (MT > 1 || M == 8) {  // four columns a thread, 16-byte reads of the partials: 8 rows take one pass
    for (int i = threadIdx.x; i < M * (kCols / 4); i += kThreads) {
      const int m = i / (kCols / 4), n = n0 + i % (kCols / 4) * 4;
      if (n >= N) continue;  // N is a multiple of 16: the four columns are all in or all out
      float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int sp = 0; sp < (int)gridDim.y; ++sp) {
        const float4 v = __ldcg(reinterpret_cast<const float4*>(ws + ((size_t)sp * M + m) * N + n));
        s.x += v.x; s.y += v.y; s.z += v.z; s.w += v.w;
      }
      const float sum[4] = {s.x, s.y, s.z, s.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        out[(size_t)m * ldo + n + j] = __float2half(sum[j] + (bias ? __half2float(bias[n + j]) : 0.f));
      }
    }
  } else {  // a column a thread
    for (int i = threadIdx.x; i < M * kCols; i += kThreads) {
      const int m = i / kCols, n = n0 + i % kCols;
      if (n >= N) continue;
      float s = 0.f;
      for (int sp = 0; sp < (int)gridDim.y; ++sp) s += __ldcg(ws + ((size_t)sp * M + m) * N + n);
      if (bias) s += __half2float(bias[n]);
      out[(size_t)m * ldo + n] = __float2half(s);
    }
  }
  if (threadIdx.x == 0) counters[blockIdx.x] = 0;
}

// x's columns in slot order: out[m, s] = x[m, idx[s]], or 0 where idx[s] < 0 (pad slots).
__global__ void gather_columns(const __half* __restrict__ x, int ldx, const int* __restrict__ idx,
                               __half* __restrict__ out, int slots) {
  let_dependents_launch();  // the kernel that reads `out` waits for this grid's completion itself
  const int s = blockIdx.x * blockDim.x + threadIdx.x;
  const int m = blockIdx.y;
  if (s < slots) {
    const int k = idx[s];
    out[(size_t)m * slots + s] = k >= 0 ? x[(size_t)m * ldx + k] : __float2half(0.f);
  }
}

// The float16 weight [K][N] in input-row order. A block dequantizes the chunks of one load unit (4-bit: one
// chunk; 3-bit: a quad of four) of 4 tiles (64 columns): the words come as in q4_few_rows, then chunk by chunk
// the values go through shared memory and each of the 64 rows is written as one 128-byte run (rows scattered by
// perm, columns contiguous).
template <int BITS>
__global__ void __launch_bounds__(kThreads) q4_dequantize(
    const uint4* __restrict__ qw, const __half2* __restrict__ sz, const int* __restrict__ perm,
    __half* __restrict__ w, int N, int chunks, GroupDivider group_of, int slots) {
  constexpr int kChunks = BITS == 4 ? 1 : 4;
  __shared__ __align__(16) __half tile_w[64][kCols + 8];  // +8: rows start on different banks
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tile = blockIdx.x * kWarps + warp;
  const int col = tile * 16 + g;
  const int c = warp * 16 + g;  // column within the block
  const int n0 = blockIdx.x * kCols;
  const int chunk0 = blockIdx.y * kChunks;
  const bool has_tile = tile < (N >> 4);
  uint32_t words[kUnroll][4] = {};
  if (has_tile) load_batch<BITS, kChunks>(words, qw + (size_t)tile * chunks * 8 * BITS + lane, chunk0);
#pragma unroll
  for (int u = 0; u < kChunks; ++u) {
    const int chunk = chunk0 + u;
    if (has_tile) {
      const size_t grp = group_of(chunk * 64 + 16 * t);
      const __half2 sz0 = sz[grp * N + col], sz8 = sz[grp * N + col + 8];
      const __half2 s0 = __low2half2(sz0), z0 = __high2half2(sz0), s8 = __low2half2(sz8), z8 = __high2half2(sz8);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int r = 16 * t + 4 * j;  // slot within the chunk
#pragma unroll
        for (int h = 0; h < 4; ++h) {  // pair h: slots r + (h / 2) * 2 and + 1, column c + (h % 2) * 8
          const uint32_t v = dequant_raw(raw_pair<BITS>(words[u], j, h), h & 1 ? z8 : z0, h & 1 ? s8 : s0);
          const int rr = r + (h >> 1) * 2, cc = c + (h & 1) * 8;
          tile_w[rr][cc] = __ushort_as_half(static_cast<unsigned short>(v));
          tile_w[rr + 1][cc] = __ushort_as_half(static_cast<unsigned short>(v >> 16));
        }
      }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < 64 * (kCols / 8); i += kThreads) {  // 8 halves (16 bytes) a store
      const int r = i / (kCols / 8), c8 = (i % (kCols / 8)) * 8;
      const int slot = chunk * 64 + r;
      if (slot >= slots || n0 + c8 >= N) continue;
      const int row = perm ? perm[slot] : slot;
      if (row < 0) continue;
      *reinterpret_cast<uint4*>(w + (size_t)row * N + n0 + c8) = *reinterpret_cast<const uint4*>(&tile_w[r][c8]);
    }
    if (kChunks > 1) __syncthreads();  // tile_w is written again for the next chunk
  }
}

}  // namespace

#include "gptq_wgmma.cuh"  // Hopper: many rows with wgmma

// The library links its own (static) CUDA runtime, whose current device belongs to the calling host thread and
// starts at 0, whatever torch's is: each entry point first makes `device` (that of the tensors and the stream it
// is given) current.
static cudaError_t use_device(int device) {
  int current;
  cudaError_t e = cudaGetDevice(&current);
  if (e == cudaSuccess && current != device) e = cudaSetDevice(device);
  return e;
}

// Programmatic dependent launch needs compute capability 9.0 (looked up once per device).
static bool hopper_or_newer(int device) {
  static int major[64] = {};
  if (device < 0 || device >= 64) return false;
  if (!major[device] && cudaDeviceGetAttribute(&major[device], cudaDevAttrComputeCapabilityMajor, device)) {
    return false;
  }
  return major[device] >= 9;
}

// A launch configuration; with `after_gather`, programmatic dependent launch: the kernel may start while the
// launch before it (a gather that calls let_dependents_launch) still runs, and waits in wait_for_inputs.
struct LaunchConfig {
  cudaLaunchAttribute pdl;
  cudaLaunchConfig_t cfg;
  LaunchConfig(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, bool after_gather) : cfg{} {
    pdl.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    pdl.val.programmaticStreamSerializationAllowed = 1;
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = &pdl;
    cfg.numAttrs = after_gather ? 1 : 0;
  }
  LaunchConfig(const LaunchConfig&) = delete;  // cfg points into this object
};

extern "C" {

// 0 on success, else a cudaError_t (gb_error_string names it); -1: more rows than the kernel takes.
// x [M][ldx] is read as it is when xidx is null; otherwise its columns are first gathered into slot order
// (gather_columns) into xs [M][chunks * 64], which the kernel then reads: one call, two launches.
// bits: 4 or 3; chunks and per_split are multiples of 4 (kUnroll).
int gb_q4_few_rows(const void* qw, const void* sz, const void* x, int ldx, const void* xidx, void* xs,
                   const void* bias, void* out, void* ws, void* counters, int bits, int M, int N, int chunks, int P,
                   int ldo, int splits, int per_split, int device, void* stream) {
  if (M > 32 || P < 2 || (bits != 4 && bits != 3) || chunks % kUnroll || per_split % kUnroll) return -1;
  if (cudaError_t e = use_device(device)) return static_cast<int>(e);
  auto s = static_cast<cudaStream_t>(stream);
  bool after_gather = false;
  if (xidx) {
    const int slots = chunks * 64;
    gather_columns<<<dim3((slots + 255) / 256, M), 256, 0, s>>>(
        static_cast<const __half*>(x), ldx, static_cast<const int*>(xidx), static_cast<__half*>(xs), slots);
    x = xs;
    ldx = slots;
    after_gather = GB_PDL && M <= 16 && hopper_or_newer(device);  // 17-32 rows: 10-14% slower on two shapes
  }
  const LaunchConfig launch(dim3((N / 16 + kWarps - 1) / kWarps, splits), dim3(kThreads), 0, s, after_gather);
  auto kernel = bits == 4 ? (M <= 8 ? q4_few_rows<1, 4> : M <= 16 ? q4_few_rows<2, 4> : q4_few_rows<4, 4>)
                          : (M <= 8 ? q4_few_rows<1, 3> : M <= 16 ? q4_few_rows<2, 3> : q4_few_rows<4, 3>);
  return static_cast<int>(cudaLaunchKernelEx(
      &launch.cfg, kernel, static_cast<const uint4*>(qw), static_cast<const __half2*>(sz),
      static_cast<const __half*>(x), static_cast<const __half*>(bias), static_cast<__half*>(out), static_cast<float*>(ws),
      static_cast<int*>(counters), M, N, chunks, GroupDivider::of(P), ldx, ldo, per_split));
}

int gb_q4_dequantize(const void* qw, const void* sz, const void* perm, void* w, int bits, int N, int chunks,
                     int P, int slots, int device, void* stream) {
  if (P < 2 || (bits != 4 && bits != 3) || (bits == 3 && chunks % 4)) return -1;
  if (cudaError_t e = use_device(device)) return static_cast<int>(e);
  const dim3 grid((N / 16 + kWarps - 1) / kWarps, bits == 4 ? chunks : chunks / 4);
  auto s = static_cast<cudaStream_t>(stream);
#define GB_ARGS                                                                                              \
  static_cast<const uint4*>(qw), static_cast<const __half2*>(sz), static_cast<const int*>(perm),             \
      static_cast<__half*>(w), N, chunks, GroupDivider::of(P), slots
  if (bits == 4) q4_dequantize<4><<<grid, kThreads, 0, s>>>(GB_ARGS);
  else q4_dequantize<3><<<grid, kThreads, 0, s>>>(GB_ARGS);
#undef GB_ARGS
  return static_cast<int>(cudaGetLastError());
}

// Many rows on Hopper (the sm_90a build): the columns of x [M][ldx] (K of them, at most kGatherRowsMaxK) are
// gathered into wgmma's k order (xidx: cuda_gptq.wgmma_x_index), tile by tile, into xs [chunks][M rounded up to
// nt][64], then q4_many_rows. -1: sizes or bits it does not take, or a library without an sm_90a build for this
// device.
// nt: rows a block (64, 128 or 256). Tiles (nt rows x 128 columns, the row block fastest) from `whole` on are
// split in `splits` (per_split chunks each; splits 1: none is); their partials go to ws ([split tiles][splits]
// [nt][128] float32) and a third launch sums them (ldo a multiple of 4).
int gb_q4_many_rows(const void* qw, const void* sz, const void* x, int ldx, int K, const void* xidx, void* xs,
                    const void* bias, void* out, void* ws, int bits, int M, int N, int chunks, int P, int ldo,
                    int nt, int whole, int splits, int per_split, int device, void* stream) {
  if (M < 1 || (bits != 4 && bits != 3) || (bits == 3 && chunks % 4) || (nt != 64 && nt != 128 && nt != 256) ||
      device < 0 || device >= 64) {
    return -1;
  }
  if (cudaError_t e = use_device(device)) return static_cast<int>(e);
  const void* kernel = nullptr;
  int smem = 0, which = 0;
#define GB_PICK(NT, I)                                                                         \
  if (nt == NT) {                                                                               \
    kernel = bits == 4 ? (const void*)q4_many_rows<NT, 4> : (const void*)q4_many_rows<NT, 3>; \
    smem = many_rows_smem<NT>();                                                                \
    which = 2 * I + (bits == 4);                                                                \
  }
  GB_PICK(64, 0) GB_PICK(128, 1) GB_PICK(256, 2)
#undef GB_PICK
  // Whether this device runs the sm_90a build, and the kernel's shared-memory limit raised: once per device.
  static signed char ready[64][6] = {};  // 0: not looked at yet, 1: ready, -1: this device has no wgmma build
  if (!ready[device][which]) {
    cudaFuncAttributes attr;
    if (cudaError_t e = cudaFuncGetAttributes(&attr, kernel)) return static_cast<int>(e);
    if (attr.binaryVersion != 90) {
      ready[device][which] = -1;
    } else if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem)) {
      return static_cast<int>(e);
    } else {
      ready[device][which] = 1;
    }
  }
  if (ready[device][which] < 0) return -1;  // this device runs another build of the kernel, without wgmma
  int m_pad = (M + nt - 1) / nt * nt;
  const int row_blocks = m_pad / nt, tiles = row_blocks * ((N + kWgCols - 1) / kWgCols);
  if (splits == 1) whole = tiles;
  if (whole < 0 || whole > tiles || splits < 1 || K > kGatherRowsMaxK) return -1;
  auto s = static_cast<cudaStream_t>(stream);
  const int row_bytes = (K + 7) / 8 * 16;
  const bool vec = reinterpret_cast<uintptr_t>(x) % 16 == 0 && ldx % 8 == 0 && K % 8 == 0;
  auto gather = vec ? gather_rows<true> : gather_rows<false>;
  static bool gather_limit_raised[64][2] = {};  // rows of up to kGatherRowsMaxK columns: once per device
  if (row_bytes > 48 * 1024 && !gather_limit_raised[device][vec]) {
    if (cudaError_t e = cudaFuncSetAttribute(gather, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             kGatherRowsMaxK * 2)) {
      return static_cast<int>(e);
    }
    gather_limit_raised[device][vec] = true;
  }
  gather<<<m_pad, 256, row_bytes, s>>>(static_cast<const __half*>(x), ldx, K, static_cast<const int*>(xidx),
                                       static_cast<__half*>(xs), M, m_pad, chunks);
  const unsigned grid = whole + (tiles - whole) * splits;
  const uint4* qw4 = static_cast<const uint4*>(qw);
  const __half2* sz2 = static_cast<const __half2*>(sz);
  const __half* xh = static_cast<const __half*>(xs);
  const __half* b = static_cast<const __half*>(bias);
  __half* o = static_cast<__half*>(out);
  float* wsf = static_cast<float*>(ws);
  void* args[] = {&qw4, &sz2, &xh, &b, &o, &wsf, &M, &N, &chunks, &P, &m_pad, &ldo, &whole, &splits, &per_split};
  // Launched while the gather still runs (programmatic dependent launch): the blocks request their first weights,
  // then wait for the gather's writes (wait_for_inputs) before the first bulk copy of x.
  const LaunchConfig launch(dim3(grid), dim3(kWgThreads), smem, s, GB_PDL);
  if (cudaError_t e = cudaLaunchKernelExC(&launch.cfg, kernel, args)) return static_cast<int>(e);
  if (whole < tiles) {
    const dim3 sum_grid((nt * kWgCols / 4 + 255) / 256, tiles - whole);
    sum_split_tiles<<<sum_grid, 256, 0, s>>>(wsf, whole, splits, nt, row_blocks, M, N, b, o, ldo);
  }
  return static_cast<int>(cudaGetLastError());
}

// floor(n / d) computed as the kernels compute a slot's group (GroupDivider), on the host: for the CPU tests.
unsigned gb_group_of(unsigned n, unsigned d) { return d < 2 ? 0u : GroupDivider::of(d)(n); }

const char* gb_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // extern "C"
