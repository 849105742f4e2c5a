// Native CPU grouped matmul of the dropless MoE experts (semantics: kernels/reference.py's grouped_mm
// and grouped_mm_weight_grad): the reference's loop of per-expert matmuls, in C++.
//
//   grouped_mm(x_AD, w_EDF, counts_E) -> y_AF                 y[seg e] = x[seg e] @ w[e]
//   grouped_mm_weight_grad(x_AD, g_AF, counts_E) -> dw_EDF    dw[e] = x[seg e]^T @ g[seg e]
//
// Segment e is rows [sum(counts[:e]), sum(counts[:e+1])) of the expert-sorted rows. Each segment's
// matmul writes straight into its rows of the output (at::mm_out), as the reference does; an empty
// segment's weight gradient is zeros. What this saves is the reference's per-call Python (a custom
// op, the counts read with tolist(), a slice and a matmul call per expert in the interpreter).
// Operands may be strided (the backward passes w transposed).
//
// fp32 / fp64: the experts are spread over the intra-op threads (largest first onto the least
// loaded thread, rows as the load), each segment one single-threaded matmul, instead of each
// segment's matmul split over all threads: an expert's matmul is small (~256 rows x 256 x 384 in
// the benchmark), where splitting costs more than it gains. Measured on the 2-core Xeon of the CI
// type, the benchmark's MoE step alternated in one process: compiled 256.9 -> 250.7 ms, eager
// 274.8 -> 266.2 ms. The results no longer depend on the thread count (each expert's matmul is
// torch's single-threaded one); they equal the reference's where torch's multi-threaded matmul
// equals its single-threaded one, which on that machine is every [m, 256] x [256, 384] shape up to
// m = 700 but m = 1 (a matrix-vector product, summed in another order).
//
// Reduced precision (bf16 / fp16) on the CPU: torch sends these matmuls to oneDNN, which builds a
// kernel for each new shape on first use (JIT, 1-5 ms; measured on the AMX Xeon of the CI type, where
// the built bf16 kernel then runs a [413, 256] x [256, 384] in ~0.1 ms against fp32's ~0.28) and keeps
// 1024 of them. Expert segments change length every step, so an unpadded step would build kernels
// all the time. So each segment's rows are rounded up to a bucket (64, or at most 8 sizes per power of
// two: <= 12.5 % more rows): the forward reads the rows after a segment (the next segment's, or zeros
// past the end) and its extra output rows are overwritten by the next segment or cut off; the weight
// gradient contracts over the rows, so it copies the segment into zero-padded buffers. Each kept
// output element is still a dot product of the same operands (equal bits measured on the machine
// above; tests/test_native.py compares with the reference). These segments run in order, each over
// all threads (a bucket's extra rows overlap the next segment's).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <vector>

namespace {

// Experts -> threads, largest first onto the least loaded (rows as the load); empty experts skipped.
std::vector<std::vector<int64_t>> assign(const int64_t* counts, int64_t E, int T) {
  std::vector<int64_t> order;
  for (int64_t e = 0; e < E; ++e)
    if (counts[e] > 0) order.push_back(e);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return counts[a] > counts[b]; });
  std::vector<std::vector<int64_t>> lists(T);
  std::vector<int64_t> load(T, 0);
  for (int64_t e : order) {
    const int t = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
    lists[t].push_back(e);
    load[t] += counts[e];
  }
  return lists;
}

// f(e) for every non-empty expert, the experts spread over the threads as assign() says; inside a
// parallel region torch's matmuls run single-threaded (at one thread, parallel_for runs inline)
template <typename F>
void for_experts(const int64_t* counts, int64_t E, F f) {
  const int T = at::get_num_threads();
  const auto lists = assign(counts, E, T);
  const at::ThreadLocalState caller;  // the dispatcher's state (autograd below us) for the workers too
  at::parallel_for(0, T, 1, [&](int64_t b, int64_t end) {
    at::ThreadLocalStateGuard guard(caller);
    for (int64_t t = b; t < end; ++t)
      for (int64_t e : lists[t]) f(e);
  });
}

bool padded(const at::Tensor& t) { return t.scalar_type() != at::kFloat && t.scalar_type() != at::kDouble; }

// the bucket of m rows (m > 0): 64 below 64, else m rounded up to a multiple of 2^(floor(log2 m) - 3)
int64_t bucket(int64_t m) {
  if (m <= 64) return 64;
  int64_t log2 = 63 - __builtin_clzll(static_cast<unsigned long long>(m));
  const int64_t step = int64_t{1} << (log2 - 3);
  return (m + step - 1) / step * step;
}

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

// where each segment starts: the running sum of the counts
std::vector<int64_t> starts(const int64_t* counts, int64_t E) {
  std::vector<int64_t> first(E, 0);
  for (int64_t e = 1; e < E; ++e) first[e] = first[e - 1] + counts[e - 1];
  return first;
}

