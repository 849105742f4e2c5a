// Native CPU epilogue of the chunked LM-head cross-entropy (semantics: lumina/model/loss.py, whose
// torch path computes the same numbers with log_softmax, amax, gather, exp_ and scatter_add_).
//
//   xent_rows_(logits_CV, targets_C, keep_C, grads) -> (nll_C, hits_C)
//
// Per row r of the fp32 or bf16 logits, with t = targets[r] (ignored rows carry any valid column) and
// k = keep[r]:
//   mx = max_v x[v];  hits[r] = k and x[t] >= mx                  (the accuracy's "correct argmax")
//   e_v = exp(x[v] - mx);  s = sum_v e_v;  nll[r] = k ? log(s) - (x[t] - mx) : 0
//   grads: the row becomes e / s - k * onehot(t)                  (softmax - onehot, in place)
// Three passes over each row while it sits in the core's cache (a 50304-wide fp32 row is 196 KiB),
// where the torch path sweeps the whole [C, V] chunk through memory five times. Rows are spread over
// threads, each row's sums run in a fixed order: deterministic for any thread count.
//
// bf16 logits (bf16 training: the head's matmul output) are widened row by row into a per-thread fp32
// buffer, the same three passes run there, and the gradient row is rounded back to bf16 in place
// (round to nearest even, as torch's .to(torch.bfloat16)): the numbers of `.float()`, the fp32 kernel
// and `.to(torch.bfloat16)` (a NaN's bits aside), without the two [C, V] conversions through memory.
// nll is fp32 either way.
//
// exp is a Cephes-style polynomial (range reduction by ln 2, degree-6 polynomial, exponent bits), branch
// free so that the loops vectorise; inputs here are <= 0, and below -87.3 (where float exp leaves the
// normal range) it returns exp(-87.3) ~ 1.2e-38 instead of a subnormal or 0 — nothing a sum of terms
// of which the largest is 1 can see. Relative error ~1 ulp against the correctly rounded exp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "cpu_clones.h"

namespace {

inline float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  x = x < -87.33654f ? -87.33654f : x;   // (NaN stays NaN: the comparison is false)
  const float n = (x * kLog2e + kRound) - kRound;
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (p * r) * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 0]
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Reductions keep kLanes partial results (lane l takes elements l, l + kLanes, ...), so that the
// compiler vectorises them without reassociating floats on its own (no -ffast-math), and fold them
// pairwise at the end: a fixed order, and a sum whose rounding error grows with V / kLanes.
constexpr int64_t kLanes = 16;

float fold(float* acc, bool is_max) {
  for (int64_t w = kLanes / 2; w > 0; w /= 2) {
    for (int64_t l = 0; l < w; ++l) acc[l] = is_max ? (acc[l + w] > acc[l] ? acc[l + w] : acc[l]) : acc[l] + acc[l + w];
  }
  return acc[0];
}

LUMINA_CLONES float row_max(const float* x, int64_t V) {
  float acc[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) acc[l] = -INFINITY;
  int64_t v = 0;
  for (; v + kLanes <= V; v += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) acc[l] = x[v + l] > acc[l] ? x[v + l] : acc[l];
  }
  for (; v < V; ++v) acc[0] = x[v] > acc[0] ? x[v] : acc[0];
  return fold(acc, true);
}

// e_v = exp(x_v - mx), written over x when `write` (the gradient pass needs it); returns their sum.
LUMINA_CLONES float exp_sum(float* x, int64_t V, float mx, bool write) {
  float acc[kLanes] = {};
  int64_t v = 0;
  for (; v + kLanes <= V; v += kLanes) {
    float e[kLanes];
    for (int64_t l = 0; l < kLanes; ++l) e[l] = exp_nonpositive(x[v + l] - mx);
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += e[l];
    if (write) std::memcpy(x + v, e, sizeof(e));
  }
  for (; v < V; ++v) {
    const float e = exp_nonpositive(x[v] - mx);
    acc[0] += e;
    if (write) x[v] = e;
  }
  return fold(acc, false);
}

LUMINA_CLONES void scale_row(float* x, int64_t V, float inv) {
  for (int64_t v = 0; v < V; ++v) x[v] *= inv;
}

LUMINA_CLONES void widen_row(const c10::BFloat16* src, float* dst, int64_t V) {
  for (int64_t v = 0; v < V; ++v) dst[v] = static_cast<float>(src[v]);
}

