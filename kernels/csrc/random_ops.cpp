// Native CPU kernel of the train step's counter-based random numbers (semantics: lumina/model/random.py).
//
//   hash_uniform(key, n) -> u_n (float32)      u[i] = (H(H(i ^ key) + key) >> 8) * 2^-24
//   fold_in(key, d) -> key' (0-dim int64)      key' = H(H(key) ^ d)
//
// H is the 32-bit "lowbias32" hash (two multiply-xorshift rounds) and every operation is taken mod
// 2^32, exactly what the pure-torch expression computes in int64 with 32-bit masks: the numbers are
// bit-identical to it (tests/test_native.py), so a run gives the same jitter and dropout eagerly,
// compiled, on CUDA (which takes the torch expression) and here. The torch expression makes ~30
// passes over an int64 tensor of n elements; this is one pass, vectorised by the compiler. fold_in
// derives a key (per step, micro-batch and layer, a few a step): one op instead of the expression's
// ~30 on a 0-dim tensor.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

namespace {

inline uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

at::Tensor hash_uniform(const at::Tensor& key, int64_t n) {
  TORCH_CHECK(key.dim() == 0 && key.scalar_type() == at::kLong && key.device().is_cpu(),
              "lumina_native: hash_uniform's key must be a 0-dim int64 CPU tensor, got ", key.scalar_type(),
              " of shape ", key.sizes(), " on ", key.device());
  TORCH_CHECK(n >= 0, "lumina_native: hash_uniform's n must be >= 0, got ", n);
  const uint32_t k = static_cast<uint32_t>(key.item<int64_t>());
  at::Tensor out = at::empty({n}, key.options().dtype(at::kFloat));
  float* u = out.data_ptr<float>();
  constexpr float kScale = 1.0f / static_cast<float>(1u << 24);
  at::parallel_for(0, n, int64_t{1} << 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint32_t h = lowbias32(lowbias32(static_cast<uint32_t>(i) ^ k) + k);
      u[i] = static_cast<float>(h >> 8) * kScale;
    }
  });
  return out;
}

at::Tensor fold_in(const at::Tensor& key, int64_t data) {
  TORCH_CHECK(key.dim() == 0 && key.scalar_type() == at::kLong && key.device().is_cpu(),
              "lumina_native: fold_in's key must be a 0-dim int64 CPU tensor, got ", key.scalar_type(),
              " of shape ", key.sizes(), " on ", key.device());
  const uint32_t k = static_cast<uint32_t>(key.item<int64_t>());
  const uint32_t folded = lowbias32(lowbias32(k) ^ static_cast<uint32_t>(data));  // data mod 2^32
  return at::scalar_tensor(static_cast<int64_t>(folded), key.options());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lumina_native, m) {
  m.def("hash_uniform(Tensor key, int n) -> Tensor");
  m.def("fold_in(Tensor key, int data) -> Tensor");
}

TORCH_LIBRARY_IMPL(lumina_native, CPU, m) {
  m.impl("hash_uniform", &hash_uniform);
  m.impl("fold_in", &fold_in);
}