at::Tensor grouped_mm(const at::Tensor& x_AD, const at::Tensor& w_EDF, const at::Tensor& counts_E) {
  TORCH_CHECK(x_AD.dim() == 2 && w_EDF.dim() == 3 && x_AD.size(1) == w_EDF.size(1) && x_AD.device().is_cpu() &&
                  w_EDF.device().is_cpu() && x_AD.scalar_type() == w_EDF.scalar_type(),
              "lumina_native: grouped_mm needs x [A, D] and w [E, D, F] of one dtype on the CPU, got ",
              x_AD.sizes(), " and ", w_EDF.sizes());
  const int64_t A = x_AD.size(0), E = w_EDF.size(0), F = w_EDF.size(2);
  const int64_t* counts = checked_counts(counts_E, E, A);
  const std::vector<int64_t> first = starts(counts, E);
  if (!padded(x_AD)) {  // each segment its own rows, the experts spread over the threads
    at::Tensor out = at::empty({A, F}, x_AD.options());
    for_experts(counts, E, [&](int64_t e) {
      at::Tensor dst = out.narrow(0, first[e], counts[e]);
      at::mm_out(dst, x_AD.narrow(0, first[e], counts[e]), w_EDF.select(0, e));
    });
    return out;
  }
  // each segment's bucket of rows, in order: a bucket's extra rows are rewritten by the next segment
  // or lie past A and are cut off
  int64_t end = A;
  for (int64_t e = 0; e < E; ++e)
    if (counts[e] > 0) end = std::max(end, first[e] + bucket(counts[e]));
  at::Tensor x = x_AD;
  if (end > A) {  // a segment reads past the last row: zero rows after a copy of x
    x = at::zeros({end, x_AD.size(1)}, x_AD.options());
    x.narrow(0, 0, A).copy_(x_AD);
  }
  at::Tensor out = at::empty({end, F}, x_AD.options());
  for (int64_t e = 0; e < E; ++e) {
    if (counts[e] == 0) continue;
    const int64_t rows = bucket(counts[e]);
    at::Tensor dst = out.narrow(0, first[e], rows);
    at::mm_out(dst, x.narrow(0, first[e], rows), w_EDF.select(0, e));
  }
  return end > A ? out.narrow(0, 0, A) : out;
}

at::Tensor grouped_mm_weight_grad(const at::Tensor& x_AD, const at::Tensor& g_AF, const at::Tensor& counts_E) {
  TORCH_CHECK(x_AD.dim() == 2 && g_AF.dim() == 2 && x_AD.size(0) == g_AF.size(0) && x_AD.device().is_cpu() &&
                  g_AF.device().is_cpu() && x_AD.scalar_type() == g_AF.scalar_type(),
              "lumina_native: grouped_mm_weight_grad needs x [A, D] and g [A, F] of one dtype on the CPU, got ",
              x_AD.sizes(), " and ", g_AF.sizes());
  const int64_t A = x_AD.size(0), D = x_AD.size(1), F = g_AF.size(1), E = counts_E.numel();
  const int64_t* counts = checked_counts(counts_E, E, A);
  at::Tensor out = at::empty({E, D, F}, x_AD.options());
  for (int64_t e = 0; e < E; ++e)
    if (counts[e] == 0) out.select(0, e).zero_();
  const std::vector<int64_t> first = starts(counts, E);
  if (!padded(x_AD)) {  // the experts spread over the threads
    for_experts(counts, E, [&](int64_t e) {
      at::Tensor dw = out.select(0, e);
      at::mm_out(dw, x_AD.narrow(0, first[e], counts[e]).t(), g_AF.narrow(0, first[e], counts[e]));
    });
    return out;
  }
  // in order, through one buffer pair as large as the largest bucket (each segment's tail zeroed)
  int64_t most = 0;
  for (int64_t e = 0; e < E; ++e) most = std::max(most, counts[e] > 0 ? bucket(counts[e]) : int64_t{0});
  at::Tensor xs = at::empty({most, D}, x_AD.options()), gs = at::empty({most, F}, g_AF.options());
  for (int64_t e = 0; e < E; ++e) {
    if (counts[e] == 0) continue;
    const int64_t m = counts[e], rows = bucket(m);
    at::Tensor xe = xs.narrow(0, 0, rows), ge = gs.narrow(0, 0, rows);
    xe.narrow(0, 0, m).copy_(x_AD.narrow(0, first[e], m));
    ge.narrow(0, 0, m).copy_(g_AF.narrow(0, first[e], m));
    xe.narrow(0, m, rows - m).zero_();
    ge.narrow(0, m, rows - m).zero_();
    at::Tensor dw = out.select(0, e);
    at::mm_out(dw, xe.t(), ge);
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
