#define USE_C10D_GLOO 1
#if defined(MOEFORGE_WITH_NCCL)  // set by CMake when LibTorch has CUDA and NCCL's header and library are found
#define USE_C10D_NCCL 1
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#include "parallel/dist.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <cstdlib>
#include <atomic>
#include <thread>

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

at::Device local_rank_device(bool cuda, int local_rank) {
  if (!cuda) return at::Device(at::kCPU);
  const int n = std::max(1, static_cast<int>(torch::cuda::device_count()));
  return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(local_rank % n));
}

struct Group::Impl {
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;  // Gloo (CPU tensors); null for a group of one
#if defined(MOEFORGE_WITH_NCCL)
  c10::intrusive_ptr<c10d::ProcessGroupNCCL> nccl;  // NCCL (tensors on this rank's GPU), when used
#endif
  at::Device device{at::kCPU};                    // where the collectives' tensors must live
  // Calls f on the process group in use (both classes have the same collective methods).
  template <class F>
  auto with_pg(F&& f) {
#if defined(MOEFORGE_WITH_NCCL)
    if (nccl) return f(*nccl);
#endif
    return f(*pg);
  }
  c10::intrusive_ptr<c10d::Store> store;          // the job's store (to find out who is missing)
  std::vector<int> world_ranks;                   // the members, as world ranks
  int world_rank = 0;
};

