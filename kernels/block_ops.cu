// The transformer block's memory-bound steps, fused, for sm_90 (forward and backward; fp32 arithmetic, one rounding to
// the output dtype): eager ATen spends several kernels and fp32 round trips on each (ATen's RMSNorm kernels are built
// for wide rows; RoPE alone is eight elementwise kernels and a cat, and their backward as many).
//   rmsnorm:   y = x·r, r = (mean x² + eps)^-½ over rows of C, x fp32 or bf16, y in another dtype (the cast fused in);
//              with a branch y, the residual add s = x + y first (the new stream), h = rmsnorm(s) the next input.
//   rope_norm: the qkv projection's output [B,T,(H+2G)·D] → q, k rotated (RoPE, halves) then RMS-normed per head,
//              and v copied, each [B,T,heads,D]: one pass instead of narrow/rope/cat/norm and three zero-filled grads.
//   relu2:     h = max(u, 0)².
// One warp a row (a head of D or a row of C), so any T and any row count. Plain C ABI: kernels/ext.cpp owns tensors,
// checks, autograd and the stream.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include "mma_bf16.cuh"
#include "launchers.h"

namespace {
using bf16 = __nv_bfloat16;
constexpr int NT = 256;  // threads a block: 8 warps, 8 rows
constexpr int WARPS = NT / 32;
constexpr unsigned FULL = 0xffffffffu;

__device__ inline float to_f(float x) { return x; }
__device__ inline float to_f(bf16 x) { return __bfloat162float(x); }
template <typename T> __device__ inline T from_f(float x);
template <> __device__ inline float from_f<float>(float x) { return x; }
template <> __device__ inline bf16 from_f<bf16>(float x) { return __float2bfloat16(x); }  // round to nearest even, as torch

__device__ inline float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(FULL, x, o);
  return x;
}

__device__ inline int64_t warp_row() { return static_cast<int64_t>(blockIdx.x) * WARPS + threadIdx.x / 32; }

// ---- rmsnorm over rows of c, h = v·r with r = (mean v² + eps)^-½, rstd [n] kept for the backward. v = x, or, with
// y, the residual add v = x + y, written to s as the new stream: one pass instead of an add and a norm. Backward: dx =
// r·(dh − v̂·mean(dh·v̂)), v̂ = v·r, plus the stream's own gradient ds_in if any, also written to dy in y's dtype: one
// pass instead of the norm's backward, autograd's sum of the stream's two gradients and the cast to y's dtype.
template <typename TI, typename TY, typename TO>
__global__ void __launch_bounds__(NT) rmsnorm_fwd(const TI* x, const TY* y, float* s, TO* h, float* rstd, int64_t n, int c, float eps) {
  const int64_t row = warp_row();
  if (row >= n) return;
  const int lane = threadIdx.x % 32;
  const TI* xr = x + row * c;
  const TY* yr = y ? y + row * c : nullptr;
  auto v = [&](int j) { return yr ? to_f(xr[j]) + to_f(yr[j]) : to_f(xr[j]); };
  float ss = 0.f;
  for (int j = lane; j < c; j += 32) {
    const float vj = v(j);
    ss += vj * vj;
    if (s) s[row * c + j] = vj;
  }
  const float r = rsqrtf(warp_sum(ss) / c + eps);
  for (int j = lane; j < c; j += 32) h[row * c + j] = from_f<TO>(v(j) * r);
  if (lane == 0) rstd[row] = r;
}

// x: the normed rows (x, or s after an add); ds_in and dy may be null
template <typename TI, typename TY, typename TO>
__global__ void __launch_bounds__(NT) rmsnorm_bwd(const TI* x, const TO* dh, const float* ds_in, const float* rstd, TI* dx, TY* dy, int64_t n, int c) {
  const int64_t row = warp_row();
  if (row >= n) return;
  const int lane = threadIdx.x % 32;
  const float r = rstd[row];
  const TI* xr = x + row * c;
  const TO* gr = dh + row * c;
  float dot = 0.f;
  for (int j = lane; j < c; j += 32) dot += to_f(gr[j]) * to_f(xr[j]) * r;
  dot = warp_sum(dot) / c;
  for (int j = lane; j < c; j += 32) {
    const int64_t i = row * c + j;
    const float g = r * (to_f(gr[j]) - to_f(xr[j]) * r * dot) + (ds_in ? ds_in[i] : 0.f);
    dx[i] = from_f<TI>(g);
    if (dy) dy[i] = from_f<TY>(g);
  }
}

