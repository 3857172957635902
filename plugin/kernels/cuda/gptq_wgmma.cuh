#pragma once
// gptq-bridge's Hopper kernel for many rows (sm_90a; included by gptq_mma.cu, whose helpers and weight layouts it
// uses): out[m, n] = sum_k x[m, k] w[k, n] with warpgroup MMA (wgmma), computed transposed as q4_few_rows does:
// wgmma m64nNk16's A side (64 output columns, from registers) is the dequantized weight, its N side (NT rows of
// x) comes from shared memory.
//
// Why the weight is A: a warpgroup's A fragments are per warp exactly mma.sync m16n8k16's, so each of its four
// warps dequantizes one 16-column tile of the q4mma / q3mma layout as q4_few_rows does, straight into the
// registers wgmma reads; no dequantized weight is ever stored. x is float16 already and goes global -> shared
// memory by bulk copy, in the 128-byte-swizzled K-major layout wgmma's descriptors read.
//
// x must be in wgmma's k order: the layout's k-tile j of a chunk holds slots 16t + 4j + (0, 1 | 2, 3) at the
// mma's k (2t, 2t + 1 | 2t + 8, 2t + 9) (gptq_mma.cu's header). gather_rows puts x's columns in that order with
// an index made once per layer (cuda_gptq.wgmma_x_index): column 64c + 16j + k of the gathered x is slot
// 64c + 16((k % 8) / 2) + 4j + k % 2 + 2(k / 8); and it stores x tile by tile, swizzled as the descriptors read
// it, so that a stage's x tile is one bulk copy.
//
// A block is kWgGroups math warpgroups side by side (64 columns each) over NT rows, and a producer warpgroup;
// the loop walks the 64-slot chunks of its split. Everything a chunk needs comes through a ring of kWgStages
// stages in shared memory, copied by the producer up to kWgStages chunks ahead: the x tile (one bulk copy), each
// math lane's weight words and the (scale, zero) rows of the chunk's groups (cp.async); an mbarrier per stage
// says it is full, another that every math warp is done with it. Each warpgroup's A fragments are
// double-buffered in registers: while chunk c's four wgmmas run, chunk c + 1 is dequantized. Split-K where a
// grid would leave SMs idle (a small grid, or a partly filled last wave): each split writes float32 partials,
// which sum_split_tiles adds in a fixed order (another launch: deterministic).

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GB_WGMMA 1  // this pass compiles for sm_90a: wgmma exists
#else
#define GB_WGMMA 0
#endif

namespace {

constexpr int kWgGroups = 2;  // warpgroups of math a block, 64 columns (4 tiles) each
constexpr int kWgMathThreads = 128 * kWgGroups;
constexpr int kWgThreads = kWgMathThreads + 128;  // + a producer warpgroup, whose four warps issue every copy
// (registers are given out by warpgroup; setmaxnreg moves most of the producer's to the math)
constexpr int kWgCols = 64 * kWgGroups;
constexpr int kWgStages = 5;  // ring of stages: a chunk each, filled up to kWgStages chunks ahead
constexpr int kWgScaleRow = kWgCols * 4 + 32;  // a stage's (scale, zero) row of the block's columns; + 32: no bank
                                               // conflict between the four rows a warp reads at once
// A stage: the x tile (NT x 128 bytes), every math thread's weight words (16 bytes each), then four rows of
// (scale, 1024 + zero) for the block's columns, row t for the group of slots 16t .. 16t + 15 of the chunk.
// Rounded up to 1,024 bytes, so that every stage's x tile is 1,024-byte aligned (the swizzle's atom).
template <int NT>
__host__ __device__ constexpr uint32_t stage_bytes() {
  return (NT * 128 + kWgMathThreads * 16 + 4 * kWgScaleRow + 1023) / 1024 * 1024;
}
template <int NT>
__device__ __forceinline__ uint32_t words_at(uint32_t stage, int thread) { return stage + NT * 128 + thread * 16; }
template <int NT>
__device__ __forceinline__ uint32_t scale_row_at(uint32_t stage, int t) {
  return stage + NT * 128 + kWgMathThreads * 16 + t * kWgScaleRow;
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src) : "memory");
}

// The x tiles arrive by bulk copy (the async proxy, as wgmma reads them), each stage signalling its mbarrier.
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
// One arrival on `bar` once every cp.async this thread has issued so far has landed (counted in the init count).
__device__ __forceinline__ void mbar_arrive_after_cp_async(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nwait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n}\n" ::"r"(bar), "r"(parity) : "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory"); }

