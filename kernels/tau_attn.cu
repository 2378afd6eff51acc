// Fused tau attention for sm_90: s_ij = −|λq_i − λk_j|·inv_temp[h], causal (bottom-right when Tq < Tk: query i sees
// keys j ≤ i + Tk − Tq), softmax in fp32, probabilities cast to V's dtype, times V. A score is a function of two
// scalars, so one cheap pass over λk gives each row's exact max and log-sum-exp without touching V; after it
// P = exp(s − lse) is made tile by tile in shared memory and P·V needs no online rescaling, so tensor cores (WMMA:
// bf16 in, fp32 accumulate) do the products. The backward is FlashAttention-2's: one block a key tile, a loop over
// query tiles, P recomputed from (λq, λk, lse). Nothing Tq×Tk reaches global memory. fp32 V takes exact fp32 FMAs
// instead of WMMA (tf32 would round), so tests can compare tightly. Plain C ABI: kernels/ext.cpp owns the tensors,
// the checks and the stream.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <cstdint>
#include <type_traits>

namespace {
using namespace nvcuda;
using bf16 = __nv_bfloat16;

constexpr int WARPS = 4;
constexpr int NT = 32 * WARPS;          // threads a block
constexpr int TILE = 16 * WARPS;        // query rows and keys a tile: one 16-row WMMA stripe a warp
constexpr int SPLIT = NT / TILE;        // threads a row in row passes; rows between a thread's entries of a tile
constexpr int PER_THREAD = TILE * TILE / NT;  // entries of a TILE×TILE tile a thread owns: column tid % TILE
constexpr int FPAD = 4;                 // fp32 row padding in shared memory (WMMA wants ldm % 4 == 0; staggers banks)
constexpr unsigned FULL = 0xffffffffu;
static_assert(SPLIT >= 1 && SPLIT <= 32 && (SPLIT & (SPLIT - 1)) == 0, "a row's threads are adjacent lanes of one warp");

template <typename T> constexpr int VEC = 16 / sizeof(T);  // elements in 16 bytes: vector copies, and each row's padding

__device__ inline float to_f(float x) { return x; }
__device__ inline float to_f(bf16 x) { return __bfloat162float(x); }
template <typename T> __device__ inline T from_f(float x);
template <> __device__ inline float from_f<float>(float x) { return x; }
template <> __device__ inline bf16 from_f<bf16>(float x) { return __float2bfloat16(x); }  // round to nearest even, as torch

// The plain path's arithmetic: −|λq − λk|·inv_temp.
__device__ inline float score(float lq, float lk, float it) { return -fabsf(lq - lk) * it; }
__device__ inline float sign(float x) { return static_cast<float>((x > 0.f) - (x < 0.f)); }  // sign(0) = 0, as abs's backward
__device__ inline bool visible(int i, int j, int tq, int off) { return i < tq && j <= i + off; }  // j < Tk follows

// Reduction over the SPLIT adjacent lanes that share a row.
template <typename F> __device__ inline float row_reduce(float x, F op) {
  for (int s = SPLIT / 2; s > 0; s /= 2) x = op(x, __shfl_xor_sync(FULL, x, s));
  return x;
}
__device__ inline float warp_sum(float x) {
  for (int s = 16; s > 0; s /= 2) x += __shfl_xor_sync(FULL, x, s);
  return x;
}

// Element (r, c) of a matrix in shared memory with leading dimension ld, in WMMA's layout tags.
template <typename L> __device__ constexpr int at(int ld, int r, int c) {
  return std::is_same<L, wmma::row_major>::value ? r * ld + c : c * ld + r;
}

// One warp's C (16 × N, fp32) += A (16 × K) · B (K × N), A and B in shared memory.
template <typename T, int N> struct WarpMma;

// bf16: tensor cores.
template <int N> struct WarpMma<bf16, N> {
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c[N / 16];
  __device__ void zero() {
#pragma unroll
    for (int n = 0; n < N / 16; ++n) wmma::fill_fragment(c[n], 0.f);
  }
  template <typename LA, typename LB, int K> __device__ void mma(const bf16* a, int lda, const bf16* b, int ldb) {
#pragma unroll
    for (int k = 0; k < K; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, LA> fa;
      wmma::load_matrix_sync(fa, a + at<LA>(lda, 0, k), lda);
#pragma unroll
      for (int n = 0; n < N / 16; ++n) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, LB> fb;
        wmma::load_matrix_sync(fb, b + at<LB>(ldb, k, n * 16), ldb);
        wmma::mma_sync(c[n], fa, fb, c[n]);
      }
    }
  }
  __device__ void store(float* s, int ld) const {
#pragma unroll
    for (int n = 0; n < N / 16; ++n) wmma::store_matrix_sync(s + n * 16, c[n], ld, wmma::mem_row_major);
  }
};