// ---- rope_norm. qkv [B·T rows of (H+2G)·D]; head slot s < H is q head s, then G k heads (rotated and normed), then G
// v heads (copied). Position of row i: pos + i mod T. cos, sin [*, D/2] fp32. Grid (⌈rows/(WARPS·RPW)⌉, H+2G): the
// slot is the block's y and a warp takes RPW rows of it, lane l the pairs (l + 32p, l + 32p + D/2), p < PL. Every load
// of the warp's rows is issued before the first reduction: with one row a warp (64 bf16, a few bytes a lane) the
// kernels ran at a quarter of the memory bandwidth, waiting on one short load at a time. Rows < 2³¹ (ext.cpp checks).
constexpr int RPW = 4;
template <typename T> struct Heads {
  T *q, *k, *v;  // [rows, H|G|G, D]
  int h, g, d;
  __device__ T* out(int64_t row, int s) const {
    return s < h ? q + (row * h + s) * d : s < h + g ? k + (row * g + s - h) * d : v + (row * g + s - h - g) * d;
  }
};

__device__ inline uint32_t slot_row0() { return (blockIdx.x * WARPS + threadIdx.x / 32) * RPW; }

template <typename T, int PL>
__global__ void __launch_bounds__(NT) rope_norm_fwd(const T* qkv, Heads<T> o, const float* cos, const float* sin, float* rstd, uint32_t rows, uint32_t t, int pos,
                                                     float eps) {
  const int slots = o.h + 2 * o.g, d = o.d, half = d / 2, s = blockIdx.y, lane = threadIdx.x % 32;
  const uint32_t row0 = slot_row0();
  if (row0 >= rows) return;
  if (s >= o.h + o.g) {  // v: a copy
    for (uint32_t row = row0; row < min(row0 + RPW, rows); ++row) {
      const T* x = qkv + (static_cast<int64_t>(row) * slots + s) * d;
      T* y = o.out(row, s);
      for (int j = lane; j < d; j += 32) y[j] = x[j];
    }
    return;
  }
  float x1[RPW][PL], x2[RPW][PL], c[RPW][PL], sn[RPW][PL];
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const uint32_t row = row0 + r;
    const T* x = qkv + (static_cast<int64_t>(row) * slots + s) * d;
    const int64_t p = static_cast<int64_t>(pos + row % t) * half;
#pragma unroll
    for (int i = 0; i < PL; ++i) {
      const int j = lane + 32 * i;
      const bool ok = row < rows && j < half;
      x1[r][i] = ok ? to_f(x[j]) : 0.f, x2[r][i] = ok ? to_f(x[j + half]) : 0.f, c[r][i] = ok ? cos[p + j] : 0.f, sn[r][i] = ok ? sin[p + j] : 0.f;
    }
  }
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const uint32_t row = row0 + r;
    float a[PL], b[PL], ss = 0.f;
#pragma unroll
    for (int i = 0; i < PL; ++i) a[i] = x1[r][i] * c[r][i] + x2[r][i] * sn[r][i], b[i] = -x1[r][i] * sn[r][i] + x2[r][i] * c[r][i], ss += a[i] * a[i] + b[i] * b[i];
    const float rs = rsqrtf(warp_sum(ss) / d + eps);
    if (row >= rows) continue;
    T* y = o.out(row, s);
#pragma unroll
    for (int i = 0; i < PL; ++i) {
      const int j = lane + 32 * i;
      if (j < half) y[j] = from_f<T>(a[i] * rs), y[j + half] = from_f<T>(b[i] * rs);
    }
    if (lane == 0) rstd[static_cast<int64_t>(row) * (o.h + o.g) + s] = rs;
  }
}

// dqkv [rows, (H+2G)·D] from dq, dk, dv (any strides for B, T and heads: SDPA's gradients come as [B,heads,T,D] views)
template <typename T> struct Grads {
  const T *q, *k, *v;
  int64_t sq[3], sk[3], sv[3];  // strides (elements) of b, t, head; D is contiguous
  __device__ const T* in(uint32_t row, int s, int h, int g, uint32_t t) const {
    const uint32_t b = row / t, i = row - b * t;
    return s < h ? q + b * sq[0] + i * sq[1] + s * sq[2] : s < h + g ? k + b * sk[0] + i * sk[1] + (s - h) * sk[2] : v + b * sv[0] + i * sv[1] + (s - h - g) * sv[2];
  }
};

