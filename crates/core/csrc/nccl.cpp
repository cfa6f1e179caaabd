// The NCCL process group (c10d's ProcessGroupNCCL, compiled into libtorch_cuda), for ranks on
// GPUs. Kept apart from dist.cpp because its headers need CUDA's: build.rs compiles this file
// with TEMPER_WITH_NCCL only when libtorch has CUDA and the headers are installed
// (scripts/setup.sh: nccl.h from the torch wheel's nvidia-nccl, CUDA 13's crt and cccl wheels);
// otherwise the function below reports that this build has no NCCL.
#ifdef TEMPER_WITH_NCCL
// Before any include: torch's headers declare their CUDA parts only under these.
#define USE_C10D_NCCL
#define USE_CUDA
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <chrono>
#include <stdexcept>
#include <string>

namespace temper {

// An NCCL group over `store` whose rank works on GPU `device` (its local rank). Throws (the
// caller turns it into an error string) where this build or this machine has no NCCL.
c10::intrusive_ptr<c10d::Backend> make_nccl(const c10::intrusive_ptr<c10d::Store> &store,
                                            int rank, int world,
                                            std::chrono::milliseconds timeout, int device) {
#ifdef TEMPER_WITH_NCCL
  if (c10::cuda::device_count() <= device) {
    throw std::runtime_error("NCCL: this rank's GPU cuda:" + std::to_string(device) +
                             " is not among the " +
                             std::to_string(c10::cuda::device_count()) + " visible");
  }
  // Every CUDA call of this process (and NCCL's communicator) on the rank's own GPU.
  c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
  auto options = c10d::ProcessGroupNCCL::Options::create();
  options->timeout = timeout;
  auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, options);
  // Bound to its GPU: the communicator is created now (not at the first collective), and a
  // barrier knows which device to use instead of guessing from the rank.
  at::Device gpu(at::kCUDA, static_cast<c10::DeviceIndex>(device));
  pg->setBoundDeviceId(gpu);
  pg->eagerConnectSingleDevice(gpu);
  return pg;
#else
  (void)store, (void)rank, (void)world, (void)timeout, (void)device;
  throw std::runtime_error("this build of temper has no NCCL (libtorch without CUDA, or "
                           "scripts/setup.sh's NCCL headers missing when it was built)");
#endif
}

} // namespace temper

// 1 where this build compiled NCCL in (the Rust side's `nccl_built`).
extern "C" int temper_has_nccl() {
#ifdef TEMPER_WITH_NCCL
  return 1;
#else
  return 0;
#endif
}
