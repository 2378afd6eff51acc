// Fused tau attention for sm_90, bf16 V: s_ij = −|λq_i − λk_j|·inv_temp[h], causal (bottom-right when Tq < Tk: query i
// sees keys j ≤ i + Tk − Tq), softmax in fp32, probabilities rounded to bf16, times V. Nothing Tq×Tk reaches global
// memory. A score is a function of two scalars, so no Q·Kᵀ product: each thread makes its scores straight in the
// register layout of the tensor-core (mma.sync m16n8k16) operand that consumes them, as FlashAttention-2 reuses its
// accumulators.
//   forward:  a block is 64 query rows (16 a warp) of one (batch, head). A cheap first pass over λk bounds each row's
//             max score (the nearest visible λk) tightly enough that exp(s − bound) neither overflows nor vanishes;
//             then, tile by tile of 64 keys (V double-buffered by cp.async), p̃ = exp(s − bound), rounded to bf16,
//             times V on tensor cores, with no online rescaling; out = Σ p̃·V / Σ p̃. Each row keeps its shift and
//             1/Σ p̃ for the backward.
//   backward: a block is 64 keys (16 a warp) looping over the query tiles that see them (dout double-buffered).
//             dPᵀ = V·doutᵀ and dV += Pᵀ·dout on tensor cores, P recomputed as the forward used it (bf16(p̃)/Σ p̃), so
//             that Δ_i = dout_i·out_i is exactly Σ_j P_ij dP_ij and each row of dS = P∘(dP − Δ) sums to zero (with the
//             unrounded P, dinv_temp's small sum over mostly cancelling pairs is off by 1% at D = 128). dλk, dλq and
//             dinv_temp are sums of dS·sign or dS·|λq − λk| (no dQ·K-style products: the keys are scalars).
// V, dout, out and dV are [B, H, T, D] with any strides but D's (q, k, v are views of one [B, T, H, D] buffer).
// Plain C ABI: kernels/ext.cpp owns the tensors, the checks and the stream.
#include "mma_bf16.cuh"
#include "launchers.h"

namespace {
using namespace tg;
using bf16 = __nv_bfloat16;
constexpr int WARPS = 4;
constexpr int NT = 32 * WARPS;  // threads a block
constexpr int TILE = 16 * WARPS;  // a block's own rows (queries forward, keys backward), and the tiles it loops over
constexpr unsigned FULL = 0xffffffffu;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float SPAN = 64.f;  // log2 units: the forward's p̃ of a row's nearest key stays above 2^−SPAN (fp32 normals reach 2^−126)
template <int D> constexpr int PITCH = D + 8;  // bf16 a shared-memory row: 16 bytes of padding put ldmatrix's 8 rows in 8 bank groups

struct Strides {  // element strides of b, h and t in a [B, H, T, D] tensor whose D is contiguous
  int64_t b, h, t;
  __device__ int64_t base(int bh, int heads) const { return (bh / heads) * b + (bh % heads) * h; }
};

__device__ inline float ex2(float x) {  // 2^x, one MUFU op (2 ulp)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
// s·sign(x), sign(0) = 0 as abs's backward: s with x's sign bit xored in
__device__ inline float signed_by(float s, float x) { return x != 0.f ? __int_as_float(__float_as_int(s) ^ (__float_as_int(x) & 0x80000000)) : 0.f; }
__device__ inline uint32_t saddr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// Asynchronous copies into shared memory; an invalid source copies nothing and zero-fills (src stays a valid address).
__device__ inline void cp16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(saddr(dst)), "l"(src), "r"(valid ? 16 : 0));
}
__device__ inline void cp4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(saddr(dst)), "l"(src), "r"(valid ? 4 : 0));
}
__device__ inline void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ inline void cp_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

