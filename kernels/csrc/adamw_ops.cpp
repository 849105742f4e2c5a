// Native CPU AdamW step, out of place or in place (semantics: lumina/optim.py's _adamw_math).
//
//   adamw_out(p, g, m, v, p_out, m_out, v_out, grad_scale, decay, lr, beta1, beta2, bias1, bias2, eps)
//
// per element, in float, in this order (the foreach arithmetic's, with no fused multiply-adds: the
// target is built with -ffp-contract=off; the moments are bit-identical to it, the params agree to
// ~2 ulps in ~1e-4 of the elements: torch's vectorised sqrt is not always correctly rounded, this
// one is):
//   g' = g * grad_scale                          (the clipping factor; 1 leaves g as it is)
//   m' = m * beta1 + g' * (1 - beta1)
//   v' = v * beta2 + (g' * g') * (1 - beta2)
//   p' = p * decay - ((m' / bias1) * lr) / (sqrt(v' / bias2) + eps)     (decay = 1 - lr * wd, or 1)
// One pass reads p, g, m, v and writes p', m', v' to the outputs, which may be the inputs (in place:
// the ZeRO engine's partitions) or fresh tensors (the pure single-device step, which otherwise
// copies params and moments before an in-place kernel). fp32, contiguous, same numel, CPU.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu_clones.h"

namespace {

struct Coeffs {
  float grad_scale, decay, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, bias1, bias2, eps;
};

LUMINA_CLONES void adamw_range(const float* __restrict p, const float* __restrict g, const float* m, const float* v,
                 float* po, float* mo, float* vo, int64_t n, const Coeffs c) {
  // m/mo and v/vo may alias each other (in place) but each element is read before it is written
  for (int64_t i = 0; i < n; ++i) {
    const float gs = g[i] * c.grad_scale;
    const float m1 = m[i] * c.beta1 + gs * c.one_minus_beta1;
    const float v1 = v[i] * c.beta2 + (gs * gs) * c.one_minus_beta2;
    const float denom = std::sqrt(v1 / c.bias2) + c.eps;
    const float p1 = p[i] * c.decay - ((m1 / c.bias1) * c.lr) / denom;
    mo[i] = m1;
    vo[i] = v1;
    po[i] = p1;
  }
}

#if defined(__GNUC__) && defined(__x86_64__)
#define LUMINA_STREAMING 1
// Out of place, the outputs are fresh memory: ordinary stores first read each cache line they
// write (write-allocate), an extra stream per output. Non-temporal stores write the lines without
// reading them (the next step reads them back from memory anyway: a step's moments are far larger
// than the caches). The same operations as adamw_range, in the same order: bit-identical. Needs
// outputs that start 64-byte aligned (torch's CPU allocator aligns to 64 bytes; the caller checks).
__attribute__((target("avx512f"))) void adamw_range_stream(const float* __restrict p, const float* __restrict g,
                                                             const float* __restrict m, const float* __restrict v,
                                                             float* __restrict po, float* __restrict mo,
                                                             float* __restrict vo, int64_t n, const Coeffs c) {
  const __m512 gsc = _mm512_set1_ps(c.grad_scale), b1 = _mm512_set1_ps(c.beta1),
               omb1 = _mm512_set1_ps(c.one_minus_beta1), b2 = _mm512_set1_ps(c.beta2),
               omb2 = _mm512_set1_ps(c.one_minus_beta2), bc1 = _mm512_set1_ps(c.bias1),
               bc2 = _mm512_set1_ps(c.bias2), eps = _mm512_set1_ps(c.eps), dec = _mm512_set1_ps(c.decay),
               lr = _mm512_set1_ps(c.lr);
  // a task may start anywhere: elements up to the outputs' next 64-byte boundary take the plain loop
  // (the outputs share their offset from 64-byte aligned starts, so one count serves all three)
  int64_t i = static_cast<int64_t>((64 - reinterpret_cast<uintptr_t>(po) % 64) % 64 / sizeof(float));
  i = i < n ? i : n;
  adamw_range(p, g, m, v, po, mo, vo, i, c);
  for (; i + 16 <= n; i += 16) {
    const __m512 gs = _mm512_mul_ps(_mm512_loadu_ps(g + i), gsc);
    const __m512 m1 = _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(m + i), b1), _mm512_mul_ps(gs, omb1));
    const __m512 v1 =
        _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(v + i), b2), _mm512_mul_ps(_mm512_mul_ps(gs, gs), omb2));
    const __m512 denom = _mm512_add_ps(_mm512_sqrt_ps(_mm512_div_ps(v1, bc2)), eps);
    const __m512 upd = _mm512_div_ps(_mm512_mul_ps(_mm512_div_ps(m1, bc1), lr), denom);
    const __m512 p1 = _mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(p + i), dec), upd);
    _mm512_stream_ps(mo + i, m1);
    _mm512_stream_ps(vo + i, v1);
    _mm512_stream_ps(po + i, p1);
  }
  _mm_sfence();
  adamw_range(p + i, g + i, m + i, v + i, po + i, mo + i, vo + i, n - i, c);
}
#endif