// fp32: plain FMAs, lane l holds columns l, l + 32, ... of all 16 rows.
template <int N> struct WarpMma<float, N> {
  static_assert(N % 32 == 0, "a lane's columns are l + 32q");
  float c[16][N / 32];
  __device__ void zero() {
#pragma unroll
    for (int r = 0; r < 16; ++r)
#pragma unroll
      for (int q = 0; q < N / 32; ++q) c[r][q] = 0.f;
  }
  template <typename LA, typename LB, int K> __device__ void mma(const float* a, int lda, const float* b, int ldb) {
    const int lane = threadIdx.x % 32;
#pragma unroll 4
    for (int k = 0; k < K; ++k) {
      float bk[N / 32];
#pragma unroll
      for (int q = 0; q < N / 32; ++q) bk[q] = b[at<LB>(ldb, k, lane + 32 * q)];
#pragma unroll
      for (int r = 0; r < 16; ++r) {
        const float ar = a[at<LA>(lda, r, k)];
#pragma unroll
        for (int q = 0; q < N / 32; ++q) c[r][q] = fmaf(ar, bk[q], c[r][q]);
      }
    }
  }
  __device__ void store(float* s, int ld) const {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int r = 0; r < 16; ++r)
#pragma unroll
      for (int q = 0; q < N / 32; ++q) s[r * ld + lane + 32 * q] = c[r][q];
  }
};

// Rows r0 .. r0 + TILE of a row-major [n, D] matrix into shared memory (row pitch D + VEC), rows ≥ n as zeros
// (uninitialised shared memory may hold NaN patterns, and 0·NaN is NaN even where P is 0).
template <typename T, int D> __device__ void load_tile(T* s, const T* g, int r0, int n) {
  constexpr int CHUNKS = D / VEC<T>;
  for (int e = threadIdx.x; e < TILE * CHUNKS; e += NT) {
    const int r = e / CHUNKS, c = e % CHUNKS * VEC<T>;
    uint4 x = make_uint4(0, 0, 0, 0);
    if (r0 + r < n) x = *reinterpret_cast<const uint4*>(g + static_cast<int64_t>(r0 + r) * D + c);
    *reinterpret_cast<uint4*>(s + r * (D + VEC<T>) + c) = x;
  }
}

// fp32 rows in shared memory (pitch D + FPAD) to rows r0 .. of a row-major [n, D] matrix of T, those < n.
template <typename T, int D> __device__ void store_tile(T* g, const float* s, int r0, int n) {
  constexpr int CHUNKS = D / VEC<T>;
  for (int e = threadIdx.x; e < TILE * CHUNKS; e += NT) {
    const int r = e / CHUNKS, c = e % CHUNKS * VEC<T>;
    if (r0 + r >= n) continue;
    alignas(16) T x[VEC<T>];
#pragma unroll
    for (int k = 0; k < VEC<T>; ++k) x[k] = from_f<T>(s[r * (D + FPAD) + c + k]);
    *reinterpret_cast<uint4*>(g + static_cast<int64_t>(r0 + r) * D + c) = *reinterpret_cast<const uint4*>(x);
  }
}