// Four 8×8 bf16 matrices from shared memory; lane l gives the address of row l % 8 of matrix l / 8.
__device__ inline void ldsm(uint32_t (&r)[4], const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(saddr(p)));
}
__device__ inline void ldsm_t(uint32_t (&r)[4], const bf16* p) {  // transposed
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(saddr(p)));
}
// B fragments of two 8-column tiles (n, n + 8) for k rows k0..k0+15 of a row-major [k][n] matrix in shared memory:
// {b0, b1} of columns n..n+7, then of n+8..n+15.
template <int D> __device__ inline void ldsm_b_kn(uint32_t (&r)[4], const bf16* s, int k0, int n0) {
  const int l = threadIdx.x % 32, m = l / 8;
  ldsm_t(r, s + (k0 + (m & 1) * 8 + l % 8) * PITCH<D> + n0 + (m >> 1) * 8);
}
// The same from a row-major [n][k] matrix (rows are the columns of B).
template <int D> __device__ inline void ldsm_b_nk(uint32_t (&r)[4], const bf16* s, int k0, int n0) {
  const int l = threadIdx.x % 32, m = l / 8;
  ldsm(r, s + (n0 + (m >> 1) * 8 + l % 8) * PITCH<D> + k0 + (m & 1) * 8);
}

// TILE rows r0.. of a [n rows, D] bf16 matrix (row stride st) into shared memory, asynchronously; rows ≥ n as zeros
// (shared memory may hold NaN patterns, and 0·NaN is NaN where P is 0).
template <int D> __device__ inline void load_rows(bf16* s, const bf16* g, int64_t st, int r0, int n) {
  constexpr int CHUNKS = D / 8;
  for (int e = threadIdx.x; e < TILE * CHUNKS; e += NT) {
    const int r = e / CHUNKS, c = e % CHUNKS * 8;
    const bool ok = r0 + r < n;
    cp16(s + r * PITCH<D> + c, ok ? g + (r0 + r) * st + c : g, ok);
  }
}
// TILE floats x[r0..] into shared memory (every `step`-th float), asynchronously; past n as zeros.
__device__ inline void load_floats(float* s, const float* x, int r0, int n, int step = 1) {
  for (int r = threadIdx.x; r < TILE; r += NT) cp4(s + r * step, r0 + r < n ? x + r0 + r : x, r0 + r < n);
}

template <int D> struct FwdSmem {
  static constexpr int v = 0;                                  // [2][TILE][PITCH] bf16
  static constexpr int lk = v + 2 * TILE * PITCH<D> * 2;       // [2][TILE] fp32
  static constexpr int range = lk + 2 * TILE * 4;              // [2][WARPS] fp32: each warp's min and max λk
  static constexpr int bytes = range + 2 * WARPS * 4;
};

