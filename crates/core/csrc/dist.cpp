// PyTorch's own distributed engine (c10d), which tch does not bind: a TCPStore rendezvous and a
// Gloo (CPU) or NCCL (GPU, nccl.cpp) process group, and the three collectives data-parallel
// training needs (all-reduce, broadcast, barrier). Everything here calls torch's compiled c10d;
// the gloo headers (Debian's libgloo-dev) are only needed to compile ProcessGroupGloo.hpp, and
// the shim passes no gloo type across its boundary. Errors are returned as strings, as in
// shim.cpp.
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <string>
#include <vector>

#include "guarded.h"

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> pg;
};

bool is_loopback(const std::string &host) {
  return host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1";
}


} // namespace

namespace temper {
c10::intrusive_ptr<c10d::Backend> make_nccl(const c10::intrusive_ptr<c10d::Store> &store,
                                            int rank, int world,
                                            std::chrono::milliseconds timeout, int device);

// The process group of a handle from temper_pg_new (for reducer.cpp).
c10::intrusive_ptr<c10d::Backend> group_backend(void *group) {
  return static_cast<Group *>(group)->pg;
}
} // namespace temper

extern "C" {

// Rendezvous at host:port (rank 0 serves the store) and a process group of `world` ranks: Gloo
// (backend 0) or NCCL (backend 1) with this rank on GPU `device`. Every wait (rendezvous,
// collectives) gives up after timeout_ms. Null on error.
void *temper_pg_new(const char *host, int port, int rank, int world, long timeout_ms,
                    int backend, int device) {
  Group *group = nullptr;
  int rc = temper::guarded([&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = rank == 0;
    opts.numWorkers = world;
    opts.waitWorkers = true;
    opts.timeout = timeout;
    c10::intrusive_ptr<c10d::Store> store =
        c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    c10::intrusive_ptr<c10d::Backend> pg;
    if (backend == 1) {
      pg = temper::make_nccl(store, rank, world, timeout, device);
    } else {
      auto options = c10d::ProcessGroupGloo::Options::create(timeout);
      // On one machine the loopback interface; across machines the one this host's name
      // resolves to (GLOO_SOCKET_IFNAME picks another, as with torchrun).
      options->devices.push_back(
          is_loopback(host) ? c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1")
                            : c10d::ProcessGroupGloo::createDefaultDevice());
      pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
    }
    group = new Group{store, pg};
  });
  return rc == 0 ? group : nullptr;
}

void temper_pg_free(void *group) { delete static_cast<Group *>(group); }

// Sums `tensor` over the ranks, in place.
int temper_pg_allreduce_sum(void *group, at::Tensor *tensor) {
  return temper::guarded([&] {
    std::vector<at::Tensor> tensors{*tensor};
    static_cast<Group *>(group)->pg->allreduce(tensors)->wait();
  });
}

// Copies rank `root`'s `tensor` to every rank, in place.
int temper_pg_broadcast(void *group, at::Tensor *tensor, int root) {
  return temper::guarded([&] {
    std::vector<at::Tensor> tensors{*tensor};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    static_cast<Group *>(group)->pg->broadcast(tensors, opts)->wait();
  });
}

int temper_pg_barrier(void *group) {
  return temper::guarded([&] { static_cast<Group *>(group)->pg->barrier()->wait(); });
}

} // extern "C"
