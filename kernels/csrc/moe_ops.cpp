// Native CPU kernels of the MoE data-movement ops (semantics: kernels/reference.py).
//
// Legend: N tokens, K top-k, A = N*K assignments, S rows of the expert-side buffer, D model dim.
// src_S maps each buffer row to the assignment it holds (a = n*K + k) or -1 for an empty row: a
// permutation of [0, A) in the dropless case (S = A, expert-contiguous order), a partial map with
// dropped assignments and empty slots for a capacity buffer (S = E*C) or a MoD selection (K = 1).
// inv_A is its inverse (inv[src[i]] = i; -1 for an assignment no row holds).
//
//   moe_dispatch(x_ND, src_S, top_k) -> x_SD                  x_SD[i] = x[src[i] / K], 0 if src[i] < 0
//   moe_dispatch_backward(g_SD, src_S, top_k, num_tokens) -> dx_ND   dx[n] = sum_k g[inv[n*K+k]]
//   moe_combine(y_SD, src_S, w_NK) -> out_ND                   out[n] = sum_k w[n,k] * y[inv[n*K+k]]
//   moe_combine_backward(g_ND, y_SD, src_S, w_NK) -> (dy_SD, dw_NK)
//                                  dy[inv[n*K+k]] = w[n,k] * g[n];  dw[n,k] = <g[n], y[inv[n*K+k]]>
// (terms with inv = -1 are zero; rows of dy no assignment maps to are zero).
//
// Every output row is written by exactly one thread, and every sum runs over k in a fixed order, so
// the results are deterministic for any thread count (no atomics, no scatter-add). Sums accumulate
// in float (at::opmath_type) and round once, for bf16/fp16 as well.
// Autograd and the fake (meta) kernels are registered from Python (kernels/native.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

namespace {

// Partial sums per dot product (see moe_combine_backward).
constexpr int64_t kLanes = 16;

// Rows of D elements per parallel task: ~64 KiB of float work per chunk keeps the fork/join cost
// small next to the copy (D=512 -> 32 rows).
int64_t grain_rows(int64_t D) { return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(D, 1)); }

void check_perm(const at::Tensor& src_S) {
  TORCH_CHECK(src_S.dim() == 1, "lumina_native: perm must be 1-D, got shape ", src_S.sizes());
  TORCH_CHECK(src_S.scalar_type() == at::kLong, "lumina_native: perm must be int64, got ",
              src_S.scalar_type());
  TORCH_CHECK(src_S.device().is_cpu(), "lumina_native: perm must be on the CPU");
}

// The inverse map, validating src: each entry -1 or in [0, A), no assignment twice (an out-of-range
// or repeated id would otherwise read or write out of bounds). O(S), negligible next to the O(S*D)
// data movement. `empty` counts the rows with src = -1.
struct Inverse {
  at::Tensor inv_A;
  int64_t empty = 0;
};

Inverse inverse_map(const at::Tensor& src_S, int64_t A) {
  const int64_t S = src_S.numel();
  Inverse r{at::full({A}, -1, src_S.options())};
  const int64_t* src = src_S.const_data_ptr<int64_t>();
  int64_t* inv = r.inv_A.data_ptr<int64_t>();
  for (int64_t i = 0; i < S; ++i) {
    const int64_t a = src[i];
    if (a == -1) {
      ++r.empty;
      continue;
    }
    TORCH_CHECK(a >= 0 && a < A, "lumina_native: perm[", i, "] = ", a, " is outside [0, ", A, ") and not -1");
    TORCH_CHECK(inv[a] < 0, "lumina_native: perm maps assignment ", a, " twice");
    inv[a] = i;
  }
  return r;
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "lumina_native: ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), "lumina_native: ", name, " must be on the CPU");
}

at::Tensor moe_dispatch(const at::Tensor& x_ND, const at::Tensor& src_S, int64_t top_k) {
  check_rows(x_ND, "x");
  check_perm(src_S);
  TORCH_CHECK(top_k >= 1, "lumina_native: top_k must be >= 1, got ", top_k);
  const int64_t N = x_ND.size(0), D = x_ND.size(1), S = src_S.numel();
  const at::Tensor x = x_ND.contiguous();
  const at::Tensor src_c = src_S.contiguous();
  inverse_map(src_c, N * top_k);  // validation only: the gather below indexes x by src directly
  at::Tensor out_SD = at::empty({S, D}, x.options());
  const int64_t* src = src_c.const_data_ptr<int64_t>();
  const size_t row_bytes = static_cast<size_t>(D) * x.element_size();
  const char* xp = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(out_SD.data_ptr());
  // A row copy needs no arithmetic: one memcpy (or memset for an empty row) per row serves every dtype.
  at::parallel_for(0, S, grain_rows(D), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (src[i] < 0) {
        std::memset(dst + i * row_bytes, 0, row_bytes);
      } else {
        std::memcpy(dst + i * row_bytes, xp + (src[i] / top_k) * row_bytes, row_bytes);
      }
    }
  });
  return out_SD;
}

