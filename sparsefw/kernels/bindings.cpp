// The Python module of sparsefw's compiled CPU kernels (loaded by sparsefw.kernels.load_kernels).
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("masked_sgd_", &masked_sgd_,
             "hard-masked SGD step over lists of float32 CPU tensors (in place)");
  module.def("kept_indices", &kept_indices,
             "flat indices (increasing, int64) of the candidates whose score is not strictly "
             "worse than the threshold");
  module.def("zero_inactive_", &zero_inactive_,
             "zero float32 tensors at the flat indices where the 0/1 mask is zero (in place)");
}