// Keeps the compiler from reading an accumulator before the wgmma that writes it has been waited for.
template <int R>
__device__ __forceinline__ void pin(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Shared-memory matrix descriptor of an x tile: K-major, 128-byte swizzle (rows of 64 halves, 8-row atoms of
// 1,024 bytes: stride 1,024), tile 1,024-byte aligned. k-step j of the tile starts 32j bytes in: desc + 2j.
__device__ __forceinline__ uint64_t x_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (1ull << 16) | (static_cast<uint64_t>(1024 >> 4) << 32) |
         (1ull << 62);
}

// d[64 x NT] += a[64 x 16] (registers, each warp its 16 rows as mma.sync's A) * b[16 x NT] (shared memory): one
// instruction at the three widths the kernel uses, each written out because inline asm names every accumulator.
__device__ __forceinline__ void wgmma_n64(float (&d)[32], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
}

__device__ __forceinline__ void wgmma_n128(float (&d)[64], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
}

__device__ __forceinline__ void wgmma_n256(float (&d)[128], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
      "}, {%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
}

template <int NT>
__device__ __forceinline__ void wgmma(float (&d)[NT / 2], const uint32_t (&a)[4], uint64_t desc) {
  if constexpr (NT == 64) wgmma_n64(d, a, desc);
  else if constexpr (NT == 128) wgmma_n128(d, a, desc);
  else wgmma_n256(d, a, desc);
}

// The position of a chunk in the ring, walked one chunk at a time (no division in the loops).
struct RingPos {
  int stage = 0;
  uint32_t phase = 0;  // parity of the stage's use count: the mbarrier phase its chunk completes
  __device__ __forceinline__ void next() {
    if (++stage == kWgStages) {
      stage = 0;
      phase ^= 1;
    }
  }
};

// Producer warp pw (0..3) of the block whose first 16-column tile is tile0 (n_tiles of its 8 exist): for each
// chunk, the weight words of tiles 2pw and 2pw + 1 (this lane's piece of each: 4-bit one 16-byte piece, 3-bit
// component c % 4 of its three pieces, written where math thread 32w + lane reads them), and 16 bytes of (scale,
// zero) row pw (the group of the chunk's slots 16pw ..). One arrival on the stage's `full` once they have landed.
template <int BITS>
struct WeightCopier {
  const uint4* wp[2];  // this lane's words of the two tiles, chunk 0
  const __half2* sp;   // this lane's 4 columns of the scale rows
  int tiles_here, has_scales, slot, next_group, P, N;
  size_t group;

  __device__ __forceinline__ WeightCopier(const uint4* qw, const __half2* sz, int N_, int P_, int chunks, int tile0,
                                          int n_tiles, int pw, int lane, int c_begin) {
    tiles_here = min(2, n_tiles - 2 * pw);
#pragma unroll
    for (int i = 0; i < 2; ++i) wp[i] = qw + (size_t)(tile0 + 2 * pw + i) * chunks * 8 * BITS + lane;
    has_scales = 4 * lane < n_tiles * 16;
    sp = sz + tile0 * 16 + 4 * lane;
    N = N_;
    P = P_;
    slot = c_begin * 64 + 16 * pw;
    group = slot / P;
    next_group = (group + 1) * P;
  }

  template <int NT>
  __device__ __forceinline__ void copy(uint32_t stage, uint32_t full, int pw, int lane, int c) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (i < tiles_here) {
        const uint32_t dst = words_at<NT>(stage, 32 * (2 * pw + i) + lane);
        if (BITS == 4) {
          cp_async16(dst, wp[i] + (size_t)c * 32);
        } else {
          const uint32_t* q = reinterpret_cast<const uint32_t*>(wp[i] + (size_t)(c >> 2) * 96) + (c & 3);
#pragma unroll
          for (int k = 0; k < 3; ++k) cp_async4(dst + 4 * k, q + 4 * 32 * k);
        }
      }
    }
    if (has_scales) cp_async16(scale_row_at<NT>(stage, pw) + 16 * lane, sp + group * N);
    mbar_arrive_after_cp_async(full);
    for (slot += 64; slot >= next_group; next_group += P) ++group;  // the group of the next chunk's row pw
  }
};

