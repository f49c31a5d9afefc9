// A CPU allocator that counts the bytes of live allocations and their peak (wrapping LibTorch's own), for tests
// that check what a process allocates: install() makes it the CPU allocator for the rest of the process.
// Its data pointers are their own contexts (as the default CPU allocator's are), so raw_allocate works too.
#pragma once
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <unordered_map>

namespace moeforge::test {

class CountingAllocator final : public c10::Allocator {
 public:
  std::atomic<int64_t> now{0}, peak{0};

  c10::DataPtr allocate(size_t n) const override {
    c10::DataPtr inner = base_->allocate(n);
    void* data = inner.get();
    if (data == nullptr) return inner;
    TORCH_CHECK(inner.get_context() == data && inner.get_deleter() == base_deleter_,
                "the wrapped CPU allocator's pointers are their own contexts");
    const auto dev = inner.device();
    inner.release_context();  // ours now: freed by release() through the base's deleter
    auto* self = const_cast<CountingAllocator*>(this);
    {
      std::lock_guard<std::mutex> g(self->mu_);
      self->sizes_[data] = static_cast<int64_t>(n);
    }
    const int64_t v = self->now += static_cast<int64_t>(n);
    int64_t p = self->peak.load();
    while (v > p && !self->peak.compare_exchange_weak(p, v)) {
    }
    return {data, data, &release, dev};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void reset_peak() { peak = now.load(); }

  // The process's counting allocator, installed on first use.
  static CountingAllocator& install() {
    static CountingAllocator* a = [] {
      auto* c = new CountingAllocator;
      c->base_ = c10::GetCPUAllocator();
      c->base_deleter_ = c->base_->raw_deleter();
      TORCH_CHECK(c->base_deleter_ != nullptr, "the CPU allocator has a raw deleter");
      instance() = c;
      c10::SetCPUAllocator(c, /*priority=*/255);
      return c;
    }();
    return *a;
  }

 private:
  static CountingAllocator*& instance() {
    static CountingAllocator* i = nullptr;
    return i;
  }
  static void release(void* p) {
    CountingAllocator* self = instance();
    int64_t n = 0;
    {
      std::lock_guard<std::mutex> g(self->mu_);
      auto it = self->sizes_.find(p);
      if (it != self->sizes_.end()) {
        n = it->second;
        self->sizes_.erase(it);
      }
    }
    self->now -= n;
    self->base_deleter_(p);
  }
  c10::Allocator* base_ = nullptr;
  c10::DeleterFnPtr base_deleter_ = nullptr;
  std::mutex mu_;
  std::unordered_map<void*, int64_t> sizes_;
};

}  // namespace moeforge::test