constexpr int align128(int bytes) { return (bytes + 127) / 128 * 128; }
template <typename T, int D> constexpr int ld_v = D + VEC<T>;    // V and dout tiles [TILE][D + VEC]
template <typename T> constexpr int ld_p = TILE + VEC<T>;        // P tile [TILE][TILE + VEC]

// Dynamic shared memory of the forward: byte offsets.
template <typename T, int D> struct FwdSmem {
  static constexpr int v = 0;
  static constexpr int p = v + align128(TILE * ld_v<T, D> * sizeof(T));
  static constexpr int o = p + align128(TILE * ld_p<T> * sizeof(T));  // the output tile, fp32 [TILE][D + FPAD]
  static constexpr int rows = o + align128(TILE * (D + FPAD) * 4);    // λq and lse of the block's rows
  static constexpr int bytes = rows + 2 * TILE * 4;
};

// One block: TILE query rows of one (batch, head). Grid (B·H, ⌈Tq/TILE⌉).
template <typename T, int D>
__global__ void __launch_bounds__(NT) tau_forward(const float* __restrict__ lq, const float* __restrict__ lk, const T* __restrict__ v,
                                                  const float* __restrict__ inv_temp, T* __restrict__ out, float* __restrict__ out32,
                                                  float* __restrict__ lse, int heads, int tq, int tk) {
  using S = FwdSmem<T, D>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sv = reinterpret_cast<T*>(smem + S::v);
  T* sp = reinterpret_cast<T*>(smem + S::p);
  float* so = reinterpret_cast<float*>(smem + S::o);
  float* slq = reinterpret_cast<float*>(smem + S::rows);
  float* slse = slq + TILE;
  const int64_t bh = blockIdx.x;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * TILE;  // the longest rows start first
  const int off = tk - tq, warp = threadIdx.x / 32;
  const float it = inv_temp[bh % heads];
  lq += bh * tq, lse += bh * tq, lk += bh * tk, v += bh * tk * D, out += bh * tq * D;
  if (out32) out32 += bh * tq * D;

  {  // Each row's max and log-sum-exp over its visible keys: two passes over λk, no V.
    const int r = threadIdx.x / SPLIT, part = threadIdx.x % SPLIT, i = q0 + r, last = i < tq ? i + off : -1;
    const float x = i < tq ? lq[i] : 0.f;
    float m = -INFINITY, l = 0.f;
    for (int j = part; j <= last; j += SPLIT) m = fmaxf(m, score(x, lk[j], it));
    m = row_reduce(m, [](float a, float b) { return fmaxf(a, b); });
    for (int j = part; j <= last; j += SPLIT) l += expf(score(x, lk[j], it) - m);
    l = row_reduce(l, [](float a, float b) { return a + b; });
    if (part == 0) {
      slq[r] = x;
      slse[r] = i < tq ? m + logf(l) : 0.f;  // every real row sees key 0 at least, so l ≥ 1
      if (i < tq) lse[i] = slse[r];
    }
  }
  __syncthreads();

  const int c = threadIdx.x % TILE, r_first = threadIdx.x / TILE;  // this thread's column of P and first row
  const int kt_end = (min(q0 + TILE, tq) - 1 + off) / TILE + 1;    // key tiles with a key some row of the block sees
  WarpMma<T, D> acc;
  acc.zero();
  for (int kt = 0; kt < kt_end; ++kt) {
    const int j = kt * TILE + c;
    load_tile<T, D>(sv, v, kt * TILE, tk);
    const float y = j < tk ? lk[j] : 0.f;
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k) {
      const int r = r_first + k * SPLIT;
      sp[r * ld_p<T> + c] = from_f<T>(visible(q0 + r, j, tq, off) ? expf(score(slq[r], y, it) - slse[r]) : 0.f);
    }
    __syncthreads();
    acc.template mma<wmma::row_major, wmma::row_major, TILE>(sp + warp * 16 * ld_p<T>, ld_p<T>, sv, ld_v<T, D>);
    __syncthreads();
  }
  acc.store(so + warp * 16 * (D + FPAD), D + FPAD);
  __syncthreads();
  store_tile<T, D>(out, so, q0, tq);
  if (out32) store_tile<float, D>(out32, so, q0, tq);
}

