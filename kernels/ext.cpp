// C++ glue over libtorch for what tch does not expose. Compiled by build.rs against the venv's torch headers.
#include <ATen/DeviceAccelerator.h>
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <string>
#include "launchers.h"

static void tg_err(char* err, size_t len, const std::exception& e) {
  std::string m = e.what();
  auto nl = m.find('\n');  // c10 errors carry a backtrace after the first line
  std::snprintf(err, len, "%s", m.substr(0, nl).c_str());
}

// Peak bytes allocated / reserved by the caching allocator since the last reset (torch.cuda.max_memory_*).
extern "C" void tg_memory_peaks(int device, int64_t* peak_allocated, int64_t* peak_reserved) {
  auto s = at::accelerator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
  constexpr size_t AGG = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
  *peak_allocated = s.allocated_bytes[AGG].peak;
  *peak_reserved = s.reserved_bytes[AGG].peak;
}

// Bytes the caching allocator holds allocated right now (torch.cuda.memory_allocated).
extern "C" int64_t tg_memory_allocated(int device) {
  auto s = at::accelerator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
  return s.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].current;
}

extern "C" void tg_reset_memory_peaks(int device) {
  at::accelerator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
}

// The current CUDA device of this thread (torch.cuda.set_device).
extern "C" void tg_set_device(int device) {
  at::accelerator::setDeviceIndex(static_cast<c10::DeviceIndex>(device));
}

// ---- The Kineto profiler (torch.profiler): CPU ops, and with cuda != 0 the CUDA kernels and runtime calls, of every
// thread (autograd's backward threads included) between start and stop; stop writes a Chrome trace (Perfetto opens it).
#include <torch/csrc/autograd/profiler_kineto.h>

extern "C" int tg_profile_start(int cuda, char* err, size_t errlen) {
  try {
    using namespace torch::profiler::impl;
    ProfilerConfig cfg(ProfilerState::KINETO, /*report_input_shapes=*/true);
    std::set<ActivityType> acts{ActivityType::CPU};
    if (cuda) acts.insert(ActivityType::CUDA);
    torch::autograd::profiler::prepareProfiler(cfg, acts);
    torch::autograd::profiler::enableProfiler(cfg, acts);
    return 0;
  } catch (const std::exception& e) {
    tg_err(err, errlen, e);
    return 1;
  }
}

extern "C" int tg_profile_stop(const char* path, char* err, size_t errlen) {
  try {
    torch::autograd::profiler::disableProfiler()->save(path);
    return 0;
  } catch (const std::exception& e) {
    tg_err(err, errlen, e);
    return 1;
  }
}

// ---- A scalar on its way to the host without a stream sync: a non-blocking copy into pinned memory and an event
// behind it, so the host can queue the next step before it reads this one's loss.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAEvent.h>

struct TgReadback {
  at::Tensor host;
  at::cuda::CUDAEvent done;
};

extern "C" void* tg_readback_start(at::Tensor* t, char* err, size_t errlen) {
  try {
    TORCH_CHECK(t->is_cuda() && t->numel() == 1, "readback: want one element on a CUDA device; got ", t->sizes(), " on ", t->device());
    auto r = new TgReadback();
    r->host = at::empty({}, at::TensorOptions().dtype(at::kDouble).pinned_memory(true));
    r->host.copy_(t->reshape({}).to(at::kDouble), /*non_blocking=*/true);
    r->done.record();
    return r;
  } catch (const std::exception& e) {
    tg_err(err, errlen, e);
    return nullptr;
  }
}

// Waits for the copy (not for the work queued after it) and frees the handle.
extern "C" double tg_readback_wait(void* h) {
  auto r = static_cast<TgReadback*>(h);
  r->done.synchronize();
  const double v = r->host.item<double>();
  delete r;
  return v;
}

// ---- Data-parallel training over libtorch's own c10d: a TCPStore rendezvous and ProcessGroupNCCL collectives.
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

struct TgDist {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupNCCL> pg;  // null on CPU: the store alone (rendezvous, failure detection)
  std::vector<c10::intrusive_ptr<c10d::Work>> pending;  // collectives queued since the last tg_dist_sync
  std::chrono::milliseconds timeout{0};
};

// Rank 0 serves the store at host:port; every rank waits there for all `world` ranks (up to timeout_ms), then,
// with nccl != 0, forms the NCCL group over the current CUDA device. Returns null and fills err on failure.
extern "C" void* tg_dist_init(const char* host, int port, int rank, int world, int timeout_ms, int nccl, char* err, size_t errlen) {
  try {
    c10d::TCPStoreOptions o;
    o.port = static_cast<std::uint16_t>(port);
    o.isServer = rank == 0;
    o.numWorkers = world;
    o.waitWorkers = true;
    o.timeout = std::chrono::milliseconds(timeout_ms);
    auto d = new TgDist();
    d->store = c10::make_intrusive<c10d::TCPStore>(host, o);
    if (nccl) {
      auto po = c10d::ProcessGroupNCCL::Options::create();
      po->timeout = std::chrono::milliseconds(2 * timeout_ms);  // NCCL's watchdog (which aborts with pages of traces) comes after tg_dist_sync's own limit
      d->timeout = std::chrono::milliseconds(timeout_ms);
      d->pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(d->store, rank, world, po);
    }
    return d;
  } catch (const std::exception& e) {
    tg_err(err, errlen, e);
    return nullptr;
  }
}

// In-place all-reduce of each tensor (op 0: sum, 1: average; all of one dtype), stream-ordered: the current stream waits for it on the
// GPU and the CPU runs on, so a step has no host stall between its backward, its Muon all-reduce and its update. The
// host reads a result only after tg_dist_sync. 0 on success.
extern "C" int tg_all_reduce(void* dist, at::Tensor** tensors, int n, int op, char* err, size_t errlen) {
  try {
    auto d = static_cast<TgDist*>(dist);
    TORCH_CHECK(d->pg, "no NCCL group: multi-process training needs CUDA");
    c10d::AllreduceCoalescedOptions o;
    o.reduceOp = op == 1 ? c10d::ReduceOp::AVG : c10d::ReduceOp::SUM;
    std::vector<at::Tensor> ts;
    for (int i = 0; i < n; i++) ts.push_back(*tensors[i]);
    auto w = d->pg->allreduce_coalesced(ts, o);  // one NCCL group on NCCL's stream, not one launch (and host round) a tensor
    w->synchronize();                            // the current stream waits for it, not the CPU
    d->pending.push_back(w);
    return 0;
  } catch (const std::exception& e) {
    tg_err(err, errlen, e);
    return 1;
  }
}