// fp32 -> bf16 bits, rounded to nearest even as .to(torch.bfloat16) rounds (c10::BFloat16's rule, with
// NaN as 0x7FC0; torch's vectorised cast writes 0xFFFF: a NaN either way), branch free so that the
// loop vectorises
LUMINA_CLONES void narrow_row(const float* src, c10::BFloat16* dst, int64_t V) {
  uint16_t* out = reinterpret_cast<uint16_t*>(dst);
  for (int64_t v = 0; v < V; ++v) {
    uint32_t u;
    std::memcpy(&u, src + v, sizeof(u));
    const uint16_t rounded = static_cast<uint16_t>((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);
    out[v] = src[v] != src[v] ? uint16_t{0x7FC0} : rounded;
  }
}

// one row in fp32 at x: its nll, hit, and (grads) the row overwritten with softmax - onehot
inline void xent_row(float* x, int64_t V, int64_t t, bool k, bool grads, float* nll, bool* hit) {
  const float mx = row_max(x, V), xt = x[t];
  *hit = k && xt >= mx;
  const float s = exp_sum(x, V, mx, grads);
  *nll = k ? std::log(s) - (xt - mx) : 0.0f;
  if (grads) {
    scale_row(x, V, 1.0f / s);
    if (k) x[t] -= 1.0f;
  }
}

std::tuple<at::Tensor, at::Tensor> xent_rows_(const at::Tensor& logits, const at::Tensor& targets,
                                              const at::Tensor& keep, bool grads) {
  const bool bf16 = logits.scalar_type() == at::kBFloat16;
  TORCH_CHECK(logits.dim() == 2 && (logits.scalar_type() == at::kFloat || bf16) && logits.is_contiguous() &&
                  logits.device().is_cpu(),
              "lumina_native: xent_rows_'s logits must be a contiguous 2-D fp32 or bf16 CPU tensor, got ",
              logits.scalar_type(), " of shape ", logits.sizes());
  const int64_t C = logits.size(0), V = logits.size(1);
  TORCH_CHECK(targets.dim() == 1 && targets.numel() == C && targets.scalar_type() == at::kLong &&
                  targets.device().is_cpu(),
              "lumina_native: xent_rows_'s targets must be [", C, "] int64 on the CPU, got ",
              targets.scalar_type(), " of shape ", targets.sizes());
  TORCH_CHECK(keep.dim() == 1 && keep.numel() == C && keep.scalar_type() == at::kBool && keep.device().is_cpu(),
              "lumina_native: xent_rows_'s keep must be [", C, "] bool on the CPU, got ", keep.scalar_type(),
              " of shape ", keep.sizes());
  TORCH_CHECK(V > 0 || C == 0, "lumina_native: xent_rows_ needs at least one column");
  const at::Tensor t_c = targets.contiguous(), k_c = keep.contiguous();
  const int64_t* tp = t_c.const_data_ptr<int64_t>();
  const bool* kp = k_c.const_data_ptr<bool>();
  for (int64_t r = 0; r < C; ++r) {
    TORCH_CHECK(tp[r] >= 0 && tp[r] < V, "lumina_native: xent_rows_'s target ", tp[r], " in row ", r,
                " is outside [0, ", V, ")");
  }
  at::Tensor nll = at::empty({C}, logits.options().dtype(at::kFloat));
  at::Tensor hits = at::empty({C}, keep.options());
  float* np = nll.data_ptr<float>();
  bool* hp = hits.data_ptr<bool>();
  if (!bf16) {
    float* xp = logits.data_ptr<float>();
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) xent_row(xp + r * V, V, tp[r], kp[r], grads, np + r, hp + r);
    });
    return {nll, hits};
  }
  c10::BFloat16* xp = logits.data_ptr<c10::BFloat16>();
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(static_cast<size_t>(V));  // this task's fp32 row (cache-sized: 196 KiB at V 50304)
    for (int64_t r = begin; r < end; ++r) {
      widen_row(xp + r * V, row.data(), V);
      xent_row(row.data(), V, tp[r], kp[r], grads, np + r, hp + r);
      if (grads) narrow_row(row.data(), xp + r * V, V);
    }
  });
  return {nll, hits};
}

// acc += src, acc fp32 and src bf16 (the chunked head's gradient accumulator and one chunk's bf16
// product): each element widened and added in one pass. torch's mixed-dtype add_ first converts src
// into a temporary fp32 tensor (a [V, D] write and read more); the sums are the same.
LUMINA_CLONES void add_widened_range(float* acc, const c10::BFloat16* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += static_cast<float>(src[i]);
}

void add_bf16_(const at::Tensor& acc, const at::Tensor& src) {
  TORCH_CHECK(acc.scalar_type() == at::kFloat && acc.is_contiguous() && acc.device().is_cpu(),
              "lumina_native: add_bf16_'s accumulator must be a contiguous fp32 CPU tensor, got ", acc.scalar_type());
  TORCH_CHECK(src.scalar_type() == at::kBFloat16 && src.is_contiguous() && src.device().is_cpu() &&
                  src.sizes() == acc.sizes(),
              "lumina_native: add_bf16_ needs a contiguous bf16 CPU tensor of the accumulator's shape ", acc.sizes(),
              ", got ", src.scalar_type(), " ", src.sizes());
  float* a = acc.data_ptr<float>();
  const c10::BFloat16* b = src.const_data_ptr<c10::BFloat16>();
  at::parallel_for(0, acc.numel(), int64_t{1} << 15,
                   [&](int64_t begin, int64_t end) { add_widened_range(a + begin, b + begin, end - begin); });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lumina_native, m) {
  m.def("xent_rows_(Tensor(a!) logits, Tensor targets, Tensor keep, bool grads) -> (Tensor, Tensor)");
  m.def("add_bf16_(Tensor(a!) acc, Tensor src) -> ()");
}

TORCH_LIBRARY_IMPL(lumina_native, CPU, m) {
  m.impl("xent_rows_", &xent_rows_);
  m.impl("add_bf16_", &add_bf16_);
}