template <typename T, int PL>
__global__ void __launch_bounds__(NT) rope_norm_bwd(const T* qkv, Grads<T> gi, const float* cos, const float* sin, const float* rstd, T* dqkv, uint32_t rows,
                                                     int h, int g, int d, uint32_t t, int pos) {
  const int slots = h + 2 * g, half = d / 2, s = blockIdx.y, lane = threadIdx.x % 32;
  const uint32_t row0 = slot_row0();
  if (row0 >= rows) return;
  if (s >= h + g) {  // v: a copy
    for (uint32_t row = row0; row < min(row0 + RPW, rows); ++row) {
      const T* gy = gi.in(row, s, h, g, t);
      T* dx = dqkv + (static_cast<int64_t>(row) * slots + s) * d;
      for (int j = lane; j < d; j += 32) dx[j] = gy[j];
    }
    return;
  }
  float x1[RPW][PL], x2[RPW][PL], c[RPW][PL], sn[RPW][PL], g1[RPW][PL], g2[RPW][PL], rs[RPW];
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const uint32_t row = row0 + r;
    const bool real = row < rows;
    const T* x = qkv + (static_cast<int64_t>(row) * slots + s) * d;
    const T* gy = real ? gi.in(row, s, h, g, t) : nullptr;
    const int64_t p = static_cast<int64_t>(pos + row % t) * half;
    rs[r] = real ? rstd[static_cast<int64_t>(row) * (h + g) + s] : 0.f;
#pragma unroll
    for (int i = 0; i < PL; ++i) {
      const int j = lane + 32 * i;
      const bool ok = real && j < half;
      x1[r][i] = ok ? to_f(x[j]) : 0.f, x2[r][i] = ok ? to_f(x[j + half]) : 0.f, c[r][i] = ok ? cos[p + j] : 0.f, sn[r][i] = ok ? sin[p + j] : 0.f;
      g1[r][i] = ok ? to_f(gy[j]) : 0.f, g2[r][i] = ok ? to_f(gy[j + half]) : 0.f;
    }
  }
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const uint32_t row = row0 + r;
    float a[PL], b[PL], dot = 0.f;  // ŷ = (a, b)·r, the normed rotation; dot = Σ dy·ŷ
#pragma unroll
    for (int i = 0; i < PL; ++i) {
      a[i] = (x1[r][i] * c[r][i] + x2[r][i] * sn[r][i]) * rs[r], b[i] = (-x1[r][i] * sn[r][i] + x2[r][i] * c[r][i]) * rs[r];
      dot += g1[r][i] * a[i] + g2[r][i] * b[i];
    }
    dot = warp_sum(dot) / d;
    if (row >= rows) continue;
    T* dx = dqkv + (static_cast<int64_t>(row) * slots + s) * d;
#pragma unroll
    for (int i = 0; i < PL; ++i) {
      const int j = lane + 32 * i;
      const float da = rs[r] * (g1[r][i] - a[i] * dot), db = rs[r] * (g2[r][i] - b[i] * dot);
      if (j < half) dx[j] = from_f<T>(da * c[r][i] - db * sn[r][i]), dx[j + half] = from_f<T>(da * sn[r][i] + db * c[r][i]);  // the rotation's transpose
    }
  }
}

// Calls f(integral_constant<PL>) for the pairs a lane takes at head dim d (even, ≤ 256: ext.cpp checks).
template <typename F> cudaError_t with_pairs(int d, F f) {
  switch ((d / 2 + 31) / 32) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

// ---- relu2, elementwise over n: 16 bytes a thread an iteration where all pointers are 16-byte aligned (2-byte bf16
// accesses left the kernels at 60% of the memory bandwidth), then the tail.
template <typename T, int VEC> struct Pack {
  alignas(16) T v[VEC];
};
template <typename T, int VEC> __device__ inline Pack<T, VEC> ld(const T* p) {
  Pack<T, VEC> r;
  if constexpr (VEC * sizeof(T) == 16) *reinterpret_cast<uint4*>(r.v) = *reinterpret_cast<const uint4*>(p);
  else for (int e = 0; e < VEC; ++e) r.v[e] = p[e];
  return r;
}
template <typename T, int VEC> __device__ inline void st(T* p, const Pack<T, VEC>& r) {
  if constexpr (VEC * sizeof(T) == 16) *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(r.v);
  else for (int e = 0; e < VEC; ++e) p[e] = r.v[e];
}
__device__ inline int64_t thread_id() { return static_cast<int64_t>(blockIdx.x) * NT + threadIdx.x; }
__device__ inline int64_t threads() { return static_cast<int64_t>(gridDim.x) * NT; }

template <typename T, int VEC> __global__ void __launch_bounds__(NT) relu2_fwd(const T* u, T* h, int64_t n) {
  for (int64_t i = thread_id() * VEC; i < n; i += threads() * VEC) {
    if (i + VEC <= n) {
      Pack<T, VEC> a = ld<T, VEC>(u + i);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float x = fmaxf(to_f(a.v[e]), 0.f);
        a.v[e] = from_f<T>(x * x);
      }
      st<T, VEC>(h + i, a);
    } else {
      for (int64_t j = i; j < n; ++j) {
        const float x = fmaxf(to_f(u[j]), 0.f);
        h[j] = from_f<T>(x * x);
      }
    }
  }
}