// Δ_i = dout_i · out_i (= Σ_j p_ij dP_ij), one warp a row, from the fp32 output: with bf16's rounded one, Δ's error
// reaches every dS_ij of the row, and dinv_temp (a sum over all pairs, mostly cancelling) was off by 1.6% on the H200.
template <typename T, int D>
__global__ void __launch_bounds__(NT) tau_delta(const T* __restrict__ dout, const float* __restrict__ out, float* __restrict__ delta, int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * WARPS + threadIdx.x / 32;
  if (row >= rows) return;  // a whole warp leaves together
  float s = 0.f;
  for (int d = threadIdx.x % 32; d < D; d += 32) s += to_f(dout[row * D + d]) * out[row * D + d];
  s = warp_sum(s);
  if (threadIdx.x % 32 == 0) delta[row] = s;
}

// Dynamic shared memory of the backward: byte offsets.
template <typename T, int D> struct BwdSmem {
  static constexpr int ld_f = (TILE > D ? TILE : D) + FPAD;
  static constexpr int v = 0;                                            // the block's keys' V
  static constexpr int dout = v + align128(TILE * ld_v<T, D> * sizeof(T));  // a query tile's dout
  static constexpr int p = dout + align128(TILE * ld_v<T, D> * sizeof(T));
  static constexpr int f = p + align128(TILE * ld_p<T> * sizeof(T));       // fp32: dP, then g = ds·sign; last the dV tile
  static constexpr int rows = f + align128(TILE * ld_f * 4);              // λq, lse, Δ of the query tile
  static constexpr int red = rows + 3 * TILE * 4;                         // NT column partials, then WARPS partials
  static constexpr int bytes = red + (NT + WARPS) * 4;
};