// Waits, polling, until every collective queued since the last call has completed on the GPU, for at most the
// group's timeout: a rank that died or hangs fails here with one message (and the communicators are aborted, so no
// kernel spins on at exit), never in a CUDA sync that would wait forever. 0 on success.
// With keep > 0 the last `keep` collectives queued stay pending (a step's own, while the previous step's are waited for).
extern "C" int tg_dist_sync(void* dist, int keep, char* err, size_t errlen) {
  auto d = static_cast<TgDist*>(dist);
  try {
    const auto t0 = std::chrono::steady_clock::now();
    const size_t upto = d->pending.size() - std::min<size_t>(std::max(keep, 0), d->pending.size());
    for (size_t i = 0; i < upto; ++i) {
      auto& w = d->pending[i];
      while (!w->isCompleted()) {
        if (std::chrono::steady_clock::now() - t0 > d->timeout) {
          d->pending.clear();
          try { d->pg->abort(); } catch (...) {}
          TORCH_CHECK(false, "a collective did not complete within ", d->timeout.count() / 1000.0, " s");
        }
        std::this_thread::sleep_for(std::chrono::microseconds(50));
      }
      if (w->exception()) std::rethrow_exception(w->exception());
    }
    d->pending.erase(d->pending.begin(), d->pending.begin() + upto);
    return 0;
  } catch (const std::exception& e) {
    tg_err(err, errlen, e);
    return 1;
  }
}

// Collectives queued and not yet waited for by tg_dist_sync.
extern "C" int tg_dist_pending(void* dist) { return static_cast<int>(static_cast<TgDist*>(dist)->pending.size()); }

// Store counter: adds `delta` to `key` and returns the new value; with wait_for > 0, then waits (up to the
// store's timeout) until the counter reaches wait_for. A barrier that also notices a rank that never comes.
extern "C" long long tg_store_add(void* dist, const char* key, long long delta, long long wait_for, char* err, size_t errlen) {
  try {
    auto d = static_cast<TgDist*>(dist);
    auto v = d->store->add(key, delta);
    auto t0 = std::chrono::steady_clock::now();
    while (wait_for > 0 && v < wait_for) {
      TORCH_CHECK(std::chrono::steady_clock::now() - t0 < d->store->getTimeout(), "timed out waiting for ", wait_for, " ranks at '", key, "' (", v, " came)");
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      v = d->store->add(key, 0);
    }
    return v;
  } catch (const std::exception& e) {
    tg_err(err, errlen, e);
    return -1;
  }
}

extern "C" void tg_dist_free(void* dist) {
  auto d = static_cast<TgDist*>(dist);
  if (d->pg) d->pg->shutdown();
  delete d;
}

// ---- Tau attention in query chunks: the T×T scores never exist whole (at most chunk×T of them at a time).
// Forward keeps only the output and each row's log-sum-exp; backward recomputes a chunk's scores from λq, λk.
// The arithmetic mirrors the plain path (scores and softmax in λ's dtype, probabilities cast to V's for the product).
#include <torch/csrc/autograd/custom_function.h>

namespace {
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Scores −|λq − λk|·inv_temp of query rows [q0, q1) against all keys, with the future masked to −inf.
at::Tensor tau_scores(const at::Tensor& lq, const at::Tensor& lk, const at::Tensor& it, int64_t q0, int64_t q1) {
  const int64_t tq = lq.size(2), tk = lk.size(2);
  auto diff = lq.slice(2, q0, q1).unsqueeze(-1) - lk.unsqueeze(-2);  // [B,H,c,Tk]
  auto s = -diff.abs() * it.view({1, -1, 1, 1}).to(lq.scalar_type());
  auto qi = at::arange(q0, q1, lq.options().dtype(at::kLong)) + (tk - tq);  // a query's last visible key
  auto kj = at::arange(tk, lq.options().dtype(at::kLong));
  return s.masked_fill(kj.unsqueeze(0) > qi.unsqueeze(1), -std::numeric_limits<double>::infinity());
}

struct TauAttention : public torch::autograd::Function<TauAttention> {
  static at::Tensor forward(AutogradContext* ctx, at::Tensor lq, at::Tensor lk, at::Tensor v, at::Tensor it, int64_t chunk) {
    const int64_t tq = lq.size(2);
    auto out = at::empty({v.size(0), v.size(1), tq, v.size(3)}, v.options());
    auto lse = at::empty_like(lq);
    for (int64_t q0 = 0; q0 < tq; q0 += chunk) {
      const int64_t q1 = std::min(q0 + chunk, tq);
      auto s = tau_scores(lq, lk, it, q0, q1);
      auto l = at::logsumexp(s, -1, true);
      lse.slice(2, q0, q1).copy_(l.squeeze(-1));
      out.slice(2, q0, q1).copy_(at::exp(s - l).to(v.scalar_type()).matmul(v));
    }
    ctx->save_for_backward({lq, lk, v, it, lse});
    ctx->saved_data["chunk"] = chunk;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto &lq = saved[0], &lk = saved[1], &v = saved[2], &it = saved[3], &lse = saved[4];
    const int64_t chunk = ctx->saved_data["chunk"].toInt(), tq = lq.size(2);
    auto dout = grads[0];
    auto dlq = at::empty_like(lq), dlk = at::zeros_like(lk), dv = at::zeros_like(v);
    auto dit = at::zeros({it.size(0)}, lq.options());
    auto itb = it.view({1, -1, 1, 1}).to(lq.scalar_type());
    for (int64_t q0 = 0; q0 < tq; q0 += chunk) {
      const int64_t q1 = std::min(q0 + chunk, tq);
      auto p = at::exp(tau_scores(lq, lk, it, q0, q1) - lse.slice(2, q0, q1).unsqueeze(-1));  // softmax, recomputed
      auto doc = dout.slice(2, q0, q1);
      dv += p.to(v.scalar_type()).transpose(-1, -2).matmul(doc);
      auto dp = doc.matmul(v.transpose(-1, -2)).to(p.scalar_type());
      auto ds = p * (dp - (dp * p).sum(-1, true));  // softmax backward
      auto diff = lq.slice(2, q0, q1).unsqueeze(-1) - lk.unsqueeze(-2);
      auto g = ds * (-itb) * diff.sign();  // ∂s/∂λq = −inv_temp·sign(λq − λk) = −∂s/∂λk
      dlq.slice(2, q0, q1).copy_(g.sum(-1));
      dlk -= g.sum(-2);
      dit -= (ds * diff.abs()).sum({0, 2, 3});
    }
    return {dlq, dlk, dv, it.requires_grad() ? dit.to(it.scalar_type()) : at::Tensor(), at::Tensor()};
  }
};
}  // namespace