template <typename T, int VEC> __global__ void __launch_bounds__(NT) relu2_bwd(const T* u, const T* dh, T* du, int64_t n) {
  for (int64_t i = thread_id() * VEC; i < n; i += threads() * VEC) {
    if (i + VEC <= n) {
      const Pack<T, VEC> a = ld<T, VEC>(u + i), g = ld<T, VEC>(dh + i);
      Pack<T, VEC> r;
#pragma unroll
      for (int e = 0; e < VEC; ++e) r.v[e] = from_f<T>(2.f * fmaxf(to_f(a.v[e]), 0.f) * to_f(g.v[e]));
      st<T, VEC>(du + i, r);
    } else {
      for (int64_t j = i; j < n; ++j) du[j] = from_f<T>(2.f * fmaxf(to_f(u[j]), 0.f) * to_f(dh[j]));
    }
  }
}

bool aligned16(std::initializer_list<const void*> ps) {
  for (const void* p : ps)
    if (reinterpret_cast<uintptr_t>(p) % 16) return false;
  return true;
}

unsigned blocks_for_warps(int64_t warps) { return static_cast<unsigned>((warps + WARPS - 1) / WARPS); }
unsigned blocks_for(int64_t n) { return static_cast<unsigned>(std::min<int64_t>((n + NT - 1) / NT, 132 * 16)); }  // grid-stride beyond 16 blocks an SM
}  // namespace

// Each returns a cudaError_t. Pointers are on the current device; rows, heads and d as the kernels above describe.
// bf16 flags: x/in (first) and y/out (second) dtypes, else fp32.
// Calls f(A{}, B{}) with A, B each bf16 or float by the flags.
template <typename F> void with_dtypes(int a_bf16, int b_bf16, F f) {
  if (a_bf16) b_bf16 ? f(bf16{}, bf16{}) : f(bf16{}, 0.f);
  else b_bf16 ? f(0.f, bf16{}) : f(0.f, 0.f);
}

extern "C" int tg_rmsnorm_fwd(const void* x, void* y, float* rstd, int64_t n, int c, float eps, int x_bf16, int y_bf16, cudaStream_t st) {
  with_dtypes(x_bf16, y_bf16, [&](auto ti, auto to) {
    using TI = decltype(ti);
    using TO = decltype(to);
    rmsnorm_fwd<TI, TI, TO><<<blocks_for_warps(n), NT, 0, st>>>(static_cast<const TI*>(x), nullptr, nullptr, static_cast<TO*>(y), rstd, n, c, eps);
  });
  return cudaGetLastError();
}

extern "C" int tg_rmsnorm_bwd(const void* x, const void* dy, const float* rstd, void* dx, int64_t n, int c, int x_bf16, int y_bf16, cudaStream_t st) {
  with_dtypes(x_bf16, y_bf16, [&](auto ti, auto to) {
    using TI = decltype(ti);
    using TO = decltype(to);
    rmsnorm_bwd<TI, TI, TO><<<blocks_for_warps(n), NT, 0, st>>>(static_cast<const TI*>(x), static_cast<const TO*>(dy), nullptr, rstd, static_cast<TI*>(dx), nullptr, n, c);
  });
  return cudaGetLastError();
}

// x, s [n, c] fp32; y and dy in y's dtype, h and dh in h's (bf16 flags), rstd [n]; ds_in may be null.
extern "C" int tg_add_rmsnorm_fwd(const float* x, const void* y, float* s, void* h, float* rstd, int64_t n, int c, float eps, int y_bf16, int h_bf16, cudaStream_t st) {
  with_dtypes(y_bf16, h_bf16, [&](auto ty, auto to) {
    using TY = decltype(ty);
    using TO = decltype(to);
    rmsnorm_fwd<float, TY, TO><<<blocks_for_warps(n), NT, 0, st>>>(x, static_cast<const TY*>(y), s, static_cast<TO*>(h), rstd, n, c, eps);
  });
  return cudaGetLastError();
}

