// The CUDA kernels' C entry points (kernels/tau_attn.cu, kernels/block_ops.cu, kernels/tau_bias.cu, kernels/softcap_ce.cu), declared once:
// the .cu files that define them, kernels/ext.cpp that calls them and kernels/kbench.cu include this, so a signature
// that drifts fails to compile instead of linking to the wrong arguments. Each returns a cudaError_t (as int); what the
// arguments mean is with each definition.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

extern "C" {
// kernels/tau_attn.cu
int tg_tau_flash_forward(const float* lq, const float* lk, const void* v, const int64_t* sv, const float* inv_temp, void* out, const int64_t* so,
                         float* out32, float* mx, float* inv_l, int bh, int heads, int tq, int tk, int d, cudaStream_t stream);
int tg_tau_flash_backward(const float* lq, const float* lk, const void* v, const int64_t* sv, const float* inv_temp, const float* out32,
                          const void* dout, const int64_t* sd, const float* mx, const float* inv_l, float* delta, float* dlq, float* dlk, void* dv, const int64_t* sdv,
                          float* dinv_temp, int bh, int heads, int tq, int tk, int d, cudaStream_t stream);

// kernels/block_ops.cu
int tg_rmsnorm_fwd(const void* x, void* y, float* rstd, int64_t n, int c, float eps, int x_bf16, int y_bf16, cudaStream_t st);
int tg_rmsnorm_bwd(const void* x, const void* dy, const float* rstd, void* dx, int64_t n, int c, int x_bf16, int y_bf16, cudaStream_t st);
int tg_add_rmsnorm_fwd(const float* x, const void* y, float* s, void* h, float* rstd, int64_t n, int c, float eps, int y_bf16, int h_bf16, cudaStream_t st);
int tg_add_rmsnorm_bwd(const float* s, const void* dh, const float* ds_in, const float* rstd, float* dx, void* dy, int64_t n, int c, int y_bf16, int h_bf16,
                       cudaStream_t st);
int tg_rope_norm_fwd(const void* qkv, void* q, void* k, void* v, const float* cos, const float* sin, float* rstd, int64_t rows, int h, int g, int d, int t,
                     int pos, float eps, int bf16_, cudaStream_t st);
int tg_rope_norm_bwd(const void* qkv, const void* dq, const void* dk, const void* dv, const int64_t* strides, const float* cos, const float* sin,
                     const float* rstd, void* dqkv, int64_t rows, int h, int g, int d, int t, int pos, int bf16_, cudaStream_t st);
int tg_relu2_fwd(const void* u, void* h, int64_t n, int bf16_, cudaStream_t st);
int tg_relu2_bwd(const void* u, const void* dh, void* du, int64_t n, int bf16_, cudaStream_t st);
int tg_lambda_fwd(const void* x, int64_t sb, int64_t sh, int64_t st, int heads, int t, const float* lap, void* scratch, float* e, float* lam, int64_t rows, int d,
                  float eps, float tau, cudaStream_t s);
int tg_lambda_bwd(const void* x, int64_t sb, int64_t sh, int64_t st, int heads, int t, const float* lap_sym, void* scratch, const float* e, const float* dlam,
                  void* dx, int64_t rows, int d, float eps, float tau, cudaStream_t s);
int64_t tg_lambda_scratch_bytes(int d);

// kernels/tau_bias.cu
int tg_tau_bias_forward(const float* lq, const float* lk, const float* alpha, void* out, int bh, int heads, int tq, int tk, cudaStream_t st);
int tg_tau_bias_backward(const float* lq, const float* lk, const float* alpha, const void* g, float* dlq, float* dlk, float* dalpha, int bh,
                         int heads, int tq, int tk, cudaStream_t st);

// kernels/softcap_ce.cu
int tg_softcap_ce_launch(void* z, const int64_t* y, float* loss, int n, int v, float cap, float scale, int grad, int is_bf16, cudaStream_t stream);
}