// out = tau attention of (λq [B,H,Tq], λk [B,H,Tk], V [B,H,Tk,D], inv_temp [H]), differentiable; null + err on failure.
extern "C" at::Tensor* tg_tau_attention(at::Tensor* lq, at::Tensor* lk, at::Tensor* v, at::Tensor* it, int64_t chunk, char* err, size_t errlen) {
  try {
    return new at::Tensor(TauAttention::apply(*lq, *lk, *v, *it, chunk));
  } catch (const std::exception& e) {
    tg_err(err, errlen, e);
    return nullptr;
  }
}

// ---- Tau attention through the fused CUDA kernels of kernels/tau_attn.cu: scores made on the fly in shared memory,
// never stored; the forward keeps the output (also in fp32 when V is bf16) and each row's log-sum-exp, the backward
// recomputes the probabilities.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace {
// Contiguous and 16-byte aligned, as the kernels read and write rows in 16-byte vectors (a contiguous view may
// start mid-allocation).
at::Tensor dense(const at::Tensor& t) {
  auto c = t.contiguous();
  return reinterpret_cast<std::uintptr_t>(c.data_ptr()) % 16 ? c.clone() : c;
}

void cuda_ok(int err, const char* what) {
  TORCH_CHECK(err == 0, what, ": ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

// The head dims the tensor-core kernels (tau attention, taumode) are instantiated for (tg::with_head_dim).
bool kernel_head_dim(int64_t d) { return d == 32 || d == 64 || d == 128; }

// Rows of D contiguous values that start on 16 bytes (the kernels load them as vectors) and tile memory without overlap
// (empty_like then gives a gradient the same strides): x as it is, or a contiguous copy.
at::Tensor row_vectors(const at::Tensor& x) {
  const int64_t vec = 16 / x.element_size();
  const bool ok = x.stride(3) == 1 && x.is_non_overlapping_and_dense() && reinterpret_cast<std::uintptr_t>(x.data_ptr()) % 16 == 0 &&
                  x.stride(0) % vec == 0 && x.stride(1) % vec == 0 && x.stride(2) % vec == 0;
  return ok ? x : dense(x);
}

std::array<int64_t, 3> strides3(const at::Tensor& x) { return {x.stride(0), x.stride(1), x.stride(2)}; }

struct TauFlash : public torch::autograd::Function<TauFlash> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& lq_in, const at::Tensor& lk_in, const at::Tensor& v_in, const at::Tensor& it_in) {
    TORCH_CHECK(lq_in.dim() == 3 && lk_in.dim() == 3 && v_in.dim() == 4 && it_in.dim() == 1,
                "tau attention (fused): want λq [B,H,Tq], λk [B,H,Tk], V [B,H,Tk,D], inv_temp [H]; got ", lq_in.sizes(), " ", lk_in.sizes(), " ", v_in.sizes(), " ", it_in.sizes());
    const int64_t b = lq_in.size(0), h = lq_in.size(1), tq = lq_in.size(2), tk = lk_in.size(2), d = v_in.size(3);
    TORCH_CHECK(lk_in.size(0) == b && lk_in.size(1) == h && v_in.size(0) == b && v_in.size(1) == h && v_in.size(2) == tk && it_in.size(0) == h,
                "tau attention (fused): shapes disagree: λq ", lq_in.sizes(), ", λk ", lk_in.sizes(), ", V ", v_in.sizes(), ", inv_temp ", it_in.sizes());
    TORCH_CHECK(1 <= tq && tq <= tk && tk <= INT32_MAX && b * h <= INT32_MAX, "tau attention (fused): need 1 ≤ Tq ≤ Tk and Tk, B·H < 2³¹ (the queries are the last Tq of Tk positions); got Tq ", tq, ", Tk ", tk, ", B·H ", b * h);
    TORCH_CHECK(kernel_head_dim(d), "tau attention (fused): head dim ", d, " unsupported; the kernels are built for 32, 64 and 128 (or use --kernels plain)");
    TORCH_CHECK(lq_in.is_cuda() && lk_in.device() == lq_in.device() && v_in.device() == lq_in.device() && it_in.device() == lq_in.device(),
                "tau attention (fused): λq, λk, V and inv_temp must be on one CUDA device (got ", lq_in.device(), ", ", lk_in.device(), ", ", v_in.device(), ", ", it_in.device(), "); use --kernels plain off the GPU");
    TORCH_CHECK(lq_in.scalar_type() == at::kFloat && lk_in.scalar_type() == at::kFloat && it_in.scalar_type() == at::kFloat,
                "tau attention (fused): λq, λk and inv_temp must be fp32; got ", lq_in.scalar_type(), ", ", lk_in.scalar_type(), ", ", it_in.scalar_type());
    TORCH_CHECK(v_in.scalar_type() == at::kBFloat16, "tau attention (fused): V must be bf16 (the kernel's products are on tensor cores); got ", v_in.scalar_type());
    c10::cuda::CUDAGuard guard(v_in.device());
    auto lq = dense(lq_in), lk = dense(lk_in), v = row_vectors(v_in), it = dense(it_in);
    // out in [B,Tq,H,D] memory, returned as its [B,H,Tq,D] view: the output projection reads it as [B,Tq,H·D] without a copy
    auto out = at::empty({b, tq, h, d}, v.options()).transpose(1, 2);
    auto out32 = at::empty({b, h, tq, d}, lq.options());  // the backward's Δ wants the unrounded output
    auto stats = at::empty({2, b, h, tq}, lq.options());  // each row's shift (log2 units) and 1/Σ exp(s − shift)
    const auto sv = strides3(v), so = strides3(out);
    cuda_ok(tg_tau_flash_forward(lq.data_ptr<float>(), lk.data_ptr<float>(), v.data_ptr(), sv.data(), it.data_ptr<float>(), out.data_ptr(), so.data(),
                                 out32.data_ptr<float>(), stats[0].data_ptr<float>(), stats[1].data_ptr<float>(), b * h, h, tq, tk, d,
                                 c10::cuda::getCurrentCUDAStream()),
            "tau attention (fused) forward");
    ctx->save_for_backward({lq, lk, v, it, out32, stats});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    auto &lq = s[0], &lk = s[1], &v = s[2], &it = s[3], &out32 = s[4], &stats = s[5];
    const int64_t b = lq.size(0), h = lq.size(1), tq = lq.size(2), tk = lk.size(2), d = v.size(3);
    c10::cuda::CUDAGuard guard(v.device());
    auto dout = row_vectors(grads[0].to(at::kBFloat16));
    auto dlq = at::zeros_like(lq), dlk = at::empty_like(lk), dv = at::empty_like(v), dit = at::zeros_like(it), delta = at::empty_like(lq);
    const auto sv = strides3(v), sd = strides3(dout), sdv = strides3(dv);
    cuda_ok(tg_tau_flash_backward(lq.data_ptr<float>(), lk.data_ptr<float>(), v.data_ptr(), sv.data(), it.data_ptr<float>(), out32.data_ptr<float>(), dout.data_ptr(),
                                  sd.data(), stats[0].data_ptr<float>(), stats[1].data_ptr<float>(), delta.data_ptr<float>(), dlq.data_ptr<float>(), dlk.data_ptr<float>(), dv.data_ptr(), sdv.data(),
                                  dit.data_ptr<float>(), b * h, h, tq, tk, d, c10::cuda::getCurrentCUDAStream()),
            "tau attention (fused) backward");
    return {dlq, dlk, dv, ctx->needs_input_grad(3) ? dit : at::Tensor()};
  }
};
}  // namespace