extern "C" int tg_add_rmsnorm_bwd(const float* s, const void* dh, const float* ds_in, const float* rstd, float* dx, void* dy, int64_t n, int c, int y_bf16, int h_bf16,
                                  cudaStream_t st) {
  with_dtypes(y_bf16, h_bf16, [&](auto ty, auto to) {
    using TY = decltype(ty);
    using TO = decltype(to);
    rmsnorm_bwd<float, TY, TO><<<blocks_for_warps(n), NT, 0, st>>>(s, static_cast<const TO*>(dh), ds_in, rstd, dx, static_cast<TY*>(dy), n, c);
  });
  return cudaGetLastError();
}

// qkv [rows = B·T < 2³¹, (h+2g)·d] → q [rows, h, d], k and v [rows, g, d]; rstd [rows, h+g]; positions pos + (row mod t).
extern "C" int tg_rope_norm_fwd(const void* qkv, void* q, void* k, void* v, const float* cos, const float* sin, float* rstd, int64_t rows, int h, int g, int d,
                                int t, int pos, float eps, int bf16_, cudaStream_t st) {
  const dim3 grid(blocks_for_warps((rows + RPW - 1) / RPW), static_cast<unsigned>(h + 2 * g));
  const auto n = static_cast<uint32_t>(rows), tt = static_cast<uint32_t>(t);
  return with_pairs(d, [&](auto pl) {
    constexpr int PL = decltype(pl)::value;
    if (bf16_)
      rope_norm_fwd<bf16, PL><<<grid, NT, 0, st>>>(static_cast<const bf16*>(qkv), Heads<bf16>{static_cast<bf16*>(q), static_cast<bf16*>(k), static_cast<bf16*>(v), h, g, d},
                                                   cos, sin, rstd, n, tt, pos, eps);
    else
      rope_norm_fwd<float, PL><<<grid, NT, 0, st>>>(static_cast<const float*>(qkv),
                                                    Heads<float>{static_cast<float*>(q), static_cast<float*>(k), static_cast<float*>(v), h, g, d}, cos, sin, rstd, n, tt,
                                                    pos, eps);
  });
}

// dq, dk, dv with strides (b, t, head) as 3 int64 each → dqkv [rows, (h+2g)·d].
extern "C" int tg_rope_norm_bwd(const void* qkv, const void* dq, const void* dk, const void* dv, const int64_t* strides, const float* cos, const float* sin,
                                const float* rstd, void* dqkv, int64_t rows, int h, int g, int d, int t, int pos, int bf16_, cudaStream_t st) {
  const dim3 grid(blocks_for_warps((rows + RPW - 1) / RPW), static_cast<unsigned>(h + 2 * g));
  return with_pairs(d, [&](auto pl) {
    constexpr int PL = decltype(pl)::value;
    auto launch = [&](auto zero) {
      using T = decltype(zero);
      Grads<T> gi{static_cast<const T*>(dq), static_cast<const T*>(dk), static_cast<const T*>(dv), {}, {}, {}};
      for (int i = 0; i < 3; ++i) gi.sq[i] = strides[i], gi.sk[i] = strides[3 + i], gi.sv[i] = strides[6 + i];
      rope_norm_bwd<T, PL><<<grid, NT, 0, st>>>(static_cast<const T*>(qkv), gi, cos, sin, rstd, static_cast<T*>(dqkv), static_cast<uint32_t>(rows), h, g, d,
                                                static_cast<uint32_t>(t), pos);
    };
    if (bf16_) launch(bf16{}); else launch(0.f);
  });
}

extern "C" int tg_relu2_fwd(const void* u, void* h, int64_t n, int bf16_, cudaStream_t st) {
  auto go = [&](auto zero, auto vec) {
    using T = decltype(zero);
    constexpr int V = decltype(vec)::value;
    relu2_fwd<T, V><<<blocks_for((n + V - 1) / V), NT, 0, st>>>(static_cast<const T*>(u), static_cast<T*>(h), n);
  };
  const bool wide = aligned16({u, h});
  if (bf16_) wide ? go(bf16{}, std::integral_constant<int, 8>{}) : go(bf16{}, std::integral_constant<int, 1>{});
  else wide ? go(0.f, std::integral_constant<int, 4>{}) : go(0.f, std::integral_constant<int, 1>{});
  return cudaGetLastError();
}