namespace {
std::string beat_key(int r) { return "beat/" + std::to_string(r); }

std::vector<int> stalled_members(Group::Impl& g) {
  auto read = [&](int r) -> std::vector<uint8_t> {
    const std::string k = beat_key(r);
    return g.store->check({k}) ? g.store->get(k) : std::vector<uint8_t>{};
  };
  std::vector<std::vector<uint8_t>> before;
  for (int r : g.world_ranks) before.push_back(read(r));
  std::this_thread::sleep_for(std::chrono::milliseconds(2500));  // beats come every 0.5 s
  std::vector<int> missing;
  for (size_t i = 0; i < g.world_ranks.size(); ++i) {
    const int r = g.world_ranks[i];
    if (r != g.world_rank && read(r) == before[i]) missing.push_back(r);
  }
  return missing;
}

// After a failed collective: every process beats in the store from a thread of its own (Dist), so the
// members whose beat has stopped are the missing ones: dead, or stopped as a whole. Rank 0 serves the
// store; it stays (at most 10 s) until the other survivors have looked, so its exit does not cut them short.
std::string missing_members(Group::Impl& g) {
  try {
    const std::vector<int> missing = stalled_members(g);
    g.store->set("reported/" + std::to_string(g.world_rank), std::vector<uint8_t>{1});
    if (g.world_rank == 0) {
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
      for (bool all = false; !all && std::chrono::steady_clock::now() < deadline;) {
        all = true;
        for (int r : g.world_ranks)
          if (std::find(missing.begin(), missing.end(), r) == missing.end() &&
              !g.store->check({"reported/" + std::to_string(r)}))
            all = false;
        if (!all) std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
    }
    if (missing.empty()) return "every member is still alive (a collective timed out or a peer failed)";
    std::string out = missing.size() == 1 ? "rank " : "ranks ";
    for (size_t i = 0; i < missing.size(); ++i) out += (i ? ", " : "") + std::to_string(missing[i]);
    return out + (missing.size() == 1 ? " is" : " are") + " missing (died or hung)";
  } catch (const std::exception&) {
    return "rank 0 is gone (it serves the job's store; if it failed first, its own message names the missing rank)";
  }
}
}  // namespace

Group::Group(std::unique_ptr<Impl> impl, int rank, int size, std::string name)
    : impl_(std::move(impl)), rank_(rank), size_(size), name_(std::move(name)) {}

Group::~Group() = default;

namespace {
[[noreturn]] void collective_failed(Group::Impl& g, const std::string& group, const char* what, const std::exception& e) {
  throw UserError("rank " + std::to_string(g.world_rank) + ": " + what + " in group '" + group + "' failed: " +
                  missing_members(g) + " (parallel.timeout_s bounds the wait): " + std::string(e.what()).substr(0, 200));
}
}  // namespace

void Group::all_reduce_sum(std::vector<at::Tensor>& tensors) {
  if (size_ == 1 || tensors.empty()) return;
  for (auto& t : tensors) MF_CHECK(t.is_contiguous(), "all_reduce_sum takes contiguous tensors");
  c10d::AllreduceOptions o;
  o.reduceOp = c10d::ReduceOp::SUM;
  try {
    for (auto& t : tensors) {  // callers bucket small tensors into one
      std::vector<at::Tensor> one{t.device() == impl_->device ? t : t.to(impl_->device)};
      impl_->with_pg([&](auto& pg) { pg.allreduce(one, o)->wait(); });
      if (!one[0].is_same(t)) t.copy_(one[0]);
    }
  } catch (const std::exception& e) {
    collective_failed(*impl_, name_, "all-reduce", e);
  }
}

at::Tensor Group::all_to_all(const at::Tensor& x, const std::vector<int64_t>& in_splits,
                             const std::vector<int64_t>& out_splits) {
  MF_CHECK(static_cast<int>(in_splits.size()) == size_ && static_cast<int>(out_splits.size()) == size_,
           "one split per group rank");
  int64_t out_rows = 0, in_rows = 0;
  for (auto s : out_splits) out_rows += s;
  for (auto s : in_splits) in_rows += s;
  MF_CHECK(in_rows == x.size(0), "in_splits cover the rows of x");
  if (size_ == 1) return x.clone();
  if (x.device() != impl_->device)  // e.g. CUDA tensors over Gloo when NCCL is not built in
    return all_to_all(x.to(impl_->device), in_splits, out_splits).to(x.device());
  // bf16 rows travel as the 16-bit values they are (Gloo in LibTorch 1.13 has no bf16; an all-to-all does
  // no arithmetic, so any 16-bit type carries the bits unchanged).
  if (x.scalar_type() == at::kBFloat16)
    return all_to_all(x.view(at::kHalf), in_splits, out_splits).view(at::kBFloat16);
  // One extra row from this rank to itself, so no buffer is ever empty (a rank may send or receive
  // nothing); it is dropped again below.
  auto in_sizes = x.sizes().vec();
  in_sizes[0] = in_rows + 1;
  auto in = at::zeros(in_sizes, x.options());
  int64_t before_in = 0;
  for (int j = 0; j <= rank_; ++j) before_in += in_splits[static_cast<size_t>(j)];
  // Layout of `in`: rows for ranks 0..rank (incl. this rank's), the pad row, rows for the ranks after.
  if (before_in > 0) in.narrow(0, 0, before_in).copy_(x.narrow(0, 0, before_in));
  if (in_rows - before_in > 0) in.narrow(0, before_in + 1, in_rows - before_in).copy_(x.narrow(0, before_in, in_rows - before_in));
  std::vector<int64_t> is = in_splits, os = out_splits;
  is[static_cast<size_t>(rank_)] += 1;
  os[static_cast<size_t>(rank_)] += 1;
  auto out_sizes = x.sizes().vec();
  out_sizes[0] = out_rows + 1;
  auto out = at::empty(out_sizes, x.options());
  try {
    c10d::AllToAllOptions o;
    impl_->with_pg([&](auto& pg) { pg.alltoall_base(out, in, os, is, o)->wait(); });
  } catch (const std::exception& e) {
    collective_failed(*impl_, name_, "all-to-all", e);
  }
  // The pad row is the last row received from this rank.
  int64_t before_out = 0;
  for (int j = 0; j <= rank_; ++j) before_out += out_splits[static_cast<size_t>(j)];
  std::vector<at::Tensor> parts;
  if (before_out > 0) parts.push_back(out.narrow(0, 0, before_out));
  if (out_rows - before_out > 0) parts.push_back(out.narrow(0, before_out + 1, out_rows - before_out));
  if (parts.empty()) return out.narrow(0, 0, 0).clone();
  return parts.size() == 1 ? parts[0].clone() : at::cat(parts, 0);
}

void Group::barrier() {
  if (size_ == 1) return;
  try {
    c10d::BarrierOptions o;
    if (impl_->device.is_cuda()) o.device_ids = {impl_->device.index()};
    impl_->with_pg([&](auto& pg) { pg.barrier(o)->wait(); });
  } catch (const std::exception& e) {
    collective_failed(*impl_, name_, "barrier", e);
  }
}

struct Dist::Impl {
  c10::intrusive_ptr<c10d::Store> store;
  DistEnv env;
  std::chrono::milliseconds timeout{0};
  at::Device device{at::kCPU};
  std::thread beat;  // writes beat/<rank> twice a second (see missing_members)
  std::atomic<bool> stop{false};
  ~Impl() {
    stop = true;
    if (beat.joinable()) beat.join();
  }
};

namespace {
// On a CUDA device with NCCL built in, the group's collectives run on NCCL (its own store prefix);
// otherwise on Gloo, with CUDA tensors copied through the host.
void attach_device_backend(Group::Impl& gi, const Dist::Impl& d, const std::string& prefix, int rank, int size) {
#if defined(MOEFORGE_WITH_NCCL)
  if (d.device.is_cuda()) {
    // Without blocking wait, NCCL's wait() neither blocks nor throws on a timeout (a watchdog aborts the
    // process instead), and collective_failed could not name the missing rank.
    ::setenv("TORCH_NCCL_BLOCKING_WAIT", "1", 0);
    ::setenv("NCCL_BLOCKING_WAIT", "1", 0);
    c10::cuda::set_device(d.device.index());  // else NCCL guesses the GPU from the rank
    auto o = c10d::ProcessGroupNCCL::Options::create();
    o->timeout = d.timeout;
    gi.nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(
        c10::make_intrusive<c10d::PrefixStore>("nccl/" + prefix, d.store), rank, size, o);
    gi.device = d.device;
  }
#else
  (void)gi, (void)d, (void)prefix, (void)rank, (void)size;
#endif
}
}  // namespace

namespace {
c10::intrusive_ptr<c10d::ProcessGroupGloo> make_gloo(const c10::intrusive_ptr<c10d::Store>& store,
                                                     const std::string& prefix, int rank, int size,
                                                     const DistEnv& env, std::chrono::milliseconds timeout) {
  auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
  if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"); ifname && *ifname)
    opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
  else if (env.master_addr == "127.0.0.1" || env.master_addr == "localhost")
    opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  else
    opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
  opts->threads = 2;
  auto prefixed = c10::make_intrusive<c10d::PrefixStore>(prefix, store);
  try {
    return c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, rank, size, opts);
  } catch (const std::exception& e) {
    std::string who;  // the world ranks that never reached the store (Dist's constructor marks arrivals)
    try {
      for (int r = 0; r < env.world_size; ++r)
        if (!store->check({"joined/" + std::to_string(r)})) who += (who.empty() ? "" : ", ") + std::to_string(r);
    } catch (const std::exception&) {
      who = "0 (it serves the store)";
    }
    throw UserError("rank " + std::to_string(env.rank) + ": rendezvous at " + env.master_addr + ":" +
                    std::to_string(env.master_port) + ": not every one of the " + std::to_string(size) +
                    " ranks of group '" + prefix + "' joined within " + std::to_string(timeout.count() / 1000) +
                    " s (parallel.timeout_s)" + (who.empty() ? "" : "; missing: rank " + who) + ": " +
                    std::string(e.what()).substr(0, 120));
  }
}
}  // namespace

