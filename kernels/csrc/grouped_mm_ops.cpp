// Native CPU grouped matmul of the dropless MoE experts (semantics: kernels/reference.py's grouped_mm
// and grouped_mm_weight_grad): the reference's loop of per-expert matmuls, in C++.
//
//   grouped_mm(x_AD, w_EDF, counts_E) -> y_AF                 y[seg e] = x[seg e] @ w[e]
//   grouped_mm_weight_grad(x_AD, g_AF, counts_E) -> dw_EDF    dw[e] = x[seg e]^T @ g[seg e]
//
// Segment e is rows [sum(counts[:e]), sum(counts[:e+1])) of the expert-sorted rows. Each segment's
// matmul writes straight into its rows of the output (at::mm_out), as the reference does; an empty
// segment's weight gradient is zeros. The same matmul calls as the reference, so the same bits; what
// this saves is the reference's per-call Python (a custom op, the counts read with tolist(), a slice
// and a matmul call per expert in the interpreter). Operands may be strided (the backward passes w
// transposed); the matmuls are torch's own (multi-threaded) kernels.
#include <ATen/ATen.h>
#include <torch/library.h>

namespace {

const int64_t* checked_counts(const at::Tensor& counts, int64_t E, int64_t A) {
  TORCH_CHECK(counts.dim() == 1 && counts.numel() == E && counts.scalar_type() == at::kLong &&
                  counts.device().is_cpu() && counts.is_contiguous(),
              "lumina_native: grouped_mm's counts must be [", E, "] contiguous int64 on the CPU, got ",
              counts.scalar_type(), " of shape ", counts.sizes());
  const int64_t* c = counts.const_data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(c[e] >= 0, "lumina_native: grouped_mm's counts[", e, "] = ", c[e], " is negative");
    total += c[e];
  }
  TORCH_CHECK(total == A, "lumina_native: grouped_mm's counts sum to ", total, ", the rows are ", A);
  return c;
}

at::Tensor grouped_mm(const at::Tensor& x_AD, const at::Tensor& w_EDF, const at::Tensor& counts_E) {
  TORCH_CHECK(x_AD.dim() == 2 && w_EDF.dim() == 3 && x_AD.size(1) == w_EDF.size(1) && x_AD.device().is_cpu() &&
                  w_EDF.device().is_cpu() && x_AD.scalar_type() == w_EDF.scalar_type(),
              "lumina_native: grouped_mm needs x [A, D] and w [E, D, F] of one dtype on the CPU, got ",
              x_AD.sizes(), " and ", w_EDF.sizes());
  const int64_t A = x_AD.size(0), E = w_EDF.size(0), F = w_EDF.size(2);
  const int64_t* counts = checked_counts(counts_E, E, A);
  at::Tensor out = at::empty({A, F}, x_AD.options());
  int64_t start = 0;
  for (int64_t e = 0; e < E; ++e) {
    if (counts[e] > 0) {
      at::Tensor rows = out.narrow(0, start, counts[e]);
      at::mm_out(rows, x_AD.narrow(0, start, counts[e]), w_EDF.select(0, e));
    }
    start += counts[e];
  }
  return out;
}

at::Tensor grouped_mm_weight_grad(const at::Tensor& x_AD, const at::Tensor& g_AF, const at::Tensor& counts_E) {
  TORCH_CHECK(x_AD.dim() == 2 && g_AF.dim() == 2 && x_AD.size(0) == g_AF.size(0) && x_AD.device().is_cpu() &&
                  g_AF.device().is_cpu() && x_AD.scalar_type() == g_AF.scalar_type(),
              "lumina_native: grouped_mm_weight_grad needs x [A, D] and g [A, F] of one dtype on the CPU, got ",
              x_AD.sizes(), " and ", g_AF.sizes());
  const int64_t A = x_AD.size(0), D = x_AD.size(1), F = g_AF.size(1), E = counts_E.numel();
  const int64_t* counts = checked_counts(counts_E, E, A);
  at::Tensor out = at::empty({E, D, F}, x_AD.options());
  int64_t start = 0;
  for (int64_t e = 0; e < E; ++e) {
    at::Tensor dw = out.select(0, e);
    if (counts[e] > 0) {
      at::mm_out(dw, x_AD.narrow(0, start, counts[e]).t(), g_AF.narrow(0, start, counts[e]));
    } else {
      dw.zero_();
    }
    start += counts[e];
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lumina_native, m) {
  m.def("grouped_mm(Tensor x, Tensor w, Tensor counts) -> Tensor");
  m.def("grouped_mm_weight_grad(Tensor x, Tensor g, Tensor counts) -> Tensor");
}

TORCH_LIBRARY_IMPL(lumina_native, CPU, m) {
  m.impl("grouped_mm", &grouped_mm);
  m.impl("grouped_mm_weight_grad", &grouped_mm_weight_grad);
}
