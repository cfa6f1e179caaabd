// Gradient averaging for data-parallel training in buckets, launched while backward still runs
// (what DDP's Reducer does, reduced to what temper's stages need). The trainable parameters are
// cut into buckets of about `bucket_bytes` in reverse order (backward produces the last
// layers' gradients first). Each parameter carries a post-accumulate-grad hook: once the stage
// has armed the reducer for a step's last backward pass, a parameter whose gradient has been
// accumulated is final, and a bucket whose parameters are all final is copied into one fp32
// buffer and its all-reduce launched without waiting, while autograd works on the layers
// below. `finish` launches what is left, waits, divides by the world size and writes the means
// back into the gradients.
//
// Every rank launches its buckets in bucket order, whatever order its gradients arrive in, so
// the collectives match across ranks (c10d pairs them by sequence); a rank whose backward never
// reached a parameter (an empty share of a batch) launches that bucket in `finish`, with zeros
// for the missing gradient. Unarmed, the hooks do nothing and `finish` reduces every bucket
// after backward (stages whose step makes several backward calls, where a gradient is only
// final at the end). At most `kInFlight` buckets wait at once, so the copies take a few
// buckets of memory, not a second copy of every gradient.
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>

#include <algorithm>
#include <deque>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "guarded.h"

namespace temper {
c10::intrusive_ptr<c10d::Backend> group_backend(void *group);
} // namespace temper

namespace {

constexpr size_t kInFlight = 4;

struct Bucket {
  std::vector<size_t> params; // indices into Reducer::params
  size_t pending = 0;         // parameters not final yet in this step
};

struct InFlight {
  size_t bucket;
  at::Tensor flat;
  c10::intrusive_ptr<c10d::Work> work;
};

struct Reducer {
  c10::intrusive_ptr<c10d::Backend> pg;
  at::Device comm;
  int world;
  std::vector<at::Tensor> params;
  std::vector<size_t> bucket_of;
  std::vector<Bucket> buckets;
  std::vector<bool> ready;
  std::deque<InFlight> in_flight;
  size_t next = 0; // the next bucket to launch
  bool armed = false;
  bool alive = true;
  std::string failed;      // an error inside backward's hooks, reported by `finish`
  long launched_early = 0; // buckets launched during backward, over the run
  std::mutex mu;

  Reducer(c10::intrusive_ptr<c10d::Backend> pg, at::Device comm, std::vector<at::Tensor> ps,
          long bucket_bytes)
      : pg(std::move(pg)), comm(comm), world(this->pg->getSize()), params(std::move(ps)) {
    bucket_of.resize(params.size());
    ready.assign(params.size(), false);
    // The first bucket (the last layers) is capped at 1 MiB, as DDP's first_bucket_bytes_cap:
    // its gradients are ready soonest, and a small bucket starts communication early even when
    // the whole model would fit in one bucket.
    const long first_bytes = std::min(bucket_bytes, 1L << 20);
    long filled = 0;
    for (size_t k = params.size(); k-- > 0;) {
      long bytes = params[k].numel() * 4; // reduced in fp32
      long cap = buckets.size() <= 1 ? first_bytes : bucket_bytes;
      if (buckets.empty() || (filled > 0 && filled + bytes > cap)) {
        buckets.emplace_back();
        filled = 0;
      }
      buckets.back().params.push_back(k);
      bucket_of[k] = buckets.size() - 1;
      filled += bytes;
    }
    reset();
  }

  void reset() {
    for (auto &b : buckets) b.pending = b.params.size();
    std::fill(ready.begin(), ready.end(), false);
    next = 0;
    armed = false;
  }

  // A parameter's gradient is final (called by its hook while armed).
  void mark(size_t k) {
    std::lock_guard<std::mutex> lock(mu);
    if (!alive || !armed || !failed.empty()) return;
    if (ready[k]) {
      // Its bucket may already be on its way with the first part: the stage armed the
      // reducer before a backward pass that was not its last.
      failed = "a parameter received a second gradient after the reducer was armed";
      return;
    }
    ready[k] = true;
    buckets[bucket_of[k]].pending -= 1;
    try {
      while (next < buckets.size() && buckets[next].pending == 0) {
        launch(next++);
        launched_early += 1;
      }
    } catch (const std::exception &e) {
      // Not thrown through autograd: `finish` reports it as the stage's error.
      failed = e.what();
    }
  }