// out = tau attention of (λq [B,H,Tq], λk [B,H,Tk], V [B,H,Tk,D], inv_temp [H]) on the GPU, differentiable, O(B·H·T)
// memory beyond the inputs; null + err on failure.
extern "C" at::Tensor* tg_tau_flash(at::Tensor* lq, at::Tensor* lk, at::Tensor* v, at::Tensor* it, char* err, size_t errlen) {
  try {
    return new at::Tensor(TauFlash::apply(*lq, *lk, *v, *it));
  } catch (const std::exception& e) {
    tg_err(err, errlen, e);
    return nullptr;
  }
}

// ---- tau-bias's prior through kernels/tau_bias.cu: the bias −α|λq − λk| (causal, bf16) for SDPA, differentiable in
// λq, λk and α, one T×T pass each way.
namespace {
struct TauBias : public torch::autograd::Function<TauBias> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& lq_in, const at::Tensor& lk_in, const at::Tensor& a_in) {
    TORCH_CHECK(lq_in.dim() == 3 && lk_in.dim() == 3 && a_in.dim() == 1 && lk_in.size(0) == lq_in.size(0) && lk_in.size(1) == lq_in.size(1) &&
                    a_in.size(0) == lq_in.size(1),
                "tau-bias prior (fused): want λq [B,H,Tq], λk [B,H,Tk], α [H]; got ", lq_in.sizes(), " ", lk_in.sizes(), " ", a_in.sizes());
    const int64_t b = lq_in.size(0), h = lq_in.size(1), tq = lq_in.size(2), tk = lk_in.size(2);
    TORCH_CHECK(1 <= tq && tq <= tk && b * h * tq <= INT32_MAX && tk <= INT32_MAX, "tau-bias prior (fused): need 1 ≤ Tq ≤ Tk and B·H·Tq < 2³¹; got Tq ", tq,
                ", Tk ", tk, ", B·H ", b * h);
    TORCH_CHECK(lq_in.is_cuda() && lk_in.device() == lq_in.device() && a_in.device() == lq_in.device(),
                "tau-bias prior (fused): λq, λk and α must be on one CUDA device; use --kernels plain off the GPU");
    TORCH_CHECK(lq_in.scalar_type() == at::kFloat && lk_in.scalar_type() == at::kFloat && a_in.scalar_type() == at::kFloat,
                "tau-bias prior (fused): λq, λk and α must be fp32; got ", lq_in.scalar_type(), ", ", lk_in.scalar_type(), ", ", a_in.scalar_type());
    c10::cuda::CUDAGuard guard(lq_in.device());
    auto lq = lq_in.contiguous(), lk = lk_in.contiguous(), a = a_in.contiguous();
    auto out = at::empty({b, h, tq, tk}, lq.options().dtype(at::kBFloat16));
    cuda_ok(tg_tau_bias_forward(lq.data_ptr<float>(), lk.data_ptr<float>(), a.data_ptr<float>(), out.data_ptr(), b * h, h, tq, tk,
                                c10::cuda::getCurrentCUDAStream()),
            "tau-bias prior (fused) forward");
    ctx->save_for_backward({lq, lk, a});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    auto &lq = s[0], &lk = s[1], &a = s[2];
    const int64_t b = lq.size(0), h = lq.size(1), tq = lq.size(2), tk = lk.size(2);
    c10::cuda::CUDAGuard guard(lq.device());
    auto g = grads[0].to(at::kBFloat16).contiguous();
    auto dlq = at::empty_like(lq), dlk = at::zeros_like(lk), da = at::zeros_like(a);
    cuda_ok(tg_tau_bias_backward(lq.data_ptr<float>(), lk.data_ptr<float>(), a.data_ptr<float>(), g.data_ptr(), dlq.data_ptr<float>(), dlk.data_ptr<float>(),
                                 da.data_ptr<float>(), b * h, h, tq, tk, c10::cuda::getCurrentCUDAStream()),
            "tau-bias prior (fused) backward");
    return {dlq, dlk, da};
  }
};
}  // namespace

