// Microbenchmark of the tau and block kernels through their C launchers (kernels/tau_attn.cu, kernels/block_ops.cu),
// without torch: random inputs at the speedrun's shape (B 64, H 6, T 1024, D 64), each launcher timed with CUDA events
// over `reps` launches after three warm-up ones, then checksums of the outputs so that two builds can be compared. Not
// part of the harness build: it times two builds' kernels side by side in one GPU command. Build (here, no GPU needed) and run (on the GPU box):
//   NV=.venv/torch/../nvidia/cu13; F="-gencode=arch=compute_90,code=sm_90 -std=c++17 -O3"
//   $NV/bin/nvcc -c kernels/tau_attn.cu -o /tmp/ta.o $F && $NV/bin/nvcc -c kernels/block_ops.cu -o /tmp/bo.o $F
//   $NV/bin/nvcc kernels/kbench.cu /tmp/ta.o /tmp/bo.o -o kbench $F -L$NV/lib -l:libcudart.so.13
//   LD_LIBRARY_PATH=<torch>/../nvidia/cu13/lib ./kbench [B H T D reps]
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <vector>
#include <cmath>
#include "launchers.h"
#define CK(x) do { int e_ = (x); if (e_) { printf("error %s at %s:%d\n", cudaGetErrorString((cudaError_t)e_), __FILE__, __LINE__); exit(1); } } while (0)
static uint64_t rs = 12345;
static float urand() { rs = rs * 6364136223846793005ull + 1442695040888963407ull; return (rs >> 40) / 16777216.f; }
static float nrand() { float u = urand() + 1e-7f, v = urand(); return sqrtf(-2 * logf(u)) * cosf(6.2831853f * v); }
template <class T> T* up(const std::vector<T>& h) { T* d; CK(cudaMalloc(&d, h.size() * sizeof(T))); CK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice)); return d; }
template <class T> std::vector<T> down(const T* d, size_t n) { std::vector<T> h(n); CK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost)); return h; }
double sum_f(const std::vector<float>& v) { double s = 0; for (float x : v) s += x; return s; }
double sum_b(const std::vector<__nv_bfloat16>& v) { double s = 0; for (auto x : v) s += fabs(__bfloat162float(x)); return s; }

