// libtorch entry points that tch 0.24 does not wrap: autocast with an explicit dtype (tch's
// `autocast` only enables CUDA's default fp16) and the fused AdamW kernel (one launch for all
// parameters instead of a dozen small ops per tensor). Errors are returned as strings so that
// the Rust side can surface them instead of aborting.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <cstring>
#include <string>
#include <vector>

static thread_local std::string last_error;

extern "C" {

const char *temper_last_error() { return last_error.c_str(); }

// For the other translation units (dist.cpp).
void temper_set_error(const char *message) { last_error = message; }

// device: 0 = CPU, 1 = CUDA. Enables autocast to bf16 (or fp16) and returns the previous
// state packed as (enabled | dtype << 1), for temper_autocast_exit; -1 on error.
int temper_autocast_enter(int device, int bf16) {
  try {
    auto type = device == 1 ? at::kCUDA : at::kCPU;
    int prev = (at::autocast::is_autocast_enabled(type) ? 1 : 0) |
               (static_cast<int>(at::autocast::get_autocast_dtype(type)) << 1);
    at::autocast::set_autocast_dtype(type, bf16 ? at::kBFloat16 : at::kHalf);
    at::autocast::set_autocast_enabled(type, true);
    at::autocast::increment_nesting();
    return prev;
  } catch (const std::exception &e) {
    last_error = e.what();
    return -1;
  }
}

// Restores what temper_autocast_enter returned; the cast-weight cache is cleared when the
// outermost autocast region ends, as torch.autocast does.
void temper_autocast_exit(int device, int prev) {
  auto type = device == 1 ? at::kCUDA : at::kCPU;
  if (at::autocast::decrement_nesting() == 0) {
    at::autocast::clear_cache();
  }
  at::autocast::set_autocast_enabled(type, (prev & 1) != 0);
  at::autocast::set_autocast_dtype(type, static_cast<at::ScalarType>(prev >> 1));
}

// Switches autocast on `device` on or off without touching the nesting count, so the cast-weight
// cache outlives the switch; returns the previous setting (0/1) for the caller to restore.
int temper_autocast_set(int device, int enabled) {
  auto type = device == 1 ? at::kCUDA : at::kCPU;
  int prev = at::autocast::is_autocast_enabled(type) ? 1 : 0;
  at::autocast::set_autocast_enabled(type, enabled != 0);
  return prev;
}

// One AdamW update of `n` parameters in place. The tensors are tch's `at::Tensor*`.
// Returns 0, or -1 with temper_last_error() set.
int temper_fused_adamw(at::Tensor **params, at::Tensor **grads, at::Tensor **exp_avgs,
                       at::Tensor **exp_avg_sqs, at::Tensor **steps, int n, double lr,
                       double beta1, double beta2, double weight_decay, double eps) {
  try {
    std::vector<at::Tensor> p, g, m, v, s;
    for (int i = 0; i < n; i++) {
      p.push_back(*params[i]);
      g.push_back(*grads[i]);
      m.push_back(*exp_avgs[i]);
      v.push_back(*exp_avg_sqs[i]);
      s.push_back(*steps[i]);
    }
    at::NoGradGuard guard;
    // The kernel reads the step count but does not advance it: torch.optim does that first.
    at::_foreach_add_(s, 1.0);
    at::_fused_adamw_(p, g, m, v, {}, s, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false);
    return 0;
  } catch (const std::exception &e) {
    last_error = e.what();
    return -1;
  }
}
}
