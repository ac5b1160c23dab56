// Declarations of sparsefw's compiled CPU kernels (bound to Python in bindings.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

// masked_sgd.cpp: hard-masked SGD in one pass (see there).
void masked_sgd_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                 const std::vector<std::optional<at::Tensor>>& masks,
                 const std::vector<at::Tensor>& bufs,
                 const std::vector<bool>& first, double lr, double momentum, double dampening,
                 double weight_decay, bool nesterov, bool maximize, int64_t width,
                 bool write_back);

// compact.cpp: the candidates not worse than a threshold, as increasing flat indices.
at::Tensor kept_indices(const at::Tensor& scores, const at::Tensor& candidates, double threshold,
                        bool largest, bool magnitude, int64_t expected);

// edits.cpp: zero every tensor at the indices where the 0/1 mask is zero.
void zero_inactive_(const at::Tensor& idx, const at::Tensor& mask,
                    const std::vector<at::Tensor>& tensors);