// Grid (⌈Tq/TILE⌉, B·H), the longest rows first. At D ≤ 64 the registers are capped at 80 (six blocks an SM; left
// alone it takes 101, four blocks): faster at the speedrun layer on the H200 for a few bytes of spills.
template <int D> constexpr int fwd_min_blocks() { return D <= 64 ? 6 : 1; }
template <int D>
__global__ void __launch_bounds__(NT, fwd_min_blocks<D>()) tau_forward(const float* __restrict__ lq, const float* __restrict__ lk, const bf16* __restrict__ v, Strides sv,
                                                  const float* __restrict__ inv_temp, bf16* __restrict__ out, Strides so, float* __restrict__ out32,
                                                  float* __restrict__ mx, float* __restrict__ inv_l, int heads, int tq, int tk) {
  using S = FwdSmem<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* sv_ = reinterpret_cast<bf16*>(smem + S::v);
  float* slk = reinterpret_cast<float*>(smem + S::lk);
  float* srange = reinterpret_cast<float*>(smem + S::range);
  const int bh = blockIdx.y, q0 = (gridDim.x - 1 - blockIdx.x) * TILE, off = tk - tq;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const float it = inv_temp[bh % heads], a = it * LOG2E;
  lq += static_cast<int64_t>(bh) * tq, mx += static_cast<int64_t>(bh) * tq, inv_l += static_cast<int64_t>(bh) * tq, lk += static_cast<int64_t>(bh) * tk;
  out32 += static_cast<int64_t>(bh) * tq * D;
  v += sv.base(bh, heads), out += so.base(bh, heads);

  const int kt_end = (min(q0 + TILE, tq) - 1 + off) / TILE + 1;  // key tiles with a key some row of the block sees
  auto prefetch = [&](int kt) {
    load_rows<D>(sv_ + (kt & 1) * TILE * PITCH<D>, v, sv.t, kt * TILE, tk);
    load_floats(slk + (kt & 1) * TILE, lk, kt * TILE, tk);
    cp_commit();
  };
  prefetch(0);

  // This thread's rows r0 and r1 = r0 + 8 see keys ≤ last0, last1 (rows past Tq, never stored, see every key).
  const int wr = q0 + warp * 16, r0 = wr + g, r1 = r0 + 8;
  const int last0 = min(r0 + off, tk - 1), last1 = min(r1 + off, tk - 1);
  const float x0 = r0 < tq ? lq[r0] : 0.f, x1 = r1 < tq ? lq[r1] : 0.f;
  // Each row's shift n: p̃ = 2^(a·(n − |λq − λk|)) must not overflow (n ≤ min|λq − λk| over the row's keys) nor let
  // every key underflow. The distance from λq to [lo, hi], the range of the keys the block sees, is such an n when
  // a·(hi − lo) ≤ SPAN (p̃ of the nearest key ≥ 2^−SPAN): one pass over the keys for the block, not one per row (the
  // per-row pass cost a quarter of the kernel). Wider ranges (a hot temperature) take each row's exact min.
  const int blast = min(q0 + TILE - 1 + off, tk - 1);  // the last key a row of the block sees
  float lo = INFINITY, hi = -INFINITY;
  for (int j = threadIdx.x; j <= blast; j += NT) lo = fminf(lo, lk[j]), hi = fmaxf(hi, lk[j]);
  for (int s = 16; s > 0; s /= 2) lo = fminf(lo, __shfl_xor_sync(FULL, lo, s)), hi = fmaxf(hi, __shfl_xor_sync(FULL, hi, s));
  if (lane == 0) srange[warp] = lo, srange[WARPS + warp] = hi;
  __syncthreads();
  for (int w = 0; w < WARPS; ++w) lo = fminf(lo, srange[w]), hi = fmaxf(hi, srange[WARPS + w]);
  float n0 = fmaxf(0.f, fmaxf(lo - x0, x0 - hi)), n1 = fmaxf(0.f, fmaxf(lo - x1, x1 - hi));
  if (a * (hi - lo) > SPAN) {  // block-uniform
    n0 = n1 = INFINITY;  // the quad's four lanes take every fourth key
#pragma unroll 8
    for (int j = t4; j <= last1; j += 4) {
      const float y = lk[j];
      if (j <= last0) n0 = fminf(n0, fabsf(x0 - y));
      n1 = fminf(n1, fabsf(x1 - y));
    }
    for (int s = 1; s < 4; s *= 2) n0 = fminf(n0, __shfl_xor_sync(FULL, n0, s)), n1 = fminf(n1, __shfl_xor_sync(FULL, n1, s));
  }
  const float c0 = a * n0, c1 = a * n1;  // p̃ = 2^(c − a·|λq − λk|) ∈ (2^−SPAN, 1] for the nearest key

  float acc[D / 8][4] = {};
  float l0 = 0.f, l1 = 0.f;
  for (int kt = 0; kt < kt_end; ++kt) {
    cp_wait_all();
    __syncthreads();  // tile kt landed; every warp is done with tile kt − 1, whose buffer the prefetch reuses
    if (kt + 1 < kt_end) prefetch(kt + 1);
    const int k0 = kt * TILE;
    if (k0 > min(wr + 15 + off, tk - 1)) continue;  // no row of this warp sees the tile
    const bool full = k0 + TILE - 1 <= min(wr + off, tk - 1);  // every row sees every key
    const bf16* vt = sv_ + (kt & 1) * TILE * PITCH<D>;
    const float* yt = slk + (kt & 1) * TILE;
#pragma unroll
    for (int kc = 0; kc < TILE / 16; ++kc) {
      const int c = kc * 16 + 2 * t4, j = k0 + c;  // this lane's keys: j, j+1, j+8, j+9
      const float2 ya = *reinterpret_cast<const float2*>(yt + c), yb = *reinterpret_cast<const float2*>(yt + c + 8);
      float p[8] = {ex2(fmaf(-a, fabsf(x0 - ya.x), c0)), ex2(fmaf(-a, fabsf(x0 - ya.y), c0)), ex2(fmaf(-a, fabsf(x1 - ya.x), c1)),
                    ex2(fmaf(-a, fabsf(x1 - ya.y), c1)), ex2(fmaf(-a, fabsf(x0 - yb.x), c0)), ex2(fmaf(-a, fabsf(x0 - yb.y), c0)),
                    ex2(fmaf(-a, fabsf(x1 - yb.x), c1)), ex2(fmaf(-a, fabsf(x1 - yb.y), c1))};
      if (!full) {
        const int jj[8] = {j, j + 1, j, j + 1, j + 8, j + 9, j + 8, j + 9};
#pragma unroll
        for (int e = 0; e < 8; ++e) p[e] = jj[e] <= ((e / 2) % 2 ? last1 : last0) ? p[e] : 0.f;
      }
      l0 += (p[0] + p[1]) + (p[4] + p[5]), l1 += (p[2] + p[3]) + (p[6] + p[7]);  // unrounded: Σ p̃ is the softmax's norm
      const uint32_t pa[4] = {pack2(p[0], p[1]), pack2(p[2], p[3]), pack2(p[4], p[5]), pack2(p[6], p[7])};
#pragma unroll
      for (int n = 0; n < D / 16; ++n) {
        uint32_t b[4];
        ldsm_b_kn<D>(b, vt, kc * 16, n * 16);
        mma16816(acc[2 * n], pa, b[0], b[1]);
        mma16816(acc[2 * n + 1], pa, b[2], b[3]);
      }
    }
  }
  for (int s = 1; s < 4; s *= 2) l0 += __shfl_xor_sync(FULL, l0, s), l1 += __shfl_xor_sync(FULL, l1, s);
  const float i0 = 1.f / l0, i1 = 1.f / l1;  // a real row's nearest key gives p̃ > 2^−SPAN, so 1/l is finite
  if (t4 == 0 && r0 < tq) mx[r0] = c0, inv_l[r0] = i0;
  if (t4 == 0 && r1 < tq) mx[r1] = c1, inv_l[r1] = i1;
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    const int c = n * 8 + 2 * t4;
    if (r0 < tq) {
      *reinterpret_cast<uint32_t*>(out + r0 * so.t + c) = pack2(acc[n][0] * i0, acc[n][1] * i0);
      *reinterpret_cast<float2*>(out32 + static_cast<int64_t>(r0) * D + c) = make_float2(acc[n][0] * i0, acc[n][1] * i0);
    }
    if (r1 < tq) {
      *reinterpret_cast<uint32_t*>(out + r1 * so.t + c) = pack2(acc[n][2] * i1, acc[n][3] * i1);
      *reinterpret_cast<float2*>(out32 + static_cast<int64_t>(r1) * D + c) = make_float2(acc[n][2] * i1, acc[n][3] * i1);
    }
  }
}

