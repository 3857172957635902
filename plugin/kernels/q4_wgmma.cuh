#pragma once
// gptq-bridge's Hopper kernel for many rows (sm_90a; included by q4_mma.cu, whose helpers and weight layouts it
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
// mma's k (2t, 2t + 1 | 2t + 8, 2t + 9) (q4_mma.cu's header). gather_rows puts x's columns in that order with
// an index made once per layer (cuda_gptq.wgmma_x_index): column 64c + 16j + k of the gathered x is slot
// 64c + 16((k % 8) / 2) + 4j + k % 2 + 2(k / 8); and it stores x tile by tile, swizzled as the descriptors read
// it, so that a stage's x tile is one bulk copy.
//
// A block is kWgGroups warpgroups side by side (64 columns each) over NT rows; the loop walks the 64-slot
// chunks of its split. Everything a chunk needs comes through a ring of kWgStages stages in shared memory,
// kWgAhead chunks ahead: the x tile (one bulk copy, an mbarrier says it landed), and each lane's own weight words
// and scales (cp.async). Each warpgroup's A fragments are double-buffered in registers: while chunk c's four
// wgmmas run, chunk c + 1 is dequantized. Split-K where a grid would leave SMs idle (a small grid, or a partly
// filled last wave): each split writes float32 partials, which sum_split_tiles adds in a fixed order (another
// launch: deterministic).

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GB_WGMMA 1  // this pass compiles for sm_90a: wgmma exists
#else
#define GB_WGMMA 0
#endif