void check(const at::Tensor& t, const char* name, int64_t numel) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "lumina_native: adamw_out's ", name, " must be a contiguous fp32 CPU tensor, got ",
              t.scalar_type(), " on ", t.device(), t.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK(t.numel() == numel, "lumina_native: adamw_out's ", name, " has ", t.numel(),
              " elements, the param ", numel);
}

void adamw_out(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v,
               const at::Tensor& p_out, const at::Tensor& m_out, const at::Tensor& v_out, double grad_scale,
               double decay, double lr, double beta1, double beta2, double bias1, double bias2, double eps) {
  const int64_t n = p.numel();
  const std::pair<const at::Tensor*, const char*> all[] = {{&p, "param"},   {&g, "grad"},   {&m, "m"},
                                                           {&v, "v"},       {&p_out, "p_out"}, {&m_out, "m_out"},
                                                           {&v_out, "v_out"}};
  for (const auto& [t, name] : all) check(*t, name, n);
  // the same float constants the foreach arithmetic multiplies by (Python floats cast to float)
  const Coeffs c{static_cast<float>(grad_scale), static_cast<float>(decay), static_cast<float>(lr),
                 static_cast<float>(beta1),      static_cast<float>(1.0 - beta1),
                 static_cast<float>(beta2),      static_cast<float>(1.0 - beta2),
                 static_cast<float>(bias1),      static_cast<float>(bias2),
                 static_cast<float>(eps)};
  const float *pp = p.const_data_ptr<float>(), *gp = g.const_data_ptr<float>();
  const float *mp = m.const_data_ptr<float>(), *vp = v.const_data_ptr<float>();
  float *po = p_out.data_ptr<float>(), *mo = m_out.data_ptr<float>(), *vo = v_out.data_ptr<float>();
  bool stream = false;
#ifdef LUMINA_STREAMING
  // out of place (no output is an input), outputs starting 64-byte aligned
  const auto aligned = [](const float* q) { return reinterpret_cast<uintptr_t>(q) % 64 == 0; };
  stream = __builtin_cpu_supports("avx512f") && po != pp && mo != mp && vo != vp && aligned(po) && aligned(mo) &&
           aligned(vo);
#endif
  at::parallel_for(0, n, int64_t{1} << 15, [&](int64_t begin, int64_t end) {
#ifdef LUMINA_STREAMING
    if (stream) {
      adamw_range_stream(pp + begin, gp + begin, mp + begin, vp + begin, po + begin, mo + begin, vo + begin,
                         end - begin, c);
      return;
    }
#endif
    adamw_range(pp + begin, gp + begin, mp + begin, vp + begin, po + begin, mo + begin, vo + begin, end - begin,
                c);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lumina_native, m) {
  m.def(
      "adamw_out(Tensor p, Tensor g, Tensor m, Tensor v, Tensor(a!) p_out, Tensor(b!) m_out, Tensor(c!) v_out, "
      "float grad_scale, float decay, float lr, float beta1, float beta2, float bias1, float bias2, float eps) -> ()");
}

TORCH_LIBRARY_IMPL(lumina_native, CPU, m) { m.impl("adamw_out", &adamw_out); }
