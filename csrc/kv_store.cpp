// Write a step's new K/V rows into their page slots: one memcpy of H_kv * D elements per token,
// instead of two index_copy_ calls (and their dtype/contiguity checks) per layer.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstring>

namespace radixrt {

// k, v: [T, Hkv, D] with contiguous rows (a token's heads adjacent); slots: [T] int64 flat slot
// ids; k_cache, v_cache: [P, page_size, Hkv, D] contiguous, same dtype as k and v.
void store_kv(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
              const at::Tensor& slots) {
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "bad k / v / cache shapes");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type() &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "k, v and the caches must share a dtype");
  const int64_t T = k.size(0), row = k.size(1) * k.size(2);
  TORCH_CHECK(k_cache.size(2) * k_cache.size(3) == row, "k rows do not match the cache rows");
  TORCH_CHECK(k.stride(2) == 1 && k.stride(1) == k.size(2) && v.stride(2) == 1 && v.stride(1) == v.size(2),
              "k and v rows must be contiguous");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the caches must be contiguous");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == T && slots.is_contiguous(), "slots: [T] int64");
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* s = slots.data_ptr<int64_t>();
  const size_t bytes = row * k.element_size();
  auto* kd = static_cast<char*>(k_cache.data_ptr());
  auto* vd = static_cast<char*>(v_cache.data_ptr());
  const auto* ks = static_cast<const char*>(k.data_ptr());
  const auto* vs = static_cast<const char*>(v.data_ptr());
  const int64_t ks0 = k.stride(0) * k.element_size(), vs0 = v.stride(0) * v.element_size();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(s[t] >= 0 && s[t] < num_slots, "slot ", s[t], " is outside the pool");
    std::memcpy(kd + s[t] * bytes, ks + t * ks0, bytes);
    std::memcpy(vd + s[t] * bytes, vs + t * vs0, bytes);
  }
}

}  // namespace radixrt