// bias [B,H,Tq,Tk] bf16 = −α_h|λq_i − λk_j|, −inf where key j is after query i (the queries the last Tq of Tk), from
// λq [B,H,Tq], λk [B,H,Tk], α [H] (fp32, CUDA); differentiable. Null + err on failure.
extern "C" at::Tensor* tg_tau_bias(at::Tensor* lq, at::Tensor* lk, at::Tensor* alpha, char* err, size_t errlen) {
  try {
    return new at::Tensor(TauBias::apply(*lq, *lk, *alpha));
  } catch (const std::exception& e) {
    tg_err(err, errlen, e);
    return nullptr;
  }
}

// ---- Soft-capped cross-entropy through the fused kernel of kernels/softcap_ce.cu: the logits are read twice (loss, then
// gradient) and the gradient overwrites them, so the head needs no fp32 [N, V] tensor.
// Per-row losses (fp32 [N]) of soft-capped logits cap·tanh(z/cap), z [N, V] bf16 or fp32, against targets y [N] (int64);
// with grad != 0, z is overwritten with d(scale·Σ loss)/dz. A target outside [0, V) gives its row a NaN loss and
// gradient (checking here would read y back and sync the stream). Null + err on failure.
extern "C" at::Tensor* tg_softcap_ce(at::Tensor* z, at::Tensor* y, double softcap, double scale, int grad, char* err, size_t errlen) {
  try {
    TORCH_CHECK(z->dim() == 2 && y->dim() == 1 && y->size(0) == z->size(0), "cross-entropy (fused): want z [N, V] and y [N]; got ", z->sizes(), " and ", y->sizes());
    const int64_t n = z->size(0), v = z->size(1);
    TORCH_CHECK(1 <= v && v <= INT32_MAX && n <= INT32_MAX, "cross-entropy (fused): need 1 ≤ V and N, V < 2³¹; got N ", n, ", V ", v);
    TORCH_CHECK(z->is_cuda() && y->device() == z->device(), "cross-entropy (fused): z and y must be on one CUDA device (got ", z->device(), ", ", y->device(), "); use --kernels plain off the GPU");
    TORCH_CHECK(z->scalar_type() == at::kBFloat16 || z->scalar_type() == at::kFloat, "cross-entropy (fused): z must be bf16 or fp32; got ", z->scalar_type());
    TORCH_CHECK(y->scalar_type() == at::kLong, "cross-entropy (fused): y must be int64; got ", y->scalar_type());
    TORCH_CHECK(z->is_contiguous(), "cross-entropy (fused): z must be contiguous (the gradient is written in place)");
    TORCH_CHECK(!grad || !z->requires_grad(), "cross-entropy (fused): z requires grad, and the gradient would overwrite it behind autograd's back");
    TORCH_CHECK(softcap > 0, "cross-entropy (fused): softcap must be > 0; got ", softcap);
    c10::cuda::CUDAGuard guard(z->device());
    auto yc = y->contiguous();
    auto loss = at::empty({n}, z->options().dtype(at::kFloat));
    if (n > 0)
      cuda_ok(tg_softcap_ce_launch(z->data_ptr(), yc.data_ptr<int64_t>(), loss.data_ptr<float>(), n, v, static_cast<float>(softcap), static_cast<float>(scale),
                                   grad, z->scalar_type() == at::kBFloat16, c10::cuda::getCurrentCUDAStream()),
              "cross-entropy (fused)");
    return new at::Tensor(loss);
  } catch (const std::exception& e) {
    tg_err(err, errlen, e);
    return nullptr;
  }
}

// ---- The block's memory-bound steps through kernels/block_ops.cu: RMSNorm with the cast to the compute dtype fused
// in (and the residual add before it), RoPE + QK-norm over the qkv projection's output (q, k and v out in one pass,
// dqkv in one pass back), ReLU².
namespace {
void check_block_input(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.is_cuda(), what, ": input on ", x.device(), "; the fused kernels need CUDA (use --kernels plain off the GPU)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, what, ": input must be fp32 or bf16; got ", x.scalar_type());
}

// An RMSNorm's input rows and output dtype, as the kernels take them: rows of 1 to 2³¹ elements, fp32 or bf16 out.
void check_norm(const at::Tensor& x, at::ScalarType odt, const char* what) {
  TORCH_CHECK(odt == at::kFloat || odt == at::kBFloat16, what, ": output must be fp32 or bf16; got ", odt);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) >= 1 && x.size(-1) <= INT32_MAX, what, ": want rows of 1 to 2³¹ elements; got ", x.sizes());
}

struct RmsNorm : public torch::autograd::Function<RmsNorm> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x_in, int64_t out_dtype, double eps) {
    check_block_input(x_in, "rmsnorm (fused)");
    const auto odt = static_cast<at::ScalarType>(out_dtype);
    check_norm(x_in, odt, "rmsnorm (fused)");
    c10::cuda::CUDAGuard guard(x_in.device());
    auto x = x_in.contiguous();
    const int64_t c = x.size(-1), n = x.numel() / c;
    auto y = at::empty(x.sizes(), x.options().dtype(odt));
    auto rstd = at::empty({n}, x.options().dtype(at::kFloat));
    if (n > 0)
      cuda_ok(tg_rmsnorm_fwd(x.data_ptr(), y.data_ptr(), rstd.data_ptr<float>(), n, static_cast<int>(c), static_cast<float>(eps), x.scalar_type() == at::kBFloat16,
                             odt == at::kBFloat16, c10::cuda::getCurrentCUDAStream()),
              "rmsnorm (fused) forward");
    ctx->save_for_backward({x, rstd});
    ctx->saved_data["out_dtype"] = out_dtype;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    auto &x = s[0], &rstd = s[1];
    const auto odt = static_cast<at::ScalarType>(ctx->saved_data["out_dtype"].toInt());
    c10::cuda::CUDAGuard guard(x.device());
    auto dy = grads[0].to(odt).contiguous();
    auto dx = at::empty_like(x);
    const int64_t c = x.size(-1), n = x.numel() / c;
    if (n > 0)
      cuda_ok(tg_rmsnorm_bwd(x.data_ptr(), dy.data_ptr(), rstd.data_ptr<float>(), dx.data_ptr(), n, static_cast<int>(c), x.scalar_type() == at::kBFloat16,
                             odt == at::kBFloat16, c10::cuda::getCurrentCUDAStream()),
              "rmsnorm (fused) backward");
    return {dx, at::Tensor(), at::Tensor()};
  }
};