// One block: TILE keys of one (batch, head), looping over the query tiles that see them. Grid (B·H, ⌈Tk/TILE⌉).
// dV and dλk are the block's own; dλq and dinv_temp gather over blocks by atomics, so they must start at zero.
template <typename T, int D>
__global__ void __launch_bounds__(NT) tau_backward(const float* __restrict__ lq, const float* __restrict__ lk, const T* __restrict__ v,
                                                   const float* __restrict__ inv_temp, const T* __restrict__ dout,
                                                   const float* __restrict__ lse, const float* __restrict__ delta,
                                                   float* __restrict__ dlq, float* __restrict__ dlk, T* __restrict__ dv,
                                                   float* __restrict__ dit, int heads, int tq, int tk) {
  using S = BwdSmem<T, D>;
  constexpr int ld_s = TILE + FPAD;  // dP and g in the fp32 buffer
  extern __shared__ __align__(128) unsigned char smem[];
  T* sv = reinterpret_cast<T*>(smem + S::v);
  T* sdo = reinterpret_cast<T*>(smem + S::dout);
  T* sp = reinterpret_cast<T*>(smem + S::p);
  float* sf = reinterpret_cast<float*>(smem + S::f);
  float* slq = reinterpret_cast<float*>(smem + S::rows);
  float* slse = slq + TILE;
  float* sdelta = slse + TILE;
  float* sred = reinterpret_cast<float*>(smem + S::red);
  const int64_t bh = blockIdx.x;
  const int j0 = blockIdx.y * TILE, off = tk - tq, warp = threadIdx.x / 32;
  const int c = threadIdx.x % TILE, r_first = threadIdx.x / TILE, j = j0 + c;  // this thread's key (column) and first row
  const float it = inv_temp[bh % heads];
  lq += bh * tq, lse += bh * tq, delta += bh * tq, dlq += bh * tq, lk += bh * tk, dlk += bh * tk;
  v += bh * tk * D, dv += bh * tk * D, dout += bh * tq * D;

  load_tile<T, D>(sv, v, j0, tk);
  const float y = j < tk ? lk[j] : 0.f;
  float dlk_part = 0.f, dit_part = 0.f;
  WarpMma<T, D> dv_acc;
  dv_acc.zero();
  for (int q0 = max(0, j0 - off) / TILE * TILE; q0 < tq; q0 += TILE) {  // from the first query that sees key j0
    load_tile<T, D>(sdo, dout, q0, tq);
    for (int r = threadIdx.x; r < TILE; r += NT) {
      const bool real = q0 + r < tq;
      slq[r] = real ? lq[q0 + r] : 0.f;
      slse[r] = real ? lse[q0 + r] : 0.f;
      sdelta[r] = real ? delta[q0 + r] : 0.f;
    }
    __syncthreads();
    float p[PER_THREAD];
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k) {
      const int r = r_first + k * SPLIT;
      p[k] = visible(q0 + r, j, tq, off) ? expf(score(slq[r], y, it) - slse[r]) : 0.f;
      sp[r * ld_p<T> + c] = from_f<T>(p[k]);
    }
    {  // dP = dout·Vᵀ, this warp's 16 query rows
      WarpMma<T, TILE> dp;
      dp.zero();
      dp.template mma<wmma::row_major, wmma::col_major, D>(sdo + warp * 16 * ld_v<T, D>, ld_v<T, D>, sv, ld_v<T, D>);
      dp.store(sf + warp * 16 * ld_s, ld_s);
    }
    __syncthreads();
    // dV += Pᵀ·dout, this warp's 16 keys
    dv_acc.template mma<wmma::col_major, wmma::row_major, TILE>(sp + warp * 16, ld_p<T>, sdo, ld_v<T, D>);
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k) {  // ds = p(dP − Δ); g = ds·sign(λq − λk) replaces dP
      const int r = r_first + k * SPLIT;
      const float d = slq[r] - y, ds = p[k] * (sf[r * ld_s + c] - sdelta[r]), g = ds * sign(d);
      sf[r * ld_s + c] = g;
      dlk_part += g;
      dit_part += ds * fabsf(d);
    }
    __syncthreads();
    {  // dλq_i = −it·Σ_j g_ij over this block's keys; the other key tiles' blocks add theirs
      const int r = threadIdx.x / SPLIT, part = threadIdx.x % SPLIT;
      float s = 0.f;
      for (int cc = part; cc < TILE; cc += SPLIT) s += sf[r * ld_s + cc];
      s = row_reduce(s, [](float a, float b) { return a + b; });
      if (part == 0 && q0 + r < tq) atomicAdd(dlq + q0 + r, -it * s);
    }
    // No barrier here: the next tile's loads touch neither sf nor sp before the next barrier, and dV's reads of
    // sdo and sp ended before the last one.
  }
  __syncthreads();  // the last row sums have read sf
  sred[threadIdx.x] = dlk_part;
  dit_part = warp_sum(dit_part);
  if (threadIdx.x % 32 == 0) sred[NT + warp] = dit_part;
  dv_acc.store(sf + warp * 16 * (D + FPAD), D + FPAD);
  __syncthreads();
  if (threadIdx.x < TILE && j < tk) {  // dλk_j = it·Σ_i g_ij, from the SPLIT threads of column j
    float s = 0.f;
    for (int k = 0; k < SPLIT; ++k) s += sred[threadIdx.x + k * TILE];
    dlk[j] = it * s;
  }
  if (threadIdx.x == 0) {  // dinv_temp = −Σ ds·|λq − λk|
    float s = 0.f;
    for (int w = 0; w < WARPS; ++w) s += sred[NT + w];
    atomicAdd(dit + bh % heads, -s);
  }
  store_tile<T, D>(dv, sf, j0, tk);
}

