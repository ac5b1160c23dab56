// Hard-masked SGD in one pass over memory (CPU, float32): what sparsefw's hard masks and
// torch's fused SGD do in two, ``g <- g * m`` and then torch._fused_sgd_, with the same
// arithmetic in the same order, so that the two give bit-identical weights, momentum buffers
// and masked gradients.
//
// Per entry, with the group's lr, momentum mu, dampening d, weight decay wd:
//   g  = g * m                      (written back with write_back: .grad holds the masked
//                                    gradient after; a parameter given no mask skips this)
//   g' = maximize ? -g : g
//   g' = fma(p, wd, g')             (if wd != 0)
//   b  = first ? g' : fma(g', 1 - d, b * mu)                     (if mu != 0)
//   g' = nesterov ? fma(b, mu, g') : b                           (if mu != 0)
//   p  = fma(g', -lr, p)
// torch's fused kernel runs that on whole vectors of ``width`` floats (8 with AVX2, 16 with
// AVX-512) and the last ``numel % width`` entries of a tensor through scalar code its compiler
// contracted differently: there the momentum is ``fma(b, mu, g' * (1 - d))``. This kernel
// does the same at the same positions (``width`` comes from torch's CPU capability).
// Built on first use by sparsefw.kernels (torch.utils.cpp_extension, -ffp-contract=off so the
// compiler adds no contractions of its own).
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>

#include "kernels.h"

#include <immintrin.h>

#include <cmath>
#include <optional>
#include <vector>

namespace {

constexpr int64_t kGrain = 1 << 15;

void check(const at::Tensor& t, const at::Tensor& like, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              what, " must be a contiguous float32 CPU tensor");
  TORCH_CHECK(t.numel() == like.numel(), what, " has ", t.numel(), " entries, its parameter ",
              like.numel());
}

}  // namespace

void masked_sgd_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                 const std::vector<std::optional<at::Tensor>>& masks,
                 const std::vector<at::Tensor>& bufs,
                 const std::vector<bool>& first, double lr, double momentum, double dampening,
                 double weight_decay, bool nesterov, bool maximize, int64_t width,
                 bool write_back) {
  TORCH_CHECK(width > 0 && width % 8 == 0, "masked_sgd_: width must be a multiple of 8");
  const size_t n_tensors = params.size();
  const bool use_momentum = momentum != 0.0;
  TORCH_CHECK(grads.size() == n_tensors && masks.size() == n_tensors,
              "masked_sgd_: params, grads and masks differ in length");
  TORCH_CHECK(!use_momentum || (bufs.size() == n_tensors && first.size() == n_tensors),
              "masked_sgd_: one momentum buffer and first-step flag per parameter");
  const bool use_wd = weight_decay != 0.0;  // tested in double, as torch's kernel does
  const float wd = static_cast<float>(weight_decay);
  const float mu = static_cast<float>(momentum);
  const float keep = static_cast<float>(1.0 - dampening);
  const float neg_lr = static_cast<float>(-lr);
  for (size_t t = 0; t < n_tensors; ++t) {
    const at::Tensor& param = params[t];
    check(param, param, "a parameter");
    check(grads[t], param, "a gradient");
    if (masks[t].has_value()) check(*masks[t], param, "a mask");
    if (use_momentum) check(bufs[t], param, "a momentum buffer");
    float* __restrict__ p = param.data_ptr<float>();
    float* __restrict__ g = grads[t].data_ptr<float>();
    // no mask: torch's fused SGD exactly (a parameter that is not sparsified)
    const float* __restrict__ m = masks[t].has_value() ? masks[t]->data_ptr<float>() : nullptr;
    float* __restrict__ b = use_momentum ? bufs[t].data_ptr<float>() : nullptr;
    const bool is_first = use_momentum && first[t];
    const int64_t n = param.numel();
    const int64_t vector_end = n - n % width;
    // the scalar tail, as torch's compiler contracted it
    auto tail_entry = [&](int64_t i) {
      float gi = g[i];
      if (m != nullptr) {
        gi = gi * m[i];
        if (write_back) g[i] = gi;
      }
      if (maximize) gi = gi * -1.0f;
      if (use_wd) gi = std::fma(p[i], wd, gi);
      if (use_momentum) {
        const float bi = is_first ? gi : std::fma(b[i], mu, gi * keep);
        b[i] = bi;
        gi = nesterov ? std::fma(bi, mu, gi) : bi;
      }
      p[i] = std::fma(gi, neg_lr, p[i]);
    };
    // whole vectors (AVX2, 8 floats; torch's vector boundary is a multiple of 8)
    const __m256 v_wd = _mm256_set1_ps(wd), v_mu = _mm256_set1_ps(mu);
    const __m256 v_keep = _mm256_set1_ps(keep), v_neg_lr = _mm256_set1_ps(neg_lr);
    const __m256 v_minus = _mm256_set1_ps(-1.0f);
    at::parallel_for(0, vector_end / 8, kGrain / 8, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const int64_t i = j * 8;
        __m256 gv = _mm256_loadu_ps(g + i);
        if (m != nullptr) {
          gv = _mm256_mul_ps(gv, _mm256_loadu_ps(m + i));
          if (write_back) _mm256_storeu_ps(g + i, gv);
        }
        __m256 pv = _mm256_loadu_ps(p + i);
        if (maximize) gv = _mm256_mul_ps(gv, v_minus);
        if (use_wd) gv = _mm256_fmadd_ps(pv, v_wd, gv);
        if (use_momentum) {
          const __m256 bv = is_first ? gv
              : _mm256_fmadd_ps(gv, v_keep, _mm256_mul_ps(_mm256_loadu_ps(b + i), v_mu));
          _mm256_storeu_ps(b + i, bv);
          gv = nesterov ? _mm256_fmadd_ps(bv, v_mu, gv) : bv;
        }
        _mm256_storeu_ps(p + i, _mm256_fmadd_ps(gv, v_neg_lr, pv));
      }
    });
    for (int64_t i = vector_end; i < n; ++i) tail_entry(i);
  }
}