// Δ_i = dout_i · out_i (= Σ_j p_ij dP_ij), D/8 lanes a row, 16-byte loads, from the fp32 output: with bf16's rounded
// one, Δ's error reaches every dS_ij of the row, and dinv_temp (a sum over all pairs, mostly cancelling) is off by
// 1.6%.
template <int D>
__global__ void __launch_bounds__(NT) tau_delta(const bf16* __restrict__ dout, Strides sd, const float* __restrict__ out32, float* __restrict__ delta, int heads,
                                                int tq, int64_t rows) {
  constexpr int LANES = D / 8;  // lanes a row, 8 values each
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * NT + threadIdx.x) / LANES;
  const int c = threadIdx.x % LANES * 8;
  float s = 0.f;
  if (row < rows) {
    alignas(16) bf16 g[8];
    *reinterpret_cast<uint4*>(g) = *reinterpret_cast<const uint4*>(dout + sd.base(static_cast<int>(row / tq), heads) + (row % tq) * sd.t + c);
    const float4 o0 = *reinterpret_cast<const float4*>(out32 + row * D + c), o1 = *reinterpret_cast<const float4*>(out32 + row * D + c + 4);
    const float o[8] = {o0.x, o0.y, o0.z, o0.w, o1.x, o1.y, o1.z, o1.w};
#pragma unroll
    for (int k = 0; k < 8; ++k) s = fmaf(__bfloat162float(g[k]), o[k], s);
  }
  for (int o = LANES / 2; o > 0; o /= 2) s += __shfl_xor_sync(FULL, s, o);  // the row's lanes are adjacent
  if (row < rows && threadIdx.x % LANES == 0) delta[row] = s;
}

