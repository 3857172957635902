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