at::Tensor moe_dispatch_backward(const at::Tensor& g_SD, const at::Tensor& src_S, int64_t top_k,
                                 int64_t num_tokens) {
  check_rows(g_SD, "grad");
  check_perm(src_S);
  TORCH_CHECK(top_k >= 1, "lumina_native: top_k must be >= 1, got ", top_k);
  TORCH_CHECK(num_tokens >= 0, "lumina_native: num_tokens must be >= 0, got ", num_tokens);
  const int64_t S = g_SD.size(0), D = g_SD.size(1);
  TORCH_CHECK(src_S.numel() == S, "lumina_native: perm has ", src_S.numel(), " entries, grad has ", S,
              " rows");
  const int64_t N = num_tokens, K = top_k;
  const at::Tensor g = g_SD.contiguous();
  const at::Tensor inv_A = inverse_map(src_S.contiguous(), N * K).inv_A;
  at::Tensor dx_ND = at::empty({N, D}, g.options());
  const int64_t* inv = inv_A.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "moe_dispatch_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* dx = dx_ND.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain_rows(D * K), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(static_cast<size_t>(D));
      for (int64_t n = begin; n < end; ++n) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t k = 0; k < K; ++k) {
          if (inv[n * K + k] < 0) continue;  // dropped / not selected: no gradient
          const scalar_t* row = gp + inv[n * K + k] * D;
          for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<acc_t>(row[d]);
        }
        scalar_t* out = dx + n * D;
        for (int64_t d = 0; d < D; ++d) out[d] = static_cast<scalar_t>(acc[d]);
      }
    });
  });
  return dx_ND;
}

void check_weights(const at::Tensor& w_NK) {
  TORCH_CHECK(w_NK.dim() == 2, "lumina_native: weights must be [N, K], got shape ", w_NK.sizes());
  TORCH_CHECK(w_NK.device().is_cpu(), "lumina_native: weights must be on the CPU");
  TORCH_CHECK(at::isFloatingType(w_NK.scalar_type()), "lumina_native: weights must be floating point");
}

at::Tensor moe_combine(const at::Tensor& y_SD, const at::Tensor& src_S, const at::Tensor& w_NK) {
  check_rows(y_SD, "y");
  check_perm(src_S);
  const int64_t S = y_SD.size(0), D = y_SD.size(1);
  TORCH_CHECK(src_S.numel() == S, "lumina_native: perm has ", src_S.numel(), " entries, y has ", S, " rows");
  check_weights(w_NK);
  const int64_t N = w_NK.size(0), K = w_NK.size(1);
  const at::Tensor y = y_SD.contiguous();
  // The reference multiplies by weights.to(y.dtype): round the weights the same way.
  const at::Tensor w = w_NK.to(y.scalar_type()).contiguous();
  const at::Tensor inv_A = inverse_map(src_S.contiguous(), N * K).inv_A;
  at::Tensor out_ND = at::empty({N, D}, y.options());
  const int64_t* inv = inv_A.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "moe_combine", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* out = out_ND.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain_rows(D * K), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(static_cast<size_t>(D));
      for (int64_t n = begin; n < end; ++n) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t k = 0; k < K; ++k) {
          if (inv[n * K + k] < 0) continue;  // dropped / not selected: contributes nothing
          const acc_t wk = static_cast<acc_t>(wp[n * K + k]);
          const scalar_t* row = yp + inv[n * K + k] * D;
          for (int64_t d = 0; d < D; ++d) acc[d] += wk * static_cast<acc_t>(row[d]);
        }
        scalar_t* o = out + n * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[d]);
      }
    });
  });
  return out_ND;
}