// dλq partials of a query tile: [TILE queries][GROUPS lane groups, padded to DLQ_PITCH], each lane group's sum over
// its 2 keys. Query-major with a pitch of 36 floats, the 32 lanes of a warp's store (queries 2t4 + e, groups g) hit 32
// banks (8t4 + g + const); group-major they would hit 4, an 8-way conflict.
constexpr int GROUPS = WARPS * 8;
constexpr int DLQ_PITCH = GROUPS + 4;
// A query tile's dλq = −it·Σ over the block's keys, from the partials (zeroed here for the tile after next: a warp
// that skips a tile writes none), added into global memory, where the other key blocks add theirs. Two threads a
// query, 16 partials each, in 16-byte loads.
__device__ inline void flush_dlq(float* part, float* dlq, int q0, int tq, float it) {
  const int r = threadIdx.x % TILE, half = threadIdx.x / TILE;
  static_assert(NT == 2 * TILE && DLQ_PITCH % 4 == 0, "two threads a query, 16-byte rows");
  float4* p = reinterpret_cast<float4*>(part + r * DLQ_PITCH + half * GROUPS / 2);
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < GROUPS / 8; ++k) {
    const float4 v = p[k];
    s += (v.x + v.y) + (v.z + v.w), p[k] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  if (q0 + r < tq) atomicAdd(dlq + q0 + r, -it * s);
}

template <int D> struct BwdSmem {
  static constexpr int v = 0;                                  // the block's keys' V [TILE][PITCH] bf16
  static constexpr int dout = v + TILE * PITCH<D> * 2;         // [2][TILE][PITCH] bf16
  static constexpr int rows = dout + 2 * TILE * PITCH<D> * 2;  // [2][TILE][4] fp32: λq, shift, 1/Σp̃, Δ of a query tile's rows
  static constexpr int dlq = rows + 2 * TILE * 4 * 4;          // [2][TILE][DLQ_PITCH] fp32: dλq over each lane group's 2 keys
  static constexpr int red = dlq + 2 * TILE * DLQ_PITCH * 4;   // [WARPS] fp32
  static constexpr int bytes = red + WARPS * 4;
};

