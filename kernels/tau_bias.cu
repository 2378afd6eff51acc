// tau-bias's topological prior, fused, for sm_90: the additive attention bias B_ij = −α_h·|λq_i − λk_j| (−inf where key
// j is after query i) written once in bf16 for SDPA, and its backward, which reads SDPA's bias gradient G once:
//   dλq_i = −α Σ_j G_ij s_ij,  dλk_j = α Σ_i G_ij s_ij,  dα_h = −Σ G_ij |λq_i − λk_j|,  s = sign(λq_i − λk_j).
// ATen spends five fp32 T×T passes on the forward and more on the backward. fp32 arithmetic; masked entries get no
// gradient, and sign(0) = 0, as torch's abs.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cmath>
#include <cstdint>
#include "launchers.h"

namespace {
using bf16 = __nv_bfloat16;
constexpr int NT = 256;         // threads a block, across keys
constexpr int ROWS = 32;        // query rows a backward block: its keys' column sums take one atomic a key a tile
constexpr unsigned FULL = 0xffffffffu;

__device__ inline float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(FULL, x, o);
  return x;
}

// One block a query row r = bh·tq + i; the queries are the last tq of tk positions.
__global__ void __launch_bounds__(NT) bias_forward(const float* __restrict__ lq, const float* __restrict__ lk, const float* __restrict__ alpha,
                                                   bf16* __restrict__ out, int heads, int tq, int tk) {
  const int64_t row = blockIdx.x, bh = row / tq;
  const int last = static_cast<int>(row % tq) + (tk - tq);  // the last key this query sees
  const float x = lq[row], a = alpha[bh % heads];
  const float* y = lk + bh * tk;
  bf16* o = out + row * tk;
  for (int j = threadIdx.x; j < tk; j += NT) o[j] = __float2bfloat16(j <= last ? -a * fabsf(x - y[j]) : -INFINITY);
}

// One block a (bh, tile of ROWS query rows); thread t takes keys j ≡ t (mod NT), all rows of the tile for each.
__global__ void __launch_bounds__(NT) bias_backward(const float* __restrict__ lq, const float* __restrict__ lk, const float* __restrict__ alpha,
                                                    const bf16* __restrict__ g, float* __restrict__ dlq, float* __restrict__ dlk,
                                                    float* __restrict__ dalpha, int heads, int tq, int tk) {
  __shared__ float sx[ROWS], srow[ROWS], sabs;
  const int tiles = (tq + ROWS - 1) / ROWS;
  const int64_t bh = blockIdx.x / tiles;
  const int i0 = static_cast<int>(blockIdx.x % tiles) * ROWS, rows = min(ROWS, tq - i0), off = tk - tq;
  const float a = alpha[bh % heads];
  if (threadIdx.x < ROWS) {
    sx[threadIdx.x] = threadIdx.x < rows ? lq[bh * tq + i0 + threadIdx.x] : 0.f;
    srow[threadIdx.x] = 0.f;
  }
  if (threadIdx.x == 0) sabs = 0.f;
  __syncthreads();
  float racc[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) racc[r] = 0.f;
  float aacc = 0.f;
  const int jend = min(tk, i0 + rows + off);  // past the last key any row of the tile sees
  const bf16* gt = g + (bh * tq + i0) * static_cast<int64_t>(tk);
  for (int j = threadIdx.x; j < jend; j += NT) {
    const float y = lk[bh * tk + j];
    float col = 0.f;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      if (r < rows && j <= i0 + r + off) {
        const float d = sx[r] - y, gv = __bfloat162float(gt[r * static_cast<int64_t>(tk) + j]);
        const float gs = d > 0.f ? gv : (d < 0.f ? -gv : 0.f);
        racc[r] += gs;
        col += gs;
        aacc += gv * fabsf(d);
      }
    }
    atomicAdd(dlk + bh * tk + j, a * col);
  }
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const float v = warp_sum(racc[r]);
    if ((threadIdx.x & 31) == 0) atomicAdd(&srow[r], v);
  }
  aacc = warp_sum(aacc);
  if ((threadIdx.x & 31) == 0) atomicAdd(&sabs, aacc);
  __syncthreads();
  if (threadIdx.x < rows) dlq[bh * tq + i0 + threadIdx.x] = -a * srow[threadIdx.x];
  if (threadIdx.x == 0) atomicAdd(dalpha + bh % heads, -sabs);
}
}  // namespace

// out [BH, Tq, Tk] bf16 from lq [BH, Tq], lk [BH, Tk], alpha [heads] (fp32, contiguous), bh = B·heads.
extern "C" int tg_tau_bias_forward(const float* lq, const float* lk, const float* alpha, void* out, int bh, int heads, int tq, int tk, cudaStream_t st) {
  bias_forward<<<static_cast<unsigned>(static_cast<int64_t>(bh) * tq), NT, 0, st>>>(lq, lk, alpha, static_cast<bf16*>(out), heads, tq, tk);
  return static_cast<int>(cudaGetLastError());
}

// dlq [BH, Tq] (written), dlk [BH, Tk] and dalpha [heads] (added to: pass zeros) from g [BH, Tq, Tk] bf16.
extern "C" int tg_tau_bias_backward(const float* lq, const float* lk, const float* alpha, const void* g, float* dlq, float* dlk, float* dalpha, int bh,
                                    int heads, int tq, int tk, cudaStream_t st) {
  const int64_t blocks = static_cast<int64_t>(bh) * ((tq + ROWS - 1) / ROWS);
  bias_backward<<<static_cast<unsigned>(blocks), NT, 0, st>>>(lq, lk, alpha, static_cast<const bf16*>(g), dlq, dlk, dalpha, heads, tq, tk);
  return static_cast<int>(cudaGetLastError());
}
