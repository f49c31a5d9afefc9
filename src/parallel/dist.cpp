#define USE_C10D_GLOO 1
#include "parallel/dist.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/torch.h>

#include <cstdlib>

#include "core/error.h"

namespace moeforge::parallel {

namespace {

int env_int(const char* name, int dflt, int lo, int hi, bool* present = nullptr) {
  const char* v = std::getenv(name);
  if (present) *present = v && *v;
  if (!v || !*v) return dflt;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  if (*end != '\0' || x < lo || x > hi)
    throw UserError("environment variable " + std::string(name) + "='" + v + "': expected an integer in [" +
                    std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return static_cast<int>(x);
}

}  // namespace

DistEnv read_dist_env() {
  DistEnv e;
  bool has_world = false, has_rank = false;
  e.world_size = env_int("WORLD_SIZE", 1, 1, 1 << 16, &has_world);
  e.rank = env_int("RANK", 0, 0, e.world_size - 1, &has_rank);
  e.local_rank = env_int("LOCAL_RANK", e.rank, 0, e.world_size - 1);
  e.master_port = env_int("MASTER_PORT", 29500, 1, 65535);
  if (const char* a = std::getenv("MASTER_ADDR"); a && *a) e.master_addr = a;
  e.distributed = e.world_size > 1;
  if (e.distributed && !has_rank) throw UserError("environment variable RANK: required when WORLD_SIZE > 1");
  return e;
}

struct Dist::Impl {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;
};

Dist::Dist() = default;

Dist::Dist(const DistEnv& env, std::chrono::milliseconds timeout) : rank_(env.rank), world_(env.world_size) {
  if (world_ == 1) return;
  impl_ = std::make_unique<Impl>();
  c10d::TCPStoreOptions so;
  so.port = static_cast<uint16_t>(env.master_port);
  so.isServer = env.rank == 0;
  so.numWorkers = static_cast<size_t>(env.world_size);
  so.waitWorkers = true;
  so.timeout = timeout;
  try {
    impl_->store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, so);
  } catch (const std::exception& e) {
    throw UserError("rank " + std::to_string(env.rank) + ": rendezvous at " + env.master_addr + ":" +
                    std::to_string(env.master_port) + " failed within " + std::to_string(timeout.count() / 1000) +
                    " s: " + std::string(e.what()).substr(0, 200));
  }
  auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
  if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"); ifname && *ifname)
    opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
  else if (env.master_addr == "127.0.0.1" || env.master_addr == "localhost")
    opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  else
    opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
  opts->threads = 2;
  auto prefixed = c10::make_intrusive<c10d::PrefixStore>("world", impl_->store);
  try {
    impl_->pg = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, env.rank, env.world_size, opts);
  } catch (const std::exception& e) {
    throw UserError("rank " + std::to_string(env.rank) + ": rendezvous at " + env.master_addr + ":" +
                    std::to_string(env.master_port) + ": not every one of the " + std::to_string(env.world_size) +
                    " ranks joined within " + std::to_string(timeout.count() / 1000) + " s (parallel.timeout_s): " +
                    std::string(e.what()).substr(0, 120));
  }
}

Dist::~Dist() = default;

void Dist::all_reduce_sum(std::vector<at::Tensor>& tensors) {
  if (world_ == 1 || tensors.empty()) return;
  for (auto& t : tensors) MF_CHECK(t.is_contiguous() && !t.is_cuda(), "all_reduce_sum takes contiguous CPU tensors");
  c10d::AllreduceOptions o;
  o.reduceOp = c10d::ReduceOp::SUM;
  try {
    // One collective per tensor in order; callers bucket small tensors into one.
    for (auto& t : tensors) {
      std::vector<at::Tensor> one{t};
      impl_->pg->allreduce(one, o)->wait();
    }
  } catch (const std::exception& e) {
    throw UserError("rank " + std::to_string(rank_) + ": all-reduce failed (another rank died or timed out): " +
                    std::string(e.what()).substr(0, 300));
  }
}

void Dist::barrier() {
  if (world_ == 1) return;
  try {
    impl_->pg->barrier()->wait();
  } catch (const std::exception& e) {
    throw UserError("rank " + std::to_string(rank_) + ": barrier failed (another rank died or timed out): " +
                    std::string(e.what()).substr(0, 300));
  }
}

}  // namespace moeforge::parallel