// Grid (⌈Tk/TILE⌉, B·H); key tile 0, which the most query tiles see, first. dV and dλk are the block's own; dλq and
// dinv_temp gather over blocks by atomics, so they must start at zero.
template <int D>
__global__ void __launch_bounds__(NT) tau_backward(const float* __restrict__ lq, const float* __restrict__ lk, const bf16* __restrict__ v, Strides sv,
                                                   const float* __restrict__ inv_temp, const bf16* __restrict__ dout, Strides sd,
                                                   const float* __restrict__ mx, const float* __restrict__ inv_l, const float* __restrict__ delta, float* __restrict__ dlq,
                                                   float* __restrict__ dlk, bf16* __restrict__ dv, Strides sdv, float* __restrict__ dit, int heads, int tq,
                                                   int tk) {
  using S = BwdSmem<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* sv_ = reinterpret_cast<bf16*>(smem + S::v);
  bf16* sdo = reinterpret_cast<bf16*>(smem + S::dout);
  float* srows = reinterpret_cast<float*>(smem + S::rows);
  float* sdlq = reinterpret_cast<float*>(smem + S::dlq);
  float* sred = reinterpret_cast<float*>(smem + S::red);
  const int bh = blockIdx.y, j0 = blockIdx.x * TILE, off = tk - tq;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const float it = inv_temp[bh % heads], a = it * LOG2E;
  lq += static_cast<int64_t>(bh) * tq, mx += static_cast<int64_t>(bh) * tq, inv_l += static_cast<int64_t>(bh) * tq, delta += static_cast<int64_t>(bh) * tq, dlq += static_cast<int64_t>(bh) * tq;
  lk += static_cast<int64_t>(bh) * tk, dlk += static_cast<int64_t>(bh) * tk;
  v += sv.base(bh, heads), dout += sd.base(bh, heads), dv += sdv.base(bh, heads);

  const int q_first = max(0, j0 - off) / TILE * TILE;  // the first query tile that sees key j0
  auto prefetch = [&](int q0) {
    const int b = q0 / TILE & 1;
    load_rows<D>(sdo + b * TILE * PITCH<D>, dout, sd.t, q0, tq);
    float* st = srows + b * 4 * TILE;  // a row's four numbers together: one 16-byte load
    load_floats(st, lq, q0, tq, 4);
    load_floats(st + 1, mx, q0, tq, 4);
    load_floats(st + 2, inv_l, q0, tq, 4);
    load_floats(st + 3, delta, q0, tq, 4);
    cp_commit();
  };
  load_rows<D>(sv_, v, sv.t, j0, tk);
  prefetch(q_first);
  for (int i = threadIdx.x; i < 2 * TILE * DLQ_PITCH; i += NT) sdlq[i] = 0.f;

  // This thread's keys kA (row g of the warp's 16) and kB = kA + 8.
  const int wk = j0 + warp * 16, kA = wk + g, kB = kA + 8;
  const float yA = kA < tk ? lk[kA] : 0.f, yB = kB < tk ? lk[kB] : 0.f;
  float dlkA = 0.f, dlkB = 0.f, dit_part = 0.f;
  float dva[D / 8][4] = {};
  uint32_t va[D / 16][4];  // the warp's 16 rows of V, the A operand of dPᵀ = V·doutᵀ, kept in registers
  cp_wait_all();
  __syncthreads();
#pragma unroll
  for (int kc = 0; kc < D / 16; ++kc) ldsm(va[kc], sv_ + (warp * 16 + lane % 16) * PITCH<D> + kc * 16 + lane / 16 * 8);

  for (int q0 = q_first; q0 < tq; q0 += TILE) {
    if (q0 > q_first) {
      cp_wait_all();
      __syncthreads();  // tile q0 landed; every warp is done with the previous tile
      flush_dlq(sdlq + ((q0 / TILE - 1) & 1) * TILE * DLQ_PITCH, dlq, q0 - TILE, tq, it);
    }
    if (q0 + TILE < tq) prefetch(q0 + TILE);
    if (q0 + TILE - 1 + off < wk) continue;  // no query of the tile sees this warp's keys
    const int b = q0 / TILE & 1;
    const bf16* dot = sdo + b * TILE * PITCH<D>;
    const float4* st = reinterpret_cast<const float4*>(srows + b * 4 * TILE);
    float* wdlq = sdlq + b * TILE * DLQ_PITCH + warp * 8 + g;
    const bool full = q0 + TILE <= tq && wk + 15 <= q0 + off;  // every query real and seeing every key of the warp
#pragma unroll 1
    for (int h0 = 0; h0 < TILE; h0 += 32) {  // 32 queries at a time: fewer live registers, more warps resident
      float dp[4][4] = {};  // dPᵀ: the warp's 16 keys × 32 queries
#pragma unroll
      for (int kc = 0; kc < D / 16; ++kc)
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          uint32_t r[4];
          ldsm_b_nk<D>(r, dot, kc * 16, h0 + n * 16);
          mma16816(dp[2 * n], va[kc], r[0], r[1]);
          mma16816(dp[2 * n + 1], va[kc], r[2], r[3]);
        }
      uint32_t pa[2][4];  // Pᵀ in bf16, the A operand of dV += Pᵀ·dout
#pragma unroll
      for (int n = 0; n < 4; ++n) {
        float pk[4];  // (kA, c), (kA, c+1), (kB, c), (kB, c+1)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int c = h0 + n * 8 + 2 * t4 + e, i = q0 + c;
          const float4 q = st[c];  // λq, shift, 1/Σp̃, Δ
          const float x = q.x, m = q.y, inv = q.z, del = q.w;
          const float dA = x - yA, dB = x - yB;
          float pA = bf16_round(ex2(fmaf(-a, fabsf(dA), m))) * inv, pB = bf16_round(ex2(fmaf(-a, fabsf(dB), m))) * inv;
          if (!full) {
            const bool real = i < tq;
            pA = real && kA <= i + off ? pA : 0.f;
            pB = real && kB <= i + off ? pB : 0.f;
          }
          const float sA = pA * (dp[n][e] - del), sB = pB * (dp[n][2 + e] - del);  // dS
          const float gA = signed_by(sA, dA), gB = signed_by(sB, dB);
          dlkA += gA, dlkB += gB;
          dit_part += sA * fabsf(dA) + sB * fabsf(dB);
          wdlq[c * DLQ_PITCH] = gA + gB;  // dλq_i's part from this lane's two keys
          pk[e] = pA, pk[2 + e] = pB;
        }
        pa[n / 2][(n % 2) * 2] = pack2(pk[0], pk[1]);
        pa[n / 2][(n % 2) * 2 + 1] = pack2(pk[2], pk[3]);
      }
#pragma unroll
      for (int kq = 0; kq < 2; ++kq)
#pragma unroll
        for (int n = 0; n < D / 16; ++n) {
          uint32_t r[4];
          ldsm_b_kn<D>(r, dot, h0 + kq * 16, n * 16);
          mma16816(dva[2 * n], pa[kq], r[0], r[1]);
          mma16816(dva[2 * n + 1], pa[kq], r[2], r[3]);
        }
    }
  }
  __syncthreads();  // the last tile's dλq is complete
  const int last = (tq - 1) / TILE * TILE;
  flush_dlq(sdlq + (last / TILE & 1) * TILE * DLQ_PITCH, dlq, last, tq, it);

  for (int s = 1; s < 4; s *= 2) dlkA += __shfl_xor_sync(FULL, dlkA, s), dlkB += __shfl_xor_sync(FULL, dlkB, s);
  if (t4 == 0 && kA < tk) dlk[kA] = it * dlkA;  // dλk_j = it·Σ_i dS_ij·sign(λq_i − λk_j)
  if (t4 == 0 && kB < tk) dlk[kB] = it * dlkB;
  for (int o = 16; o > 0; o /= 2) dit_part += __shfl_xor_sync(FULL, dit_part, o);
  if (lane == 0) sred[warp] = dit_part;
  __syncthreads();
  if (threadIdx.x == 0) {  // dinv_temp = −Σ dS·|λq − λk|
    float s = 0.f;
    for (int w = 0; w < WARPS; ++w) s += sred[w];
    atomicAdd(dit + bh % heads, -s);
  }
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    const int c = n * 8 + 2 * t4;
    if (kA < tk) *reinterpret_cast<uint32_t*>(dv + kA * sdv.t + c) = pack2(dva[n][0], dva[n][1]);
    if (kB < tk) *reinterpret_cast<uint32_t*>(dv + kB * sdv.t + c) = pack2(dva[n][2], dva[n][3]);
  }
}