// This lane's A fragments for the chunk in `stage` (4 k-steps x 4 registers), dequantized as q4_few_rows does.
// c16: the lane's column within the block (its columns c16 and c16 + 8), t: its quarter of the chunk's slots.
template <int NT, int BITS>
__device__ __forceinline__ void dequant_stage(uint32_t (&a)[4][4], uint32_t stage, int c16, int t) {
  uint32_t w[4], s0r, s8r;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3]) : "r"(words_at<NT>(stage, threadIdx.x)));
  const uint32_t row = scale_row_at<NT>(stage, t) + 4 * c16;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(s0r) : "r"(row));
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(s8r) : "r"(row + 32));
  if (BITS == 3) w[3] = 0;
  const __half2 sz0 = *reinterpret_cast<__half2*>(&s0r), sz8 = *reinterpret_cast<__half2*>(&s8r);
  const __half2 s0 = __low2half2(sz0), z0 = __high2half2(sz0), s8 = __low2half2(sz8), z8 = __high2half2(sz8);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    a[j][0] = dequant_raw(raw_pair<BITS>(w, j, 0), z0, s0);
    a[j][1] = dequant_raw(raw_pair<BITS>(w, j, 1), z8, s8);
    a[j][2] = dequant_raw(raw_pair<BITS>(w, j, 2), z0, s0);
    a[j][3] = dequant_raw(raw_pair<BITS>(w, j, 3), z8, s8);
  }
}