  void launch(size_t b) {
    if (in_flight.size() >= kInFlight) land();
    std::vector<at::Tensor> parts;
    for (size_t k : buckets[b].params) {
      const at::Tensor &g = params[k].grad();
      parts.push_back(g.defined() ? g.detach().to(comm, at::kFloat).reshape(-1)
                                  : at::zeros({params[k].numel()},
                                              at::TensorOptions().dtype(at::kFloat).device(comm)));
    }
    at::Tensor flat = at::cat(parts);
    std::vector<at::Tensor> tensors{flat};
    auto work = pg->allreduce(tensors);
    in_flight.push_back(InFlight{b, flat, work});
  }

  // Waits for the oldest launched bucket and writes its mean into the gradients.
  void land() {
    InFlight f = std::move(in_flight.front());
    in_flight.pop_front();
    f.work->wait();
    at::Tensor mean = f.flat.div_(world);
    at::NoGradGuard no_grad;
    int64_t at = 0;
    for (size_t k : buckets[f.bucket].params) {
      at::Tensor &p = params[k];
      at::Tensor part = mean.narrow(0, at, p.numel()).view(p.sizes());
      at += p.numel();
      at::Tensor &g = p.mutable_grad();
      if (g.defined()) {
        g.copy_(part);
      } else {
        g = part.to(p.device(), p.scalar_type(), false, true);
      }
    }
  }

  void finish() {
    std::lock_guard<std::mutex> lock(mu);
    armed = false;
    try {
      if (!failed.empty()) throw std::runtime_error(failed);
      while (next < buckets.size()) launch(next++);
      while (!in_flight.empty()) land();
    } catch (...) {
      in_flight.clear();
      failed.clear();
      reset();
      throw;
    }
    reset();
  }
};

struct Hook : torch::autograd::PostAccumulateGradHook {
  std::shared_ptr<Reducer> reducer;
  size_t index;
  Hook(std::shared_ptr<Reducer> r, size_t k) : reducer(std::move(r)), index(k) {}
  void operator()(const torch::autograd::Variable &) override { reducer->mark(index); }
};


} // namespace

extern "C" {

// A reducer over the `n` parameters for `group`, reducing on device `comm_device` (-1: the
// CPU, for Gloo; N: cuda:N, for NCCL), in buckets of about `bucket_bytes`. Null on error.
void *temper_reducer_new(void *group, at::Tensor **params, int n, int comm_device,
                         long bucket_bytes) {
  std::shared_ptr<Reducer> *handle = nullptr;
  int rc = temper::guarded([&] {
    std::vector<at::Tensor> ps;
    for (int k = 0; k < n; ++k) ps.push_back(*params[k]);
    at::Device comm = comm_device < 0 ? at::Device(at::kCPU)
                                      : at::Device(at::kCUDA, static_cast<int8_t>(comm_device));
    auto reducer =
        std::make_shared<Reducer>(temper::group_backend(group), comm, std::move(ps), bucket_bytes);
    for (size_t k = 0; k < reducer->params.size(); ++k) {
      torch::autograd::impl::set_post_acc_grad_hooks(reducer->params[k],
                                                      std::make_unique<Hook>(reducer, k));
    }
    handle = new std::shared_ptr<Reducer>(reducer);
  });
  return rc == 0 ? handle : nullptr;
}

// Removes the hooks and frees the reducer.
void temper_reducer_free(void *handle) {
  auto *r = static_cast<std::shared_ptr<Reducer> *>(handle);
  {
    std::lock_guard<std::mutex> lock((*r)->mu);
    (*r)->alive = false;
  }
  for (auto &p : (*r)->params) torch::autograd::impl::set_post_acc_grad_hooks(p, nullptr);
  delete r;
}

// The next backward pass is this step's last contribution to the gradients.
void temper_reducer_arm(void *handle) {
  auto &r = *static_cast<std::shared_ptr<Reducer> *>(handle);
  std::lock_guard<std::mutex> lock(r->mu);
  r->armed = true;
}

// The mean over the ranks of every gradient, in place.
int temper_reducer_finish(void *handle) {
  return temper::guarded([&] { (*static_cast<std::shared_ptr<Reducer> *>(handle))->finish(); });
}

int temper_reducer_buckets(void *handle) {
  return static_cast<int>((*static_cast<std::shared_ptr<Reducer> *>(handle))->buckets.size());
}

// Buckets launched while backward ran, over the reducer's life.
long temper_reducer_launched_early(void *handle) {
  auto &r = *static_cast<std::shared_ptr<Reducer> *>(handle);
  std::lock_guard<std::mutex> lock(r->mu);
  return r->launched_early;
}

} // extern "C"
