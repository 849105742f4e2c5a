// Native CPU global L2 norm of a list of tensors (the gradient norm before clipping; semantics:
// lumina/optim.py's global_norm).
//
//   global_norm(Tensor[] xs) -> Tensor     float32, 0-dim: sqrt(sum over xs of sum of x^2)
//
// One pass over each tensor at memory bandwidth (torch's linalg_vector_norm reads an fp32 tensor at
// about a third of it on the CI machine type). Deterministic whatever the thread count: each tensor
// is cut into fixed blocks of kBlock elements, each block summed by one thread into 16 float64
// lanes (element i into lane i % 16) folded in lane order, the block sums added in order (the
// tensors in list order, each front to back), all in float64; the square root in float64, rounded
// once to float32.
// fp32, contiguous, CPU.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_clones.h"

namespace {

constexpr int64_t kBlock = int64_t{1} << 14;
constexpr int kLanes = 16;

LUMINA_CLONES double block_sum_squares(const float* __restrict x, int64_t n) {
  double lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const double v = x[i + j];
      lane[j] += v * v;
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    const double v = x[i];
    lane[j] += v * v;
  }
  double s = 0.0;
  for (int j = 0; j < kLanes; ++j) s += lane[j];
  return s;
}

at::Tensor global_norm(at::TensorList xs) {
  // every tensor's blocks, numbered across the list: one parallel loop over all of them
  std::vector<const float*> start;
  std::vector<int64_t> len;
  for (const auto& x : xs) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(),
                "lumina_native::global_norm: contiguous float32 CPU tensors only, got ", x.scalar_type(), " on ",
                x.device(), x.is_contiguous() ? "" : " (not contiguous)");
    const float* p = x.const_data_ptr<float>();
    for (int64_t b = 0; b < x.numel(); b += kBlock) {
      start.push_back(p + b);
      len.push_back(std::min(kBlock, x.numel() - b));
    }
  }
  std::vector<double> part(start.size());
  at::parallel_for(0, static_cast<int64_t>(start.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) part[b] = block_sum_squares(start[b], len[b]);
  });
  double total = 0.0;  // in block order: the list's order, each tensor front to back
  for (const double s : part) total += s;
  return at::scalar_tensor(static_cast<float>(std::sqrt(total)), at::TensorOptions().dtype(at::kFloat));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lumina_native, m) { m.def("global_norm(Tensor[] xs) -> Tensor"); }

TORCH_LIBRARY_IMPL(lumina_native, CPU, m) { m.impl("global_norm", &global_norm); }