extern "C" int tg_relu2_bwd(const void* u, const void* dh, void* du, int64_t n, int bf16_, cudaStream_t st) {
  auto go = [&](auto zero, auto vec) {
    using T = decltype(zero);
    constexpr int V = decltype(vec)::value;
    relu2_bwd<T, V><<<blocks_for((n + V - 1) / V), NT, 0, st>>>(static_cast<const T*>(u), static_cast<const T*>(dh), static_cast<T*>(du), n);
  };
  const bool wide = aligned16({u, dh, du});
  if (bf16_) wide ? go(bf16{}, std::integral_constant<int, 8>{}) : go(bf16{}, std::integral_constant<int, 1>{});
  else wide ? go(0.f, std::integral_constant<int, 4>{}) : go(0.f, std::integral_constant<int, 1>{});
  return cudaGetLastError();
}

// ---- taumode on tensor cores: per row x (a head of q or k, D bf16 values) E = xᵀLx / (xᵀx + ε) and λ = E/(E + τ) in
// fp32; backward dx = dλ·τ/(E+τ)² · ((L + Lᵀ)x − 2E·x)/(xᵀx + ε). Both are y = x·M (M = L, or L + Lᵀ) then a dot with
// x: a warp takes 16 rows as the A operand of mma.sync m16n8k16, M the B operand. bf16 x is exact in bf16, and M is
// split into two bf16 terms M₁ = bf16(M), M₂ = bf16(M − M₁), each product exact in the fp32 accumulator: M₁ + M₂ is
// within 2⁻¹⁸·|M| of M entrywise, the worst-case rounding of a 64-term fp32 dot product (64·2⁻²⁴), at two tensor-core
// passes (a third term, 24 bits, cost 12 µs a call more on the H200), where fp32 FMAs on the CUDA cores cost 20× the time.
// The thread holding y_rj in the accumulator also holds x_rj in its A fragment, so the dot needs no shuffle but a
// quad's sum. x is [B, heads, T, D] with any strides but D's (q and k are transposed views of [B, T, heads, D]); dx
// takes x's.
namespace {
using namespace tg;
constexpr int LAM_NT = 128;
constexpr int LAM_PARTS = 2;
struct Rows {
  int64_t sb, sh, st;  // element strides of b, head, t (even: rows start on 4 bytes)
  uint32_t heads, t;   // rows < 2³¹ (kernels/ext.cpp checks): 32-bit divisions, a fifth of the 64-bit ones' cost
  __device__ int64_t at(int64_t row) const {
    const uint32_t r = static_cast<uint32_t>(row), bh = r / t;
    return static_cast<int64_t>(bh / heads) * sb + static_cast<int64_t>(bh % heads) * sh + static_cast<int64_t>(r - bh * t) * st;
  }
};

// Shared memory: M's B fragments, part-major, then k-chunk, then 8-column tile, then lane: {b0, b1} adjacent.
__host__ __device__ constexpr int lam_words(int d) { return LAM_PARTS * (d / 16) * (d / 8) * 32; }

template <int D> __device__ inline const uint2& lam_frag(const uint2* sf, int part, int kc, int nt) {
  return sf[((part * (D / 16) + kc) * (D / 8) + nt) * 32 + threadIdx.x % 32];
}

// M (fp32 [D, D], row-major) split into its bf16 terms, laid out as lam_frag reads them, into global memory once a call
// (every block of lambda_mma copies it). Lane (g, t) of tile (kc, nt) holds M[k][n], M[k+1][n] and M[k+8][n], M[k+9][n]
// for k = 16kc + 2t, n = 8nt + g.
template <int D> __global__ void __launch_bounds__(LAM_NT) lam_split(uint2* frags, const float* m) {
  const int w = blockIdx.x * LAM_NT + threadIdx.x;
  if (w < lam_words(D)) {
    const int lane = w % 32, nt = w / 32 % (D / 8), kc = w / 32 / (D / 8) % (D / 16), part = w / 32 / (D / 8) / (D / 16);
    const int n = nt * 8 + lane / 4, k = kc * 16 + 2 * (lane % 4);
    float q[4] = {m[k * D + n], m[(k + 1) * D + n], m[(k + 8) * D + n], m[(k + 9) * D + n]};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float r = q[e];  // peel off part + 1 terms; keep the last
      for (int p = 0; p <= part; ++p) q[e] = bf16_round(r), r -= q[e];
    }
    frags[w] = make_uint2(pack2(q[0], q[1]), pack2(q[2], q[3]));
  }
}