int main(int argc, char** argv) {
  int B = argc > 1 ? atoi(argv[1]) : 64, H = argc > 2 ? atoi(argv[2]) : 6, T = argc > 3 ? atoi(argv[3]) : 1024, D = argc > 4 ? atoi(argv[4]) : 64, reps = argc > 5 ? atoi(argv[5]) : 20;
  const int64_t rows = int64_t(B) * H * T, n = rows * D;
  std::vector<__nv_bfloat16> hx(n), hv(n), hdo(n);
  for (auto& z : hx) z = __float2bfloat16(nrand());
  for (auto& z : hv) z = __float2bfloat16(nrand());
  for (auto& z : hdo) z = __float2bfloat16(nrand() * 1e-3f);
  std::vector<float> hlq(rows), hlk(rows), hl(D * D), hls(D * D), hdl(rows);
  for (auto& z : hlq) z = urand();
  for (auto& z : hlk) z = urand();
  for (auto& z : hdl) z = nrand();
  for (int i = 0; i < D; ++i) for (int j = 0; j < D; ++j) hl[i * D + j] = (i == j ? 1.f : 0.f) - (std::abs(i - j) == 1 ? 0.5f : 0.f) + 0.01f * nrand();
  for (int i = 0; i < D; ++i) for (int j = 0; j < D; ++j) hls[i * D + j] = hl[i * D + j] + hl[j * D + i];
  std::vector<float> hit(H, 10.f);
  auto *x = up(hx), *v = up(hv), *dout = up(hdo);
  auto *lq = up(hlq), *lk = up(hlk), *lap = up(hl), *laps = up(hls), *dlam = up(hdl), *it = up(hit);
  __nv_bfloat16 *out, *dv, *dx; float *out32, *mx, *il, *delta, *dlq, *dlk, *dit, *e, *lam; void* scratch;
  CK(cudaMalloc(&out, n * 2)); CK(cudaMalloc(&dv, n * 2)); CK(cudaMalloc(&dx, n * 2)); CK(cudaMalloc(&out32, n * 4));
  for (float** p : {&mx, &il, &delta, &dlq, &dlk, &e, &lam}) CK(cudaMalloc(p, rows * 4));
  CK(cudaMalloc(&dit, H * 4)); CK(cudaMalloc(&scratch, tg_lambda_scratch_bytes(D)));
  // [B,T,H,D] memory viewed as [B,H,T,D]: strides (T·H·D, D, H·D)
  const int64_t s[3] = {int64_t(T) * H * D, D, int64_t(H) * D};
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  auto time = [&](const char* name, auto f) {
    for (int i = 0; i < 3; ++i) CK(f());
    CK(cudaDeviceSynchronize());
    cudaEventRecord(a);
    for (int i = 0; i < reps; ++i) f();
    cudaEventRecord(b); CK(cudaEventSynchronize(b)); CK(cudaGetLastError());
    float ms; cudaEventElapsedTime(&ms, a, b);
    printf("%-14s %8.1f us\n", name, 1e3f * ms / reps);
  };
  time("lambda_fwd", [&] { return tg_lambda_fwd(x, s[0], s[1], s[2], H, T, lap, scratch, e, lam, rows, D, 1e-8f, 1.f, 0); });
  time("lambda_bwd", [&] { return tg_lambda_bwd(x, s[0], s[1], s[2], H, T, laps, scratch, e, dlam, dx, rows, D, 1e-8f, 1.f, 0); });
  time("tau_fwd", [&] { return tg_tau_flash_forward(lq, lk, v, s, it, out, s, out32, mx, il, B * H, H, T, T, D, 0); });
  time("tau_bwd", [&] {
    cudaMemsetAsync(dlq, 0, rows * 4); cudaMemsetAsync(dit, 0, H * 4);
    return tg_tau_flash_backward(lq, lk, v, s, it, out32, dout, s, mx, il, delta, dlq, dlk, dv, s, dit, B * H, H, T, T, D, 0);
  });
  {  // the block kernels at the speedrun shape: rows B·T, H = G heads of D; relu2 over B·T·4·H·D
    const int64_t rows2 = int64_t(B) * T, nq = rows2 * 3 * H * D, n4 = rows2 * 4 * H * D;
    __nv_bfloat16 *qkv, *q, *k, *v2, *dqkv, *u, *hh, *du; float *cs, *sn, *rstd;
    CK(cudaMalloc(&qkv, nq * 2)); CK(cudaMalloc(&dqkv, nq * 2)); CK(cudaMalloc(&q, nq * 2 / 3)); CK(cudaMalloc(&k, nq * 2 / 3)); CK(cudaMalloc(&v2, nq * 2 / 3));
    CK(cudaMalloc(&u, n4 * 2)); CK(cudaMalloc(&hh, n4 * 2)); CK(cudaMalloc(&du, n4 * 2));
    CK(cudaMalloc(&cs, T * D / 2 * 4)); CK(cudaMalloc(&sn, T * D / 2 * 4)); CK(cudaMalloc(&rstd, rows2 * 2 * H * 4));
    CK(cudaMemset(qkv, 0x3c, nq * 2)); CK(cudaMemset(u, 0x3c, n4 * 2)); CK(cudaMemset(cs, 0, T * D * 2)); CK(cudaMemset(sn, 0, T * D * 2));
    const int64_t sg[9] = {int64_t(T) * H * D, H * D, D, int64_t(T) * H * D, H * D, D, int64_t(T) * H * D, H * D, D};
    time("rope_fwd", [&] { return tg_rope_norm_fwd(qkv, q, k, v2, cs, sn, rstd, rows2, H, H, D, T, 0, 1e-6f, 1, 0); });
    time("rope_bwd", [&] { return tg_rope_norm_bwd(qkv, q, k, v2, sg, cs, sn, rstd, dqkv, rows2, H, H, D, T, 0, 1, 0); });
    time("relu2_fwd", [&] { return tg_relu2_fwd(u, hh, n4, 1, 0); });
    time("relu2_bwd", [&] { return tg_relu2_bwd(u, hh, du, n4, 1, 0); });
  }
  CK(cudaDeviceSynchronize());
  // checksums, to compare variants' results
  printf("check lam %.6e e %.6e dx %.6e out %.6e l %.6e dlq %.6e dlk %.6e dv %.6e dit %.6e\n", sum_f(down(lam, rows)), sum_f(down(e, rows)), sum_b(down(dx, n)),
         sum_b(down(out, n)), sum_f(down(il, rows)), sum_f(down(dlq, rows)), sum_f(down(dlk, rows)), sum_b(down(dv, n)), sum_f(down(dit, H)));
  return 0;
}