namespace {

constexpr int kWgGroups = 2;  // warpgroups a block, 64 columns (4 tiles) each
constexpr int kWgThreads = 128 * kWgGroups;
constexpr int kWgCols = 64 * kWgGroups;
constexpr int kWgStages = 5;  // ring: chunk c read now, c - 1 maybe still read by wgmma, c + 1 .. c + 3 landing
constexpr int kWgAhead = kWgStages - 2;  // chunks in flight
constexpr int kWgLaneBytes = 16 + 8;  // a stage's per-thread part: weight words (16 bytes), two (scale, zero)s
// A stage: the x tile (NT x 128 bytes), then every thread's weight words (16 bytes each), then its (scale, zero)s.
template <int NT>
__device__ __forceinline__ uint32_t words_at(uint32_t stage) { return stage + NT * 128 + threadIdx.x * 16; }
template <int NT>
__device__ __forceinline__ uint32_t scales_at(uint32_t stage) {
  return stage + NT * 128 + kWgThreads * 16 + threadIdx.x * 8;
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// The x tiles arrive by bulk copy (the async proxy, as wgmma reads them), each stage signalling its mbarrier.
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
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

template <int NT>  // a multiple of 1,024: every stage's x tile stays 1,024-byte aligned
__host__ __device__ constexpr uint32_t stage_bytes() { return NT * 128 + kWgThreads * kWgLaneBytes; }

// Stage `stage` gets chunk c: the x tile (thread 0: one bulk copy of NT x 128 bytes, the gathered x's tile of
// this chunk and row block, already swizzled), then this lane's own weight words (4-bit: one 16-byte piece;
// 3-bit: component c % 4 of its quad's three pieces) and the (scale, 1024 + zero) of its two columns for the group
// of its 16 slots (cp.async: read back by the same thread, after cp.async.wait_group).
template <int NT, int BITS>
__device__ __forceinline__ void load_lane(uint32_t stage, const uint4* wp, const __half2* sz, int N, int P, int col,
                                          int t, int c, bool has_tile) {
  if (!has_tile) return;
  const uint32_t mine = words_at<NT>(stage);
  if (BITS == 4) {
    cp_async16(mine, wp + (size_t)c * 32);
  } else {
    const uint32_t* q = reinterpret_cast<const uint32_t*>(wp + (size_t)(c >> 2) * 96) + (c & 3);
#pragma unroll
    for (int i = 0; i < 3; ++i) cp_async4(mine + 4 * i, q + 4 * 32 * i);
  }
  const size_t grp = (size_t)(c * 64 + 16 * t) / P;
  cp_async4(scales_at<NT>(stage), sz + grp * N + col);
  cp_async4(scales_at<NT>(stage) + 4, sz + grp * N + col + 8);
}

template <int NT, int BITS>
__device__ __forceinline__ void load_stage(uint32_t stage, uint32_t bar, const __half* __restrict__ x_tile,
                                           const uint4* wp, const __half2* sz, int N, int P, int col, int t, int c,
                                           bool has_tile) {
  if (threadIdx.x == 0) bulk_copy(stage, x_tile, NT * 128, bar);
  load_lane<NT, BITS>(stage, wp, sz, N, P, col, t, c, has_tile);
}

// This lane's A fragments for the chunk in `stage` (4 k-steps x 4 registers), dequantized as q4_few_rows does.
template <int NT, int BITS>
__device__ __forceinline__ void dequant_stage(uint32_t (&a)[4][4], uint32_t stage) {
  uint32_t w[4], s0r, s8r;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3]) : "r"(words_at<NT>(stage)));
  asm volatile("ld.shared.v2.u32 {%0,%1}, [%2];" : "=r"(s0r), "=r"(s8r) : "r"(scales_at<NT>(stage)));
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
  const int g = lane >> 2, t = lane & 3;
  const int row_blocks = Mpad / NT, tiles = row_blocks * ((N + kWgCols - 1) / kWgCols);
  const bool split = (int)blockIdx.x >= whole;
  const int item = blockIdx.x - whole;  // split tiles: tile whole + item % (tiles - whole), split item / (...)
  const int out_tile = split ? whole + item % (tiles - whole) : blockIdx.x;
  const int z = split ? item / (tiles - whole) : 0;
  const int tile = out_tile / row_blocks * (kWgCols / 16) + warp;  // warp w of a warpgroup: its rows 16w ..
  const bool has_tile = tile < (N >> 4);
  const int col = tile * 16 + g;
  const int m0 = out_tile % row_blocks * NT;
  const uint4* wp = qw + (size_t)tile * chunks * 8 * BITS + lane;
  const int c_begin = split ? z * per_split : 0, c_end = split ? min(chunks, c_begin + per_split) : chunks;
  auto stage_of = [&](int c) { return ring + ((c - c_begin) % kWgStages) * kStage; };
  __shared__ __align__(8) uint64_t full[kWgStages];  // stage s's x tile has landed (phase: its use count % 2)
  const uint32_t bar0 = static_cast<uint32_t>(__cvta_generic_to_shared(full));
  auto bar_of = [&](int c) { return bar0 + ((c - c_begin) % kWgStages) * 8; };
  auto x_tile = [&](int c) { return x + ((size_t)c * Mpad + m0) * 64; };
  if (threadIdx.x == 0) {
    for (int s = 0; s < kWgStages; ++s) mbar_init(bar0 + 8 * s, 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  float acc[NT / 2];
#pragma unroll
  for (int i = 0; i < NT / 2; ++i) acc[i] = 0.f;
  // The first chunks' weights are requested before the wait for the gather's x (programmatic dependent launch:
  // this grid may start while gather_rows still runs).
#pragma unroll
  for (int d = 0; d < kWgAhead; ++d) {
    const int c = c_begin + d;
    if (c < c_end) load_lane<NT, BITS>(stage_of(c), wp, sz, N, P, col, t, c, has_tile);
    cp_async_commit();
  }
  wait_for_inputs();
  if (threadIdx.x == 0) {
    for (int c = c_begin; c < min(c_end, c_begin + kWgAhead); ++c) {
      bulk_copy(stage_of(c), x_tile(c), NT * 128, bar_of(c));
    }
  }
  uint32_t a[2][4][4] = {};
  cp_async_wait<kWgAhead - 1>();  // this lane's part of the first chunk has landed
  if (has_tile) dequant_stage<NT, BITS>(a[0], stage_of(c_begin));
  for (int c0 = c_begin; c0 < c_end; c0 += 2) {
#pragma unroll
    for (int u = 0; u < 2; ++u) {  // two chunks a pass: the A buffer a chunk reads is known at compile time
      const int c = c0 + u;
      if (c < c_end) {  // the same for the whole block: the barrier stays uniform
        // Every warpgroup is done with chunk c - 2's stage, which chunk c + kWgAhead now gets. (Measured and not
        // kept: handing stages back by an mbarrier instead, 2-12% slower; a third A buffer, dequantizing before
        // the wait, slower too. docs/PERFORMANCE.md.)
        __syncthreads();
        const int cn = c + kWgAhead;
        if (cn < c_end) load_stage<NT, BITS>(stage_of(cn), bar_of(cn), x_tile(cn), wp, sz, N, P, col, t, cn, has_tile);
        cp_async_commit();
        mbar_wait(bar_of(c), ((c - c_begin) / kWgStages) & 1);  // chunk c's x tile has landed
        const uint64_t desc = x_desc(stage_of(c));
        wgmma_fence();
#pragma unroll
        for (int j = 0; j < 4; ++j) wgmma<NT>(acc, a[u][j], desc + 2 * j);
        wgmma_commit();
        cp_async_wait<kWgAhead - 1>();  // this thread's part of chunk c + 1 has landed
        wgmma_wait<1>();                // chunk c - 1's wgmmas are done: its A registers may be written
        if (has_tile && c + 1 < c_end) dequant_stage<NT, BITS>(a[u ^ 1], stage_of(c + 1));
      }
    }
  }
  wgmma_wait<0>();
  pin(acc);

  // acc[4i + e]: column col + 8 (e / 2), row m0 + 8i + 2t + e % 2
  if (!split) {
    if (!has_tile) return;
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
  if (!has_tile) return;
  float* part = ws + ((size_t)(out_tile - whole) * splits + z) * NT * kWgCols + (col % kWgCols);
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