constexpr unsigned n_tiles(int n) { return (n + TILE - 1) / TILE; }
}  // namespace

// out [B,H,Tq,D] (strides so, bf16) and each row's shift (log2 units) and 1/Σp̃ [BH, Tq] from lq [BH, Tq], lk [BH, Tk], v [B,H,Tk,D] (strides sv, bf16),
// inv_temp [heads] (head = bh % heads); out32 [BH, Tq, D] gets the same output in fp32 (for the backward's Δ). λ,
// inv_temp, mx, inv_l, out32 contiguous; v and out start on 16 bytes, their strides multiples of 8; 1 ≤ Tq ≤ Tk. Returns a
// cudaError_t.
extern "C" int tg_tau_flash_forward(const float* lq, const float* lk, const void* v, const int64_t* sv, const float* inv_temp, void* out, const int64_t* so,
                                    float* out32, float* mx, float* inv_l, int bh, int heads, int tq, int tk, int d, cudaStream_t stream) {
  return with_head_dim(d, [&](auto dim) -> cudaError_t {
    constexpr int D = decltype(dim)::value, smem = FwdSmem<D>::bytes;
    if (cudaError_t e = cudaFuncSetAttribute(tau_forward<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem)) return e;
    tau_forward<D><<<dim3(n_tiles(tq), bh), NT, smem, stream>>>(lq, lk, static_cast<const bf16*>(v), Strides{sv[0], sv[1], sv[2]}, inv_temp,
                                                               static_cast<bf16*>(out), Strides{so[0], so[1], so[2]}, out32, mx, inv_l, heads, tq, tk);
    return cudaGetLastError();
  });
}