// Forward (BWD false): e_out, lam_out [rows]. Backward: dx from e_in and dlam [rows]. frags: lam_split of L (forward)
// or L + Lᵀ.
template <int D, bool BWD>
__global__ void __launch_bounds__(LAM_NT) lambda_mma(const bf16* __restrict__ x, Rows rw, const uint2* __restrict__ frags, const float* __restrict__ e_in,
                                                     const float* __restrict__ dlam, float* __restrict__ e_out, float* __restrict__ lam_out, bf16* __restrict__ dx,
                                                     int64_t rows, float eps, float tau) {
  extern __shared__ uint2 sf[];
  for (int i = threadIdx.x; i < lam_words(D); i += LAM_NT) sf[i] = frags[i];
  __syncthreads();
  const int lane = threadIdx.x % 32, t = lane % 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * (LAM_NT / 32) * 16;
  // The 16 rows from r0 as A fragments: (ra, 16kc + 2t ..), (rb, ..), (ra, 16kc + 8 + 2t ..), (rb, ..); rows past the
  // end as zeros. The next group's are loaded before this group's products, to hide the loads' latency.
  auto load = [&](int64_t r0, uint32_t (&f)[D / 16][4]) {
    const int64_t ra = r0 + lane / 4, rb = ra + 8;
    const bf16* pa = ra < rows ? x + rw.at(ra) : nullptr;
    const bf16* pb = rb < rows ? x + rw.at(rb) : nullptr;
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc) {
      const int c = kc * 16 + 2 * t;
      f[kc][0] = pa ? *reinterpret_cast<const uint32_t*>(pa + c) : 0u;
      f[kc][1] = pb ? *reinterpret_cast<const uint32_t*>(pb + c) : 0u;
      f[kc][2] = pa ? *reinterpret_cast<const uint32_t*>(pa + c + 8) : 0u;
      f[kc][3] = pb ? *reinterpret_cast<const uint32_t*>(pb + c + 8) : 0u;
    }
  };
  int64_t r0 = (static_cast<int64_t>(blockIdx.x) * (LAM_NT / 32) + threadIdx.x / 32) * 16;
  uint32_t xf[D / 16][4], xn[D / 16][4];
  load(r0, xf);
  for (; r0 < rows; r0 += stride) {
    load(r0 + stride, xn);
    const int64_t ra = r0 + lane / 4, rb = ra + 8;  // this lane's rows
    const bool va = ra < rows, vb = rb < rows;
    const int64_t oa = va ? rw.at(ra) : 0, ob = vb ? rw.at(rb) : 0;
    float y[D / 8][4] = {};  // x·M: (ra, 8nt + 2t ..), (rb, ..)
#pragma unroll
    for (int part = LAM_PARTS - 1; part >= 0; --part)  // the small terms first
#pragma unroll
      for (int kc = 0; kc < D / 16; ++kc)
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt) {
          const uint2 b = lam_frag<D>(sf, part, kc, nt);
          mma16816(y[nt], xf[kc], b.x, b.y);
        }
    float xxa = 0.f, xxb = 0.f, xya = 0.f, xyb = 0.f;
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      const float2 pa = unpack2(xf[nt / 2][nt % 2 * 2]), pb = unpack2(xf[nt / 2][nt % 2 * 2 + 1]);  // x where y[nt] is
      xxa += pa.x * pa.x + pa.y * pa.y, xxb += pb.x * pb.x + pb.y * pb.y;
      xya += pa.x * y[nt][0] + pa.y * y[nt][1], xyb += pb.x * y[nt][2] + pb.y * y[nt][3];
    }
    for (int s = 1; s < 4; s *= 2) {
      xxa += __shfl_xor_sync(FULL, xxa, s), xxb += __shfl_xor_sync(FULL, xxb, s);
      xya += __shfl_xor_sync(FULL, xya, s), xyb += __shfl_xor_sync(FULL, xyb, s);
    }
    if (!BWD) {
      const float ea = xya / (xxa + eps), eb = xyb / (xxb + eps);
      if (t == 0 && va) e_out[ra] = ea, lam_out[ra] = ea / (ea + tau);
      if (t == 0 && vb) e_out[rb] = eb, lam_out[rb] = eb / (eb + tau);
    } else {
      const float ea = va ? e_in[ra] : 0.f, eb = vb ? e_in[rb] : 0.f;
      const float ga = va ? dlam[ra] * tau / ((ea + tau) * (ea + tau)) / (xxa + eps) : 0.f;
      const float gb = vb ? dlam[rb] * tau / ((eb + tau) * (eb + tau)) / (xxb + eps) : 0.f;
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) {
        const float2 pa = unpack2(xf[nt / 2][nt % 2 * 2]), pb = unpack2(xf[nt / 2][nt % 2 * 2 + 1]);
        const int c = nt * 8 + 2 * t;
        if (va) *reinterpret_cast<uint32_t*>(dx + oa + c) = pack2(ga * (y[nt][0] - 2.f * ea * pa.x), ga * (y[nt][1] - 2.f * ea * pa.y));
        if (vb) *reinterpret_cast<uint32_t*>(dx + ob + c) = pack2(gb * (y[nt][2] - 2.f * eb * pb.x), gb * (y[nt][3] - 2.f * eb * pb.y));
      }
    }
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc)
#pragma unroll
      for (int e = 0; e < 4; ++e) xf[kc][e] = xn[kc][e];
  }
}