struct RopeNorm : public torch::autograd::Function<RopeNorm> {
  // qkv [B,T,(H+2G)·D] → {q [B,T,H,D], k [B,T,G,D], v [B,T,G,D]}; cos, sin [≥ pos+T, D/2] fp32 (constants)
  static variable_list forward(AutogradContext* ctx, const at::Tensor& qkv_in, const at::Tensor& cos_in, const at::Tensor& sin_in, int64_t h, int64_t g,
                               int64_t pos, double eps) {
    check_block_input(qkv_in, "rope+qk-norm (fused)");
    TORCH_CHECK(qkv_in.dim() == 3 && h >= 1 && g >= 1 && qkv_in.size(2) % (h + 2 * g) == 0, "rope+qk-norm (fused): want qkv [B,T,(H+2G)·D]; got ",
                qkv_in.sizes(), " for H ", h, ", G ", g);
    const int64_t b = qkv_in.size(0), t = qkv_in.size(1), d = qkv_in.size(2) / (h + 2 * g);
    TORCH_CHECK(d % 2 == 0 && d <= 256, "rope+qk-norm (fused): head dim ", d, " must be even and ≤ 256 (the kernel's pairs a lane); use --kernels plain");
    TORCH_CHECK(cos_in.dim() == 2 && cos_in.size(1) == d / 2 && sin_in.sizes() == cos_in.sizes() && pos >= 0 && pos + t <= cos_in.size(0),
                "rope+qk-norm (fused): want cos, sin [≥ pos+T, D/2] for D ", d, ", pos ", pos, ", T ", t, "; got ", cos_in.sizes());
    TORCH_CHECK(cos_in.scalar_type() == at::kFloat && sin_in.scalar_type() == at::kFloat && cos_in.device() == qkv_in.device() && sin_in.device() == qkv_in.device(),
                "rope+qk-norm (fused): cos and sin must be fp32 on the input's device");
    TORCH_CHECK(b * t <= INT32_MAX && h + 2 * g <= 65535 && pos + t <= INT32_MAX, "rope+qk-norm (fused): B·T ", b * t, ", heads ", h + 2 * g, " or positions ", pos + t,
                " past the kernel's 32-bit rows, 65535 head slots or 2³¹ positions");
    c10::cuda::CUDAGuard guard(qkv_in.device());
    auto qkv = qkv_in.contiguous(), cos = cos_in.contiguous(), sin = sin_in.contiguous();
    auto q = at::empty({b, t, h, d}, qkv.options()), k = at::empty({b, t, g, d}, qkv.options()), v = at::empty({b, t, g, d}, qkv.options());
    auto rstd = at::empty({b * t, h + g}, qkv.options().dtype(at::kFloat));
    if (b * t > 0)
      cuda_ok(tg_rope_norm_fwd(qkv.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr<float>(), sin.data_ptr<float>(), rstd.data_ptr<float>(), b * t,
                               static_cast<int>(h), static_cast<int>(g), static_cast<int>(d), static_cast<int>(t), static_cast<int>(pos), static_cast<float>(eps),
                               qkv.scalar_type() == at::kBFloat16, c10::cuda::getCurrentCUDAStream()),
              "rope+qk-norm (fused) forward");
    ctx->save_for_backward({qkv, cos, sin, rstd});
    ctx->saved_data["h"] = h;
    ctx->saved_data["g"] = g;
    ctx->saved_data["pos"] = pos;
    return {q, k, v};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    auto &qkv = s[0], &cos = s[1], &sin = s[2], &rstd = s[3];
    const int64_t h = ctx->saved_data["h"].toInt(), g = ctx->saved_data["g"].toInt(), pos = ctx->saved_data["pos"].toInt();
    const int64_t b = qkv.size(0), t = qkv.size(1), d = qkv.size(2) / (h + 2 * g);
    c10::cuda::CUDAGuard guard(qkv.device());
    std::vector<at::Tensor> gs;  // [B,T,heads,D] with D contiguous; an unused output's gradient is zero
    const int64_t heads[3] = {h, g, g};
    for (int i = 0; i < 3; ++i) {
      auto gr = grads[i].defined() ? grads[i].to(qkv.scalar_type()) : at::zeros({b, t, heads[i], d}, qkv.options());
      gs.push_back(gr.stride(3) == 1 ? gr : gr.contiguous());
    }
    int64_t strides[9];
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j) strides[3 * i + j] = gs[i].stride(j);
    auto dqkv = at::empty_like(qkv);
    if (b * t > 0)
      cuda_ok(tg_rope_norm_bwd(qkv.data_ptr(), gs[0].data_ptr(), gs[1].data_ptr(), gs[2].data_ptr(), strides, cos.data_ptr<float>(), sin.data_ptr<float>(),
                               rstd.data_ptr<float>(), dqkv.data_ptr(), b * t, static_cast<int>(h), static_cast<int>(g), static_cast<int>(d), static_cast<int>(t),
                               static_cast<int>(pos), qkv.scalar_type() == at::kBFloat16, c10::cuda::getCurrentCUDAStream()),
              "rope+qk-norm (fused) backward");
    return {dqkv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// (x fp32, y fp32|bf16 of x's shape) → {s = x + y (fp32), h = rmsnorm(s) in out_dtype}
struct AddRmsNorm : public torch::autograd::Function<AddRmsNorm> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x_in, const at::Tensor& y_in, int64_t out_dtype, double eps) {
    check_block_input(y_in, "add+rmsnorm (fused)");
    const auto odt = static_cast<at::ScalarType>(out_dtype);
    TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.device() == y_in.device() && x_in.sizes() == y_in.sizes(),
                "add+rmsnorm (fused): want the fp32 stream x and a branch y of its shape on its device; got ", x_in.scalar_type(), " ", x_in.sizes(), " and ",
                y_in.scalar_type(), " ", y_in.sizes(), " on ", x_in.device(), ", ", y_in.device());
    check_norm(x_in, odt, "add+rmsnorm (fused)");
    c10::cuda::CUDAGuard guard(x_in.device());
    auto x = x_in.contiguous(), y = y_in.contiguous();
    const int64_t c = x.size(-1), n = x.numel() / c;
    auto s = at::empty_like(x), h = at::empty(x.sizes(), x.options().dtype(odt)), rstd = at::empty({n}, x.options());
    if (n > 0)
      cuda_ok(tg_add_rmsnorm_fwd(x.data_ptr<float>(), y.data_ptr(), s.data_ptr<float>(), h.data_ptr(), rstd.data_ptr<float>(), n, static_cast<int>(c),
                                 static_cast<float>(eps), y.scalar_type() == at::kBFloat16, odt == at::kBFloat16, c10::cuda::getCurrentCUDAStream()),
              "add+rmsnorm (fused) forward");
    ctx->save_for_backward({s, rstd});
    ctx->saved_data["out_dtype"] = out_dtype;
    ctx->saved_data["y_dtype"] = static_cast<int64_t>(y.scalar_type());
    return {s, h};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto &s = saved[0], &rstd = saved[1];
    const auto odt = static_cast<at::ScalarType>(ctx->saved_data["out_dtype"].toInt()), ydt = static_cast<at::ScalarType>(ctx->saved_data["y_dtype"].toInt());
    c10::cuda::CUDAGuard guard(s.device());
    auto ds = grads[0].defined() ? grads[0].to(at::kFloat).contiguous() : at::Tensor();
    auto dh = grads[1].defined() ? grads[1].to(odt).contiguous() : at::zeros(s.sizes(), s.options().dtype(odt));  // h unused: only the stream's gradient
    auto dx = at::empty_like(s), dy = at::empty(s.sizes(), s.options().dtype(ydt));
    const int64_t c = s.size(-1), n = s.numel() / c;
    if (n > 0)
      cuda_ok(tg_add_rmsnorm_bwd(s.data_ptr<float>(), dh.data_ptr(), ds.defined() ? ds.data_ptr<float>() : nullptr, rstd.data_ptr<float>(), dx.data_ptr<float>(),
                                 dy.data_ptr(), n, static_cast<int>(c), ydt == at::kBFloat16, odt == at::kBFloat16, c10::cuda::getCurrentCUDAStream()),
              "add+rmsnorm (fused) backward");
    return {dx, dy, at::Tensor(), at::Tensor()};
  }
};

