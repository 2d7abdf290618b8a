// pybind11 bindings of flowkern._C (built by setup.py through torch.utils.cpp_extension).
#include <torch/extension.h>

#include "shaping.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "flowkern._C: fused per-sequence RLFR reward shaping and GRPO advantages (CUDA). "
      "Inputs must be CUDA tensors: fp32 scores / rewards / outcome and a bool or uint8 action mask.";

  py::dict codes;
  codes["minmax"] = static_cast<int>(flowkern::kNormMinmax);
  codes["minmax-bil"] = static_cast<int>(flowkern::kNormMinmaxBil);
  codes["mean"] = static_cast<int>(flowkern::kNormMean);
  codes["none"] = static_cast<int>(flowkern::kNormNone);
  m.attr("NORM_CODES") = codes;

  m.def("shape_rewards", &flowkern::shape_rewards,
        "Token rewards [B, T] fp32: per-row normalisation over action tokens, threshold, top-k by radix select, "
        "-coef scaling. `norm` is a code of NORM_CODES; `use_smem=False` forces the global-scratch path.",
        py::arg("scores"), py::arg("action_mask"), py::arg("norm"), py::arg("threshold"), py::arg("topk"),
        py::arg("coef"), py::arg("use_smem") = true);
  m.def("shape_advantages", &flowkern::shape_advantages,
        "Advantages [B, T] fp32: group-normalised outcome plus the gamma-discounted reward-to-go over action "
        "tokens; 0 off-action.",
        py::arg("outcome"), py::arg("token_rewards"), py::arg("action_mask"), py::arg("group_size"),
        py::arg("gamma") = 1.0);
  m.def("shape_rewards_and_advantages", &flowkern::shape_rewards_and_advantages,
        "shape_rewards and shape_advantages fused in one launch: returns (token_rewards, advantages).",
        py::arg("scores"), py::arg("action_mask"), py::arg("outcome"), py::arg("norm"), py::arg("threshold"),
        py::arg("topk"), py::arg("coef"), py::arg("group_size"), py::arg("gamma") = 1.0,
        py::arg("use_smem") = true);
  m.def("kernel_unavailable_reason", &flowkern::kernel_unavailable_reason,
        "'' when the kernels can run on CUDA device `device`, else why not.", py::arg("device"));
  m.def("max_smem_row", &flowkern::max_smem_row,
        "Longest row (T) staged in shared memory on CUDA device `device`; longer rows use global scratch.",
        py::arg("device"));
}
