// The bf16 linear on an AMX-packed weight (nxcore/csrc/amx_linear.cpp), shared with nxcore::linear
// and nxcore::linear_invariant.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace nxcore {

// x2d [M, K] @ weight.T (+ bias) on the weight's AMX copy (`nxcore::_pack_amx`); nullopt when the
// weight has none, x is not bf16, or M > max_rows (max_rows < 0: any M). Each output element is
// summed in one order whatever M is (batch-invariant).
std::optional<at::Tensor> amx_linear(const at::Tensor& x2d, const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t max_rows);

// Rows up to which nxcore::linear runs amx_linear (`nxcore::_set_amx_rows`).
int64_t amx_linear_rows();

}  // namespace nxcore