// Tiles: NT rows x kWgCols columns, numbered with the row block fastest (the blocks sharing a column block's
// weights run together). The grid is one-dimensional: tiles 0 .. whole - 1 a block each, over all chunks; the
// rest ("split" tiles) `splits` blocks each, per_split chunks apiece, writing float32 partials into ws (the
// split tile's slot, [NT][kWgCols] floats a split) for sum_split_tiles. whole = 0 splits a small grid
// throughout; whole = tiles - (tiles % SMs) splits only what would be a partly filled last wave.
// x: gather_rows' layout, [chunks][Mpad][64] (Mpad: M rounded up to NT).
//
// Warp-specialized: a third warpgroup (the producer) issues every copy, up to kWgStages chunks ahead, and waits
// for a stage to be handed back (`empty`) before it refills it; the two math warpgroups only wait for a stage to
// be full, dequantize, run wgmma and hand stages back. (The version before, where each math thread copied its own
// words and the warpgroups met at a block barrier every chunk, spent ~1,560 cycles a chunk issuing ~230
// instructions a warp for 1,024 cycles of tensor work: docs/PERFORMANCE.md.)
template <int NT, int BITS>
__global__ void __launch_bounds__(kWgThreads, 1) q4_many_rows(
    const uint4* __restrict__ qw, const __half2* __restrict__ sz, const __half* __restrict__ x,
    const __half* __restrict__ bias, __half* __restrict__ out, float* __restrict__ ws, int M, int N, int chunks,
    int P, int Mpad, int ldo, int whole, int splits, int per_split) {
#if GB_WGMMA
  extern __shared__ uint8_t wg_smem[];
  constexpr uint32_t kStage = stage_bytes<NT>();
  const uint32_t ring = (static_cast<uint32_t>(__cvta_generic_to_shared(wg_smem)) + 1023) & ~1023u;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row_blocks = Mpad / NT, tiles = row_blocks * ((N + kWgCols - 1) / kWgCols);
  const bool split = (int)blockIdx.x >= whole;
  const int item = blockIdx.x - whole;  // split tiles: tile whole + item % (tiles - whole), split item / (...)
  const int out_tile = split ? whole + item % (tiles - whole) : blockIdx.x;
  const int z = split ? item / (tiles - whole) : 0;
  const int tile0 = out_tile / row_blocks * (kWgCols / 16);  // the block's first 16-column tile
  const int m0 = out_tile % row_blocks * NT;
  const int c_begin = split ? z * per_split : 0, c_end = split ? min(chunks, c_begin + per_split) : chunks;
  // full[s]: stage s holds its chunk (the x tile's bytes + the 4 x 32 producer lanes' copies); empty[s]: each
  // math warp is done with it.
  __shared__ __align__(8) uint64_t bars[2 * kWgStages];
  const uint32_t full0 = static_cast<uint32_t>(__cvta_generic_to_shared(bars)), empty0 = full0 + 8 * kWgStages;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kWgStages; ++s) {
      mbar_init(full0 + 8 * s, 4 * 32 + 1);
      mbar_init(empty0 + 8 * s, kWgMathThreads / 32);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp >= kWgMathThreads / 32) {  // the producer warpgroup
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    const int pw = warp - kWgMathThreads / 32;
    WeightCopier<BITS> copier(qw, sz, N, P, chunks, tile0, min(kWgCols / 16, (N >> 4) - tile0), pw, lane, c_begin);
    const int first = min(c_end, c_begin + kWgStages);
    // The first stages' weights are requested before the wait for the gather's x (programmatic dependent launch:
    // this grid may start while gather_rows still runs).
    RingPos pos;
    for (int c = c_begin; c < first; ++c, pos.next()) {
      copier.template copy<NT>(ring + pos.stage * kStage, full0 + 8 * pos.stage, pw, lane, c);
    }
    if (pw == 0 && lane == 0) {
      wait_for_inputs();
      for (int c = c_begin; c < first; ++c) {  // the first kWgStages chunks sit in stages 0, 1, ...
        const int st = c - c_begin;
        bulk_copy(ring + st * kStage, x + ((size_t)c * Mpad + m0) * 64, NT * 128, full0 + 8 * st);
      }
    }
    for (int c = first; c < c_end; ++c, pos.next()) {
      const uint32_t stage = ring + pos.stage * kStage, full = full0 + 8 * pos.stage;
      mbar_wait(empty0 + 8 * pos.stage, pos.phase ^ 1);  // the math warps are done with chunk c - kWgStages
      copier.template copy<NT>(stage, full, pw, lane, c);
      if (pw == 0 && lane == 0) bulk_copy(stage, x + ((size_t)c * Mpad + m0) * 64, NT * 128, full);
    }
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
  const int g = lane >> 2, t = lane & 3;
  const int c16 = warp * 16 + g;  // the lane's first column within the block
  const bool has_tile = tile0 + warp < (N >> 4);
  const int col = tile0 * 16 + c16;
  float acc[NT / 2];
#pragma unroll
  for (int i = 0; i < NT / 2; ++i) acc[i] = 0.f;
  uint32_t a[2][4][4] = {};
  RingPos pos, prev;  // chunk c's place in the ring, and chunk c - 1's
  mbar_wait(full0, 0);
  if (has_tile) dequant_stage<NT, BITS>(a[0], ring, c16, t);
  for (int c0 = c_begin; c0 < c_end; c0 += 2) {
#pragma unroll
    for (int u = 0; u < 2; ++u) {  // two chunks a pass: the A buffer a chunk reads is known at compile time
      const int c = c0 + u;
      if (c < c_end) {
        const uint64_t desc = x_desc(ring + pos.stage * kStage);
        wgmma_fence();
#pragma unroll
        for (int j = 0; j < 4; ++j) wgmma<NT>(acc, a[u][j], desc + 2 * j);
        wgmma_commit();
        wgmma_wait<1>();  // chunk c - 1's wgmmas are done: its stage and A registers are free
        if (c > c_begin && lane == 0) mbar_arrive(empty0 + 8 * prev.stage);
        prev = pos;
        pos.next();
        if (c + 1 < c_end) {
          mbar_wait(full0 + 8 * pos.stage, pos.phase);
          if (has_tile) dequant_stage<NT, BITS>(a[u ^ 1], ring + pos.stage * kStage, c16, t);
        }
      }
    }
  }
  wgmma_wait<0>();
  pin(acc);

  // acc[4i + e]: column col + 8 (e / 2), row m0 + 8i + 2t + e % 2
  if (!has_tile) return;
  if (!split) {
    const float b0 = bias ? __half2float(bias[col]) : 0.f, b8 = bias ? __half2float(bias[col + 8]) : 0.f;
#pragma unroll
    for (int i = 0; i < NT / 8; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = m0 + 8 * i + 2 * t + (e & 1);
        if (m < M) out[(size_t)m * ldo + col + (e >> 1) * 8] = __float2half(acc[4 * i + e] + (e >> 1 ? b8 : b0));
      }
    }
    return;
  }
  float* part = ws + ((size_t)(out_tile - whole) * splits + z) * NT * kWgCols + c16;
#pragma unroll
  for (int i = 0; i < NT / 8; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) part[(8 * i + 2 * t + (e & 1)) * kWgCols + (e >> 1) * 8] = acc[4 * i + e];
  }
#endif
}