std::tuple<at::Tensor, at::Tensor> moe_combine_backward(const at::Tensor& g_ND, const at::Tensor& y_SD,
                                                        const at::Tensor& src_S, const at::Tensor& w_NK) {
  check_rows(g_ND, "grad");
  check_rows(y_SD, "y");
  check_perm(src_S);
  const int64_t S = y_SD.size(0), D = y_SD.size(1);
  TORCH_CHECK(src_S.numel() == S, "lumina_native: perm has ", src_S.numel(), " entries, y has ", S, " rows");
  check_weights(w_NK);
  const int64_t N = w_NK.size(0), K = w_NK.size(1);
  TORCH_CHECK(g_ND.size(0) == N && g_ND.size(1) == D, "lumina_native: grad must be [", N, ", ", D, "], got ",
              g_ND.sizes());
  TORCH_CHECK(g_ND.scalar_type() == y_SD.scalar_type(), "lumina_native: grad dtype ", g_ND.scalar_type(),
              " differs from y dtype ", y_SD.scalar_type());
  const at::Tensor g = g_ND.contiguous();
  const at::Tensor y = y_SD.contiguous();
  const at::Tensor w = w_NK.to(y.scalar_type()).contiguous();
  const at::Tensor src_c = src_S.contiguous();
  const Inverse inverse = inverse_map(src_c, N * K);
  // Rows no assignment maps to get no gradient: zero them (only when there are any).
  at::Tensor dy_SD = inverse.empty ? at::zeros({S, D}, y.options()) : at::empty({S, D}, y.options());
  // dw is computed in the accumulation type (float; double for double) and cast to the weights' dtype
  // (the reference's grad flows through weights.to(y.dtype), whose backward casts back).
  at::Tensor dw_NK = at::empty({N, K}, y.options().dtype(at::toOpMathType(y.scalar_type())));
  const int64_t* inv = inverse.inv_A.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "moe_combine_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* dy = dy_SD.data_ptr<scalar_t>();
    acc_t* dw = dw_NK.data_ptr<acc_t>();
    // Parallel over tokens: token n owns rows inv[n*K + k] of dy (no two assignments share a row)
    // and its K weights.
    at::parallel_for(0, N, grain_rows(D * K), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* gr = gp + n * D;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t row = inv[n * K + k];
          if (row < 0) {  // dropped / not selected: its weight had no effect
            dw[n * K + k] = 0;
            continue;
          }
          const acc_t wk = static_cast<acc_t>(wp[n * K + k]);
          const scalar_t* yr = yp + row * D;
          scalar_t* dyr = dy + row * D;
          // The dot product in kLanes partial sums (lane l takes d = l mod kLanes), added in lane order
          // at the end: a fixed order, so still deterministic, and one the compiler can vectorise
          // (a single running sum is a serial dependency it may not reorder).
          acc_t part[kLanes] = {};
          int64_t d = 0;
          for (; d + kLanes <= D; d += kLanes) {
            for (int64_t l = 0; l < kLanes; ++l) {
              const acc_t gd = static_cast<acc_t>(gr[d + l]);
              dyr[d + l] = static_cast<scalar_t>(wk * gd);
              part[l] += gd * static_cast<acc_t>(yr[d + l]);
            }
          }
          for (int64_t l = 0; d < D; ++d, ++l) {
            const acc_t gd = static_cast<acc_t>(gr[d]);
            dyr[d] = static_cast<scalar_t>(wk * gd);
            part[l] += gd * static_cast<acc_t>(yr[d]);
          }
          acc_t dot = 0;
          for (int64_t l = 0; l < kLanes; ++l) dot += part[l];
          dw[n * K + k] = dot;
        }
      }
    });
  });
  return {dy_SD, dw_NK.to(w_NK.scalar_type())};
}

}  // namespace

TORCH_LIBRARY(lumina_native, m) {
  m.def("moe_dispatch(Tensor x, Tensor perm, int top_k) -> Tensor");
  m.def("moe_dispatch_backward(Tensor grad, Tensor perm, int top_k, int num_tokens) -> Tensor");
  m.def("moe_combine(Tensor y, Tensor perm, Tensor weights) -> Tensor");
  m.def("moe_combine_backward(Tensor grad, Tensor y, Tensor perm, Tensor weights) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lumina_native, CPU, m) {
  m.impl("moe_dispatch", &moe_dispatch);
  m.impl("moe_dispatch_backward", &moe_dispatch_backward);
  m.impl("moe_combine", &moe_combine);
  m.impl("moe_combine_backward", &moe_combine_backward);
}
