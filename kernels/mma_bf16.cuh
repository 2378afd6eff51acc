// Device helpers shared by kernels/tau_attn.cu and kernels/block_ops.cu: bf16 rounding and packing as torch rounds
// (nearest even), the sm_80+ tensor-core product mma.sync m16n8k16 (bf16 in, fp32 accumulate), and the head-dim
// dispatch of the kernels built for D ∈ {32, 64, 128}.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cstdint>
#include <type_traits>

namespace tg {
__device__ inline float bf16_round(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }
__device__ inline uint32_t pack2(float lo, float hi) {  // two bf16, lo in the low half
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
__device__ inline float2 unpack2(uint32_t w) { return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&w)); }

// c (16×8 fp32) += a (16×16 bf16, row) · b (16×8 bf16, col). Lane l = 4g + t holds a = {(g, 2t..2t+1), (g+8, 2t..),
// (g, 2t+8..), (g+8, 2t+8..)}, b = {(2t..2t+1, g), (2t+8.., g)}, c = {(g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}.
__device__ inline void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Calls f(integral_constant<D>) for the head dim; an unsupported D is cudaErrorInvalidValue (kernels/ext.cpp refuses
// it first, with a message).
template <typename F> cudaError_t with_head_dim(int d, F f) {
  switch (d) {
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    case 128: return f(std::integral_constant<int, 128>{});
  }
  return cudaErrorInvalidValue;
}
}  // namespace tg