template <typename T> struct Type { using type = T; };

// Calls f(Type<T>, integral_constant<D>) for V's dtype and the head dim; an unsupported D is cudaErrorInvalidValue
// (kernels/ext.cpp refuses it first, with a message).
template <typename F> cudaError_t dispatch(int is_bf16, int d, F f) {
  auto by_dim = [&](auto t) -> cudaError_t {
    switch (d) {
      case 32: return f(t, std::integral_constant<int, 32>{});
      case 64: return f(t, std::integral_constant<int, 64>{});
      case 128: return f(t, std::integral_constant<int, 128>{});
    }
    return cudaErrorInvalidValue;
  };
  return is_bf16 ? by_dim(Type<bf16>{}) : by_dim(Type<float>{});
}

constexpr int n_tiles(int n) { return (n + TILE - 1) / TILE; }
}  // namespace

// out [BH, Tq, D] and lse [BH, Tq] from lq [BH, Tq], lk [BH, Tk], v [BH, Tk, D], inv_temp [heads] (head = bh % heads);
// out32, when not null, gets the same output in fp32 (for the backward's Δ when V is bf16). All contiguous on the
// current device, v, out and out32 16-byte aligned, 1 ≤ Tq ≤ Tk. Returns a cudaError_t.
extern "C" int tg_tau_flash_forward(const float* lq, const float* lk, const void* v, const float* inv_temp, void* out, float* out32, float* lse,
                                    int bh, int heads, int tq, int tk, int d, int is_bf16, cudaStream_t stream) {
  return dispatch(is_bf16, d, [&](auto t, auto dim) -> cudaError_t {
    using T = typename decltype(t)::type;
    constexpr int D = decltype(dim)::value, smem = FwdSmem<T, D>::bytes;
    if (cudaError_t e = cudaFuncSetAttribute(tau_forward<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem)) return e;
    tau_forward<T, D><<<dim3(bh, n_tiles(tq)), NT, smem, stream>>>(lq, lk, static_cast<const T*>(v), inv_temp, static_cast<T*>(out), out32, lse, heads, tq, tk);
    return cudaGetLastError();
  });
}

// Gradients of the forward above for dout [BH, Tq, D] (contiguous, 16-byte aligned): dlq, dlk [BH, T], dv [BH, Tk, D],
// dinv_temp [heads], given the forward's output in fp32. dlq and dinv_temp must be zeros (atomics add into them); delta
// [BH, Tq] is scratch.
extern "C" int tg_tau_flash_backward(const float* lq, const float* lk, const void* v, const float* inv_temp, const float* out32,
                                     const void* dout, const float* lse, float* delta, float* dlq, float* dlk, void* dv, float* dinv_temp,
                                     int bh, int heads, int tq, int tk, int d, int is_bf16, cudaStream_t stream) {
  return dispatch(is_bf16, d, [&](auto t, auto dim) -> cudaError_t {
    using T = typename decltype(t)::type;
    constexpr int D = decltype(dim)::value, smem = BwdSmem<T, D>::bytes;
    const int64_t rows = static_cast<int64_t>(bh) * tq;
    tau_delta<T, D><<<static_cast<unsigned>((rows + WARPS - 1) / WARPS), NT, 0, stream>>>(static_cast<const T*>(dout), out32, delta, rows);
    if (cudaError_t e = cudaFuncSetAttribute(tau_backward<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem)) return e;
    tau_backward<T, D><<<dim3(bh, n_tiles(tk)), NT, smem, stream>>>(lq, lk, static_cast<const T*>(v), inv_temp, static_cast<const T*>(dout), lse, delta,
                                                                   dlq, dlk, static_cast<T*>(dv), dinv_temp, heads, tq, tk);
    return cudaGetLastError();
  });
}