Dist::Dist() : world_group_(std::make_shared<Group>(nullptr, 0, 1, "world")) {}

Dist::Dist(const DistEnv& env, std::chrono::milliseconds timeout, at::Device device)
    : rank_(env.rank), world_(env.world_size) {
  if (world_ == 1) {
    world_group_ = std::make_shared<Group>(nullptr, 0, 1, "world");
    return;
  }
  impl_ = std::make_unique<Impl>();
  impl_->env = env;
  impl_->timeout = timeout;
  impl_->device = device;
  c10d::TCPStoreOptions so;
  so.port = static_cast<uint16_t>(env.master_port);
  so.isServer = env.rank == 0;
  so.numWorkers = static_cast<size_t>(env.world_size);
  so.waitWorkers = false;  // the Gloo rendezvous below waits, and can then say who is missing
  so.timeout = timeout;
  try {
    impl_->store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, so);
  } catch (const std::exception& e) {
    throw UserError("rank " + std::to_string(env.rank) + ": rendezvous at " + env.master_addr + ":" +
                    std::to_string(env.master_port) + " failed within " + std::to_string(timeout.count() / 1000) +
                    " s: " + std::string(e.what()).substr(0, 200));
  }
  try {
    impl_->store->set("joined/" + std::to_string(env.rank), std::vector<uint8_t>{1});
  } catch (const std::exception& e) {
    throw UserError("rank " + std::to_string(env.rank) + ": rendezvous at " + env.master_addr + ":" +
                    std::to_string(env.master_port) + " failed: " + std::string(e.what()).substr(0, 200));
  }
  impl_->beat = std::thread([impl = impl_.get()] {
    auto store = impl->store;
    for (uint32_t n = 1; !impl->stop; ++n) {
      try {
        store->set(beat_key(impl->env.rank), {static_cast<uint8_t>(n), static_cast<uint8_t>(n >> 8),
                                              static_cast<uint8_t>(n >> 16), static_cast<uint8_t>(n >> 24)});
      } catch (const std::exception&) {
        return;  // the store is gone; the collectives will say so
      }
      for (int i = 0; i < 5 && !impl->stop; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  });
  auto gi = std::make_unique<Group::Impl>();
  gi->pg = make_gloo(impl_->store, "world", env.rank, env.world_size, env, timeout);
  gi->store = impl_->store;
  gi->world_rank = env.rank;
  for (int r = 0; r < env.world_size; ++r) gi->world_ranks.push_back(r);
  attach_device_backend(*gi, *impl_, "world", env.rank, env.world_size);
  world_group_ = std::make_shared<Group>(std::move(gi), env.rank, env.world_size, "world");
}

Dist::~Dist() = default;

std::shared_ptr<Group> Dist::new_group(const std::string& name, const std::vector<int>& ranks) {
  auto it = std::find(ranks.begin(), ranks.end(), rank_);
  MF_CHECK(it != ranks.end(), "a group is created by its members");
  MF_CHECK(std::is_sorted(ranks.begin(), ranks.end()), "group ranks are sorted");
  const int r = static_cast<int>(it - ranks.begin()), n = static_cast<int>(ranks.size());
  if (n == 1) return std::make_shared<Group>(nullptr, 0, 1, name);
  auto gi = std::make_unique<Group::Impl>();
  gi->pg = make_gloo(impl_->store, name, r, n, impl_->env, impl_->timeout);
  gi->store = impl_->store;
  gi->world_rank = rank_;
  gi->world_ranks = ranks;
  attach_device_backend(*gi, *impl_, name, r, n);
  return std::make_shared<Group>(std::move(gi), r, n, name);
}

}  // namespace moeforge::parallel