// Gradients of the forward above for dout [B,H,Tq,D] (strides sd, same rules as v): dlq, dlk [BH, T] fp32, dv
// [B,H,Tk,D] (strides sdv), dinv_temp [heads], given the forward's out32, mx and inv_l. dlq and dinv_temp must be zeros
// (atomics add into them); delta [BH, Tq] is scratch.
extern "C" int tg_tau_flash_backward(const float* lq, const float* lk, const void* v, const int64_t* sv, const float* inv_temp, const float* out32,
                                     const void* dout, const int64_t* sd, const float* mx, const float* inv_l, float* delta, float* dlq, float* dlk, void* dv, const int64_t* sdv,
                                     float* dinv_temp, int bh, int heads, int tq, int tk, int d, cudaStream_t stream) {
  return with_head_dim(d, [&](auto dim) -> cudaError_t {
    constexpr int D = decltype(dim)::value, smem = BwdSmem<D>::bytes;
    const int64_t rows = static_cast<int64_t>(bh) * tq;
    const Strides s_d{sd[0], sd[1], sd[2]};
    tau_delta<D><<<static_cast<unsigned>((rows * (D / 8) + NT - 1) / NT), NT, 0, stream>>>(static_cast<const bf16*>(dout), s_d, out32, delta, heads, tq, rows);
    if (cudaError_t e = cudaFuncSetAttribute(tau_backward<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem)) return e;
    tau_backward<D><<<dim3(n_tiles(tk), bh), NT, smem, stream>>>(lq, lk, static_cast<const bf16*>(v), Strides{sv[0], sv[1], sv[2]}, inv_temp,
                                                                 static_cast<const bf16*>(dout), s_d, mx, inv_l, delta, dlq, dlk, static_cast<bf16*>(dv),
                                                                 Strides{sdv[0], sdv[1], sdv[2]}, dinv_temp, heads, tq, tk);
    return cudaGetLastError();
  });
}
