// Packed copies of dense 2-D weights, keyed by the dense weight's data pointer and shape: the
// registries behind `nxcore::_pack_invariant` (VNNI copies, nxcore/csrc/invariant.cpp) and
// `nxcore::_pack_amx` (AMX copies, nxcore/csrc/amx_linear.cpp). nxcore.modules.linear.prepack
// fills them at load and its finalizer empties them with the model.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <unordered_map>

namespace nxcore {

class WeightRegistry {
 public:
  // The copy packed from `w`, if any. The count is read without the lock first: every bf16 linear
  // asks, and where a kind of copy is never made (a CPU without the kernel) the answer is known
  // without locking or hashing.
  std::optional<at::Tensor> find(const at::Tensor& w) const {
    if (entries_.load(std::memory_order_relaxed) == 0 || w.dim() != 2) return std::nullopt;
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = map_.find(key_of(w));
    if (it == map_.end()) return std::nullopt;
    return it->second;
  }

  void put(const at::Tensor& w, const at::Tensor& packed) {
    std::lock_guard<std::mutex> lock(mutex_);
    map_[key_of(w)] = packed;
    entries_.store(static_cast<int64_t>(map_.size()), std::memory_order_relaxed);
  }

  void erase(const at::Tensor& w) {
    if (w.dim() != 2) return;
    std::lock_guard<std::mutex> lock(mutex_);
    map_.erase(key_of(w));
    entries_.store(static_cast<int64_t>(map_.size()), std::memory_order_relaxed);
  }

  int64_t size() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(map_.size());
  }

 private:
  struct Key {
    const void* data;
    int64_t n, k;
    bool operator==(const Key& o) const { return data == o.data && n == o.n && k == o.k; }
  };
  struct KeyHash {
    size_t operator()(const Key& key) const { return std::hash<const void*>()(key.data) ^ (std::hash<int64_t>()(key.n) << 1); }
  };
  static Key key_of(const at::Tensor& w) { return {w.const_data_ptr(), w.size(0), w.size(1)}; }

  mutable std::mutex mutex_;
  std::unordered_map<Key, at::Tensor, KeyHash> map_;
  std::atomic<int64_t> entries_{0};
};

}  // namespace nxcore