template <bool BWD>
cudaError_t lam_launch(const void* x, Rows rw, const float* m, void* scratch, const float* e_in, const float* dlam, float* e_out, float* lam_out, void* dx,
                       int64_t rows, int d, float eps, float tau, cudaStream_t s) {
  auto go = [&](auto dim) -> cudaError_t {
    constexpr int D = decltype(dim)::value;
    constexpr size_t smem = sizeof(uint2) * lam_words(D);
    if (cudaError_t err = cudaFuncSetAttribute(lambda_mma<D, BWD>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem))) return err;
    uint2* frags = static_cast<uint2*>(scratch);
    lam_split<D><<<(lam_words(D) + LAM_NT - 1) / LAM_NT, LAM_NT, 0, s>>>(frags, m);
    // each block copies the fragments into shared memory once, so blocks stride over many rows: as many as fit at once
    int dev = 0, sms = 0, fit = 0;
    if (cudaError_t err = cudaGetDevice(&dev)) return err;
    if (cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) return err;
    if (cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fit, lambda_mma<D, BWD>, LAM_NT, smem)) return err;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((rows + LAM_NT / 2 - 1) / (LAM_NT / 2), static_cast<int64_t>(sms) * std::max(fit, 1)));
    lambda_mma<D, BWD><<<blocks, LAM_NT, smem, s>>>(static_cast<const bf16*>(x), rw, frags, e_in, dlam, e_out, lam_out, static_cast<bf16*>(dx), rows, eps, tau);
    return cudaGetLastError();
  };
  return with_head_dim(d, go);
}
}  // namespace

// x (bf16) rows as described by (sb, sh, st, heads, t); e, lam [rows] fp32 out. lap [d, d] fp32, d ∈ {32, 64, 128};
// scratch: tg_lambda_scratch_bytes(d) bytes on the device, 8-byte aligned. Returns a cudaError_t.
extern "C" int tg_lambda_fwd(const void* x, int64_t sb, int64_t sh, int64_t st, int heads, int t, const float* lap, void* scratch, float* e, float* lam, int64_t rows,
                             int d, float eps, float tau, cudaStream_t s) {
  return lam_launch<false>(x, Rows{sb, sh, st, static_cast<uint32_t>(heads), static_cast<uint32_t>(t)}, lap, scratch, nullptr, nullptr, e, lam, nullptr, rows, d, eps, tau, s);
}

extern "C" int64_t tg_lambda_scratch_bytes(int d) { return static_cast<int64_t>(sizeof(uint2)) * lam_words(d); }

// dx (x's strides, bf16) from dlam [rows] fp32; lap_sym = L + Lᵀ.
extern "C" int tg_lambda_bwd(const void* x, int64_t sb, int64_t sh, int64_t st, int heads, int t, const float* lap_sym, void* scratch, const float* e,
                             const float* dlam, void* dx, int64_t rows, int d, float eps, float tau, cudaStream_t s) {
  return lam_launch<true>(x, Rows{sb, sh, st, static_cast<uint32_t>(heads), static_cast<uint32_t>(t)}, lap_sym, scratch, e, dlam, nullptr, nullptr, dx, rows, d, eps, tau, s);
}
