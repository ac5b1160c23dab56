// Mask edits at indices (CPU): after a topology update made the entries at the flat indices
// ``idx`` inactive (or dropped and re-grew them), zero the weight and every optimizer state
// tensor where the stored 0/1 mask is now zero, in one loop over the indices instead of a
// gather, a compaction and one scatter per tensor (sparsefw.masks.MaskSet.zero_at). The
// writes are zeros, so the result equals the numpy route's bit for bit.
#include <ATen/core/Tensor.h>

#include <vector>

#include "kernels.h"

void zero_inactive_(const at::Tensor& idx, const at::Tensor& mask,
                    const std::vector<at::Tensor>& tensors) {
  TORCH_CHECK(idx.device().is_cpu() && idx.scalar_type() == at::kLong && idx.is_contiguous(),
              "zero_inactive_: the indices must be a contiguous int64 CPU tensor");
  TORCH_CHECK(mask.device().is_cpu() && mask.scalar_type() == at::kFloat && mask.is_contiguous(),
              "zero_inactive_: the mask must be a contiguous float32 CPU tensor");
  const int64_t n = mask.numel();
  std::vector<float*> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                    t.numel() == n,
                "zero_inactive_: every tensor must be a contiguous float32 CPU tensor of the "
                "mask's size");
    out.push_back(t.data_ptr<float>());
  }
  const int64_t* at = idx.data_ptr<int64_t>();
  const float* m = mask.data_ptr<float>();
  const int64_t count = idx.numel();
  for (int64_t j = 0; j < count; ++j) {
    TORCH_CHECK(at[j] >= 0 && at[j] < n, "zero_inactive_: index ", at[j], " out of range for ",
                n, " entries");
  }
  const size_t k = out.size();
  for (int64_t j = 0; j < count; ++j) {
    const int64_t i = at[j];
    if (m[i] == 0.0f) {
      for (size_t t = 0; t < k; ++t) out[t][i] = 0.0f;
    }
  }
}
