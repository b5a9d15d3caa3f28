// Scratch kept from one op call to the next.
//
// PyTorch's CPU allocator caches nothing, and glibc hands large blocks back to the OS when they
// are freed, so scratch allocated per call is fresh memory whose first write to each 4 KiB page
// faults, both threads faulting at once inside the kernels' parallel regions. A training loop
// calls an op with the same shapes every step: keeping its scratch between calls removes those
// faults (the fused Refiner at (64, 3, 65, 64): B1 1.55 ms instead of 2.15 ms with its dA* map
// kept). Bounded: a cache holds at most `limit` values, all of the most recent key, so it never
// holds more than one call of that shape used anyway. Fork-safe (fork_guard.h): a child forked
// after the parent used a cache starts with it empty and unlocked.
#pragma once

#include <cstdint>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

#include "fork_guard.h"

namespace fastattnreg::cpu {

template <typename Key, typename Value>
class KeptCache final : public ForkSensitive {
 public:
  // A value kept under `key`, if any (it is the caller's until given back).
  std::optional<Value> take(const Key& key) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = kept_.begin(); it != kept_.end(); ++it)
      if (it->first == key) {
        Value v = std::move(it->second);
        kept_.erase(it);
        return v;
      }
    return std::nullopt;
  }

  // Keeps `value` under `key`, dropping values of any other key; dropped too if `limit` values
  // of this key are kept already.
  void give_back(const Key& key, Value value, int64_t limit) {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<std::pair<Key, Value>> same;
    for (auto& kv : kept_)
      if (kv.first == key) same.push_back(std::move(kv));
    kept_ = std::move(same);
    if (static_cast<int64_t>(kept_.size()) < limit) kept_.emplace_back(key, std::move(value));
  }

  // One cache per (Key, Value, Tag), never destroyed (the OS takes the memory back at exit):
  // freeing tensors from a static destructor could run after libtorch's own statics are gone.
  template <typename Tag>
  static KeptCache& instance() {
    static auto* cache = [] {
      auto* c = new KeptCache;
      ForkGuard::get().add(c);
      return c;
    }();
    return *cache;
  }

  void lock_for_fork() override { mu_.lock(); }
  void unlock_after_fork() override { mu_.unlock(); }
  void reset_in_child() override { kept_.clear(); }
  int64_t entries() override {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int64_t>(kept_.size());
  }

 private:
  KeptCache() = default;

  std::mutex mu_;
  std::vector<std::pair<Key, Value>> kept_;
};

}  // namespace fastattnreg::cpu
