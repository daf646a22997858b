// Direct C++ entry points of the CPU kernels (same arguments and results as the torch.library
// schemas in diffflow_ext/ops/_library.py; dt, g, ... are (B,) tensors in the accumulation dtype;
// output_mask: which elementwise gradients to write, the others come back as empty (0,) tensors).
// Python goes through the dispatcher (torch.ops.diffflow_ext.*); these are for C++ callers and
// csrc/tests, and are exported by the CPU library.
#pragma once

#include <array>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace diffflow_ext {
namespace cpu {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;

Tensor em_step(const Tensor& x, const Tensor& drift, const Tensor& noise, const Tensor& dt, const Tensor& g);
std::tuple<Tensor, Tensor, Tensor, Tensor> em_step_backward(const Tensor& grad_out, const OptTensor& drift,
                                                            const OptTensor& noise, const Tensor& dt, const Tensor& g,
                                                            bool dt_g_grad, std::array<bool, 2> output_mask);
std::tuple<Tensor, Tensor> backward_noise(const Tensor& x_prev, const Tensor& x_next, const Tensor& drift_next,
                                          const Tensor& score_next, const Tensor& dt, const Tensor& g);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward_noise_backward(
    const OptTensor& grad_delta, const OptTensor& grad_half_sqnorm, const Tensor& delta, const OptTensor& drift_next,
    const OptTensor& score_next, const Tensor& dt, const Tensor& g, bool dt_g_grad,
    std::array<bool, 4> output_mask);
std::tuple<Tensor, Tensor> flow_step(const Tensor& x_prev, const Tensor& x, const Tensor& drift, const Tensor& score,
                                     const Tensor& noise, const Tensor& dt_prev, const Tensor& dt, const Tensor& g);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> flow_step_backward(
    const OptTensor& grad_x_next, const OptTensor& grad_half_sqnorm, const Tensor& x_prev, const Tensor& x,
    const Tensor& drift, const Tensor& score, const OptTensor& noise, const Tensor& dt_prev, const Tensor& dt,
    const Tensor& g, bool dt_g_grad, std::array<bool, 5> output_mask);
std::tuple<Tensor, Tensor, Tensor, Tensor> adjoint_step(const Tensor& x_prev, const Tensor& x, const Tensor& drift,
                                                        const Tensor& score, const Tensor& weight,
                                                        const Tensor& adj_next, const Tensor& adj_direct,
                                                        const Tensor& dt_prev, const Tensor& dt, const Tensor& g);

}  // namespace cpu
}  // namespace diffflow_ext