struct Relu2 : public torch::autograd::Function<Relu2> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& u_in) {
    check_block_input(u_in, "relu² (fused)");
    c10::cuda::CUDAGuard guard(u_in.device());
    auto u = u_in.contiguous();
    auto out = at::empty_like(u);
    if (u.numel() > 0)
      cuda_ok(tg_relu2_fwd(u.data_ptr(), out.data_ptr(), u.numel(), u.scalar_type() == at::kBFloat16, c10::cuda::getCurrentCUDAStream()), "relu² (fused) forward");
    ctx->save_for_backward({u});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto u = ctx->get_saved_variables()[0];
    c10::cuda::CUDAGuard guard(u.device());
    auto dh = grads[0].to(u.scalar_type()).contiguous();
    auto du = at::empty_like(u);
    if (u.numel() > 0)
      cuda_ok(tg_relu2_bwd(u.data_ptr(), dh.data_ptr(), du.data_ptr(), u.numel(), u.scalar_type() == at::kBFloat16, c10::cuda::getCurrentCUDAStream()),
              "relu² (fused) backward");
    return {du};
  }
};
}  // namespace

// rmsnorm(x) over the last dim in fp32, as libtorch's rms_norm, written in out_dtype (a c10::ScalarType), differentiable.
extern "C" at::Tensor* tg_rmsnorm(at::Tensor* x, int out_dtype, double eps, char* err, size_t errlen) {
  try {
    return new at::Tensor(RmsNorm::apply(*x, out_dtype, eps));
  } catch (const std::exception& e) {
    tg_err(err, errlen, e);
    return nullptr;
  }
}

// Writes s and h into out[0..2]; 0 on success.
extern "C" int tg_add_rmsnorm(at::Tensor* x, at::Tensor* y, int out_dtype, double eps, at::Tensor** out, char* err, size_t errlen) {
  try {
    auto r = AddRmsNorm::apply(*x, *y, out_dtype, eps);
    for (int i = 0; i < 2; ++i) out[i] = new at::Tensor(r[i]);
    return 0;
  } catch (const std::exception& e) {
    tg_err(err, errlen, e);
    return 1;
  }
}

// Writes q, k, v ([B,T,heads,D]) into out[0..3]; 0 on success.
extern "C" int tg_rope_norm(at::Tensor* qkv, at::Tensor* cos, at::Tensor* sin, int64_t h, int64_t g, int64_t pos, double eps, at::Tensor** out, char* err, size_t errlen) {
  try {
    auto r = RopeNorm::apply(*qkv, *cos, *sin, h, g, pos, eps);
    for (int i = 0; i < 3; ++i) out[i] = new at::Tensor(r[i]);
    return 0;
  } catch (const std::exception& e) {
    tg_err(err, errlen, e);
    return 1;
  }
}

extern "C" at::Tensor* tg_relu2(at::Tensor* u, char* err, size_t errlen) {
  try {
    return new at::Tensor(Relu2::apply(*u));
  } catch (const std::exception& e) {
    tg_err(err, errlen, e);
    return nullptr;
  }
}

// ---- Multi-tensor (foreach) updates for the optimizer: one launch for a list of tensors where a loop of tch calls
// makes one each (the step's optimizer phase is launch-bound). Lists of n at::Tensor*, 0 on success.
static std::vector<at::Tensor> tensor_list(at::Tensor** ts, int n) {
  std::vector<at::Tensor> v;
  for (int i = 0; i < n; ++i) v.push_back(*ts[i]);
  return v;
}

