// Bandwidth probes for bench/stream_probe.py: how fast can the q4mma weight words be *read* with the grid and
// load pattern q4_few_rows uses, with no arithmetic? (docs/PERFORMANCE.md: is the decode kernel bound by its
// memory access pattern or by the work between its loads?)
#include <cuda_runtime.h>
#include <stdint.h>

__device__ __forceinline__ uint4 load_once(const uint4* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

// Same indexing as q4_few_rows: block = 4 warps = 4 tiles, grid (column blocks, splits), U chunks a step.
template <int U>
__global__ void __launch_bounds__(128) probe_q4mma(const uint4* __restrict__ qw, uint32_t* __restrict__ sink,
                                                   int tiles, int chunks, int per_split) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int tile = blockIdx.x * 4 + warp;
  const int c_begin = blockIdx.y * per_split, c_end = min(chunks, c_begin + per_split);
  uint32_t acc = 0;
  if (tile < tiles) {
    const uint4* wp = qw + (size_t)tile * chunks * 32 + lane;
    for (int c = c_begin; c < c_end; c += U) {
      uint4 w[U];
#pragma unroll
      for (int u = 0; u < U; ++u) w[u] = c + u < c_end ? load_once(wp + (size_t)(c + u) * 32) : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int u = 0; u < U; ++u) acc ^= w[u].x ^ w[u].y ^ w[u].z ^ w[u].w;
    }
  }
  if (acc == 0x12345678u) sink[0] = acc;  // keeps the loads alive; (almost) never stores
}

// The same bytes by bulk copy (the copy engine) into shared memory, as a decode kernel fed that way would get them:
// each block's lanes 0-3 copy their tile's whole split (per_split <= 16 chunks: <= 8 KB a tile) in pieces of
// `piece` bytes, one mbarrier for all; then the block waits and touches one word.
__global__ void __launch_bounds__(128) probe_bulk(const uint4* __restrict__ qw, uint32_t* __restrict__ sink,
                                                  int tiles, int chunks, int per_split, int piece) {
  extern __shared__ uint4 buf[];
  __shared__ __align__(8) uint64_t bar;
  const int tile0 = blockIdx.x * 4, c_begin = blockIdx.y * per_split, c_end = min(chunks, c_begin + per_split);
  const int n_tiles = min(4, tiles - tile0), bytes = (c_end - c_begin) * 512;
  const uint32_t b = static_cast<uint32_t>(__cvta_generic_to_shared(&bar));
  const uint32_t dst0 = static_cast<uint32_t>(__cvta_generic_to_shared(buf));
  if (threadIdx.x == 0) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(b) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b), "r"(n_tiles * bytes) : "memory");
  }
  __syncthreads();
  if (threadIdx.x < n_tiles) {
    const char* src = reinterpret_cast<const char*>(qw + (size_t)(tile0 + threadIdx.x) * chunks * 32) +
                      (size_t)c_begin * 512;
    for (int o = 0; o < bytes; o += piece) {
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                   ::"r"(dst0 + threadIdx.x * 16 * 512 + o), "l"(src + o), "r"(min(piece, bytes - o)), "r"(b)
                   : "memory");
    }
  }
  asm volatile(
      "{\n.reg .pred done;\nwait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], 0;\n"
      "@!done bra wait_%=;\n}\n" ::"r"(b) : "memory");
  if (buf[threadIdx.x].x == 0x12345678u) sink[0] = 1;
}

extern "C" int probe_bulk_launch(const void* qw, void* sink, int tiles, int chunks, int splits, int per_split,
                                 int piece, void* stream) {
  if (per_split > 16) return -2;
  probe_bulk<<<dim3((tiles + 3) / 4, splits), 128, 4 * 16 * 512, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const uint4*>(qw), static_cast<uint32_t*>(sink), tiles, chunks, per_split, piece);
  return static_cast<int>(cudaGetLastError());
}

extern "C" int probe_q4mma_launch(const void* qw, void* sink, int tiles, int chunks, int splits, int per_split,
                                  int unroll, void* stream) {
  const dim3 grid((tiles + 3) / 4, splits);
  auto s = static_cast<cudaStream_t>(stream);
  auto q = static_cast<const uint4*>(qw);
  auto k = static_cast<uint32_t*>(sink);
  if (unroll == 2) probe_q4mma<2><<<grid, 128, 0, s>>>(q, k, tiles, chunks, per_split);
  else if (unroll == 4) probe_q4mma<4><<<grid, 128, 0, s>>>(q, k, tiles, chunks, per_split);
  else if (unroll == 8) probe_q4mma<8><<<grid, 128, 0, s>>>(q, k, tiles, chunks, per_split);
  else return -2;
  return static_cast<int>(cudaGetLastError());
}