// x for q4_many_rows: xs[c][m][...] holds row m's 64 columns of chunk c in wgmma k order (idx: slot order ->
// input column, -1 for pad slots) as 8 16-byte pieces, piece p at p ^ (m % 8): each (chunk, row block) tile is
// one contiguous, already swizzled block, which one bulk copy brings into shared memory. Rows M .. Mpad: zeros.
// A block a row: the row is first read once, coalesced, into shared memory (K halves), and the pieces are
// gathered from there, so act-order's random columns cost shared-memory reads instead of a 32-byte L2 sector a
// value (measured: 3-27 us a call at m = 512 against up to 71). K up to kGatherRowsMaxK. VEC: x's rows are
// 16-byte aligned and K a multiple of 8 (16-byte loads).
constexpr int kGatherRowsMaxK = 96 * 1024;  // 192 KB of shared memory (cuda_gptq.WGMMA_MAX_IN_FEATURES)
template <bool VEC>
__global__ void __launch_bounds__(256) gather_rows(const __half* __restrict__ x, int ldx, int K,
                                                   const int* __restrict__ idx, __half* __restrict__ xs, int M,
                                                   int Mpad, int chunks) {
  extern __shared__ uint4 row_smem[];
  __half* row = reinterpret_cast<__half*>(row_smem);
  const int m = blockIdx.x;
  let_dependents_launch();  // q4_many_rows may start now: it waits for these writes before it reads them
  if (m < M) {
    const __half* src = x + (size_t)m * ldx;
    if (VEC) {
#pragma unroll 4
      for (int k = threadIdx.x; k < K / 8; k += blockDim.x) row_smem[k] = reinterpret_cast<const uint4*>(src)[k];
    } else {
#pragma unroll 8
      for (int k = threadIdx.x; k < K; k += blockDim.x) row[k] = src[k];
    }
  }
  __syncthreads();
#pragma unroll 2
  for (int p = threadIdx.x; p < chunks * 8; p += blockDim.x) {
    const int c = p >> 3, piece = p & 7;
    const int4 k0 = reinterpret_cast<const int4*>(idx)[2 * p], k1 = reinterpret_cast<const int4*>(idx)[2 * p + 1];
    const int ks[8] = {k0.x, k0.y, k0.z, k0.w, k1.x, k1.y, k1.z, k1.w};
    __align__(16) __half v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = m < M && ks[e] >= 0 ? row[ks[e]] : __float2half(0.f);
    *reinterpret_cast<uint4*>(xs + ((size_t)c * Mpad + m) * 64 + ((piece ^ (m & 7)) << 3)) =
        *reinterpret_cast<const uint4*>(v);
  }
}

// After q4_many_rows with split tiles: each split tile's outputs are the sum of its splits' partials in split
// order (+ bias), four columns a thread. Grid: (tile rows x kWgCols / 4 / 256, split tiles).
__global__ void sum_split_tiles(const float* __restrict__ ws, int whole, int splits, int NT, int row_blocks, int M,
                                int N, const __half* __restrict__ bias, __half* __restrict__ out, int ldo) {
  const int e = (blockIdx.x * blockDim.x + threadIdx.x) * 4;  // within the tile: row e / kWgCols, column e % ..
  if (e >= NT * kWgCols) return;
  const int out_tile = whole + blockIdx.y;
  const int m = out_tile % row_blocks * NT + e / kWgCols, n = out_tile / row_blocks * kWgCols + e % kWgCols;
  if (m >= M || n >= N) return;
  const float* part = ws + (size_t)blockIdx.y * splits * NT * kWgCols + e;
  float4 s = __ldcg(reinterpret_cast<const float4*>(part));
  for (int z = 1; z < splits; ++z) {
    const float4 p = __ldcg(reinterpret_cast<const float4*>(part + (size_t)z * NT * kWgCols));
    s.x += p.x; s.y += p.y; s.z += p.z; s.w += p.w;
  }
  if (bias) {
    s.x += __half2float(bias[n]); s.y += __half2float(bias[n + 1]);
    s.z += __half2float(bias[n + 2]); s.w += __half2float(bias[n + 3]);
  }
  const __half2 lo = __floats2half2_rn(s.x, s.y), hi = __floats2half2_rn(s.z, s.w);
  uint2 v;
  v.x = *reinterpret_cast<const uint32_t*>(&lo);
  v.y = *reinterpret_cast<const uint32_t*>(&hi);
  *reinterpret_cast<uint2*>(out + (size_t)m * ldo + n) = v;
}

template <int NT>
constexpr int many_rows_smem() { return kWgStages * stage_bytes<NT>() + 1024; }  // + 1,024: the ring's alignment

}  // namespace
