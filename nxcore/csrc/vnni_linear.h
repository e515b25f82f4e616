// The bf16 linear on a VNNI-packed weight (nxcore/csrc/invariant.cpp), shared with nxcore::linear.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace nxcore {

// x2d [M, K] @ weight.T (+ bias) on the weight's VNNI copy (`nxcore::_pack_invariant`); nullopt
// when the weight has none or x is not bf16 on an AVX512-BF16 CPU. Every output element is summed
// in one order whatever M is (batch-invariant).
std::optional<at::Tensor> vnni_linear(const at::Tensor& x2d, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

}  // namespace nxcore
