// flowkern._C: fused per-sequence reward shaping and GRPO advantages (DESIGN.md §1).
// Declarations shared by the CUDA launchers (shaping.cu) and the pybind11 bindings (bindings.cpp).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>

namespace flowkern {

// Normalisation codes; the Python side reads them from _C.NORM_CODES.
enum NormCode : int { kNormMinmax = 0, kNormMinmaxBil = 1, kNormMean = 2, kNormNone = 3 };

// Token rewards [B, T] fp32 from scores [B, T] fp32 and an action mask [B, T] bool/uint8.
at::Tensor shape_rewards(const at::Tensor& scores, const at::Tensor& action_mask, int64_t norm,
                         double threshold, int64_t topk, double coef, bool use_smem);

// Advantages [B, T] fp32: group-normalised outcome [B] plus the γ-discounted reward-to-go.
at::Tensor shape_advantages(const at::Tensor& outcome, const at::Tensor& token_rewards,
                            const at::Tensor& action_mask, int64_t group_size, double gamma);

// Both in one launch: (token rewards, advantages).
std::tuple<at::Tensor, at::Tensor> shape_rewards_and_advantages(
    const at::Tensor& scores, const at::Tensor& action_mask, const at::Tensor& outcome, int64_t norm,
    double threshold, int64_t topk, double coef, int64_t group_size, double gamma, bool use_smem);

// "" when the kernels have a binary for CUDA device `device`, else why not.
std::string kernel_unavailable_reason(int64_t device);

// The largest T whose row is staged in shared memory on `device` (longer rows use the output as scratch).
int64_t max_smem_row(int64_t device);

}  // namespace flowkern