// a[i] ← lerp(a[i], b[i], w); with out, a is left alone and out[i] receives the result (new tensors)
extern "C" int tg_foreach_lerp(at::Tensor** a, at::Tensor** b, int n, double w, at::Tensor** out, char* err, size_t errlen) {
  try {
    auto av = tensor_list(a, n), bv = tensor_list(b, n);
    if (!out) {
      at::_foreach_lerp_(av, bv, w);
      return 0;
    }
    auto r = at::_foreach_lerp(av, bv, w);
    for (int i = 0; i < n; ++i) out[i] = new at::Tensor(r[i]);
    return 0;
  } catch (const std::exception& e) {
    tg_err(err, errlen, e);
    return 1;
  }
}

// a[i] += b[i]
extern "C" int tg_foreach_add_(at::Tensor** a, at::Tensor** b, int n, char* err, size_t errlen) {
  try {
    auto av = tensor_list(a, n);
    at::_foreach_add_(av, tensor_list(b, n));
    return 0;
  } catch (const std::exception& e) {
    tg_err(err, errlen, e);
    return 1;
  }
}

// a[i] ← 0
extern "C" int tg_foreach_zero_(at::Tensor** a, int n, char* err, size_t errlen) {
  try {
    auto av = tensor_list(a, n);
    at::_foreach_zero_(av);
    return 0;
  } catch (const std::exception& e) {
    tg_err(err, errlen, e);
    return 1;
  }
}

// ---- taumode's energies through kernels/block_ops.cu: x [B, heads, T, D] (bf16, D contiguous) → E and
// λ = E/(E+τ), [B, heads, T] fp32; λ differentiable with respect to x, E a constant (calibration and diagnostics).
namespace {
struct TauLambda : public torch::autograd::Function<TauLambda> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x_in, const at::Tensor& lap_in, double tau, double eps) {
    check_block_input(x_in, "taumode (fused)");
    TORCH_CHECK(x_in.scalar_type() == at::kBFloat16, "taumode (fused): x must be bf16 (the kernel's products are on tensor cores); got ", x_in.scalar_type());
    TORCH_CHECK(x_in.dim() == 4 && kernel_head_dim(x_in.size(3)) && lap_in.dim() == 2 && lap_in.size(0) == x_in.size(3) &&
                    lap_in.size(1) == x_in.size(3),
                "taumode (fused): want x [B, heads, T, D ∈ {32, 64, 128}] and L [D, D]; got ", x_in.sizes(), " and ", lap_in.sizes());
    TORCH_CHECK(lap_in.device() == x_in.device(), "taumode (fused): L on ", lap_in.device(), ", x on ", x_in.device());
    TORCH_CHECK(tau > 0, "taumode (fused): τ must be > 0; got ", tau);
    c10::cuda::CUDAGuard guard(x_in.device());
    auto x = row_vectors(x_in);
    auto lap = lap_in.to(at::kFloat).contiguous();
    const int64_t b = x.size(0), h = x.size(1), t = x.size(2), d = x.size(3), rows = b * h * t;
    TORCH_CHECK(rows <= INT32_MAX, "taumode (fused): B·heads·T = ", rows, " rows, the kernel indexes < 2³¹; use --kernels plain or fewer rows a step");
    auto e = at::empty({b, h, t}, x.options().dtype(at::kFloat)), lam = at::empty_like(e);
    if (rows > 0)
      cuda_ok(tg_lambda_fwd(x.data_ptr(), x.stride(0), x.stride(1), x.stride(2), static_cast<int>(h), static_cast<int>(t), lap.data_ptr<float>(),
                            at::empty({tg_lambda_scratch_bytes(static_cast<int>(d))}, x.options().dtype(at::kByte)).data_ptr(), e.data_ptr<float>(),
                            lam.data_ptr<float>(), rows, static_cast<int>(d), static_cast<float>(eps), static_cast<float>(tau), c10::cuda::getCurrentCUDAStream()),
              "taumode (fused) forward");
    ctx->save_for_backward({x, (lap + lap.t()).contiguous(), e});
    ctx->saved_data["tau"] = tau;
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({e});
    return {e, lam};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    auto &x = s[0], &lap_sym = s[1], &e = s[2];
    const double tau = ctx->saved_data["tau"].toDouble(), eps = ctx->saved_data["eps"].toDouble();
    c10::cuda::CUDAGuard guard(x.device());
    const int64_t h = x.size(1), t = x.size(2), d = x.size(3), rows = x.numel() / d;
    auto dx = at::empty_like(x);  // x's strides (row_vectors): the kernel writes dx where it read x
    TORCH_CHECK(dx.strides() == x.strides(), "taumode (fused) backward: the gradient's strides ", dx.strides(), " are not x's ", x.strides());
    if (!grads[1].defined()) return {dx.zero_(), at::Tensor(), at::Tensor(), at::Tensor()};
    auto dlam = grads[1].to(at::kFloat).contiguous();
    if (rows > 0)
      cuda_ok(tg_lambda_bwd(x.data_ptr(), x.stride(0), x.stride(1), x.stride(2), static_cast<int>(h), static_cast<int>(t), lap_sym.data_ptr<float>(),
                            at::empty({tg_lambda_scratch_bytes(static_cast<int>(d))}, x.options().dtype(at::kByte)).data_ptr(), e.data_ptr<float>(),
                            dlam.data_ptr<float>(), dx.data_ptr(), rows, static_cast<int>(d), static_cast<float>(eps), static_cast<float>(tau),
                            c10::cuda::getCurrentCUDAStream()),
              "taumode (fused) backward");
    return {dx, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};
}  // namespace

// Writes E and λ ([B, heads, T] fp32) into out[0..2]; 0 on success.
extern "C" int tg_taumode(at::Tensor* x, at::Tensor* lap, double tau, double eps, at::Tensor** out, char* err, size_t errlen) {
  try {
    auto r = TauLambda::apply(*x, *lap, tau, eps);
    for (int i = 0; i < 2; ++i) out[i] = new at::Tensor(r[i]);
    return 0;
  } catch (const std::exception& e) {
    tg_err(err, errlen, e);
    return 1;
  }
}
