// The one C++ list of the step ops, and their C++ signatures.
//
// DIFFFLOW_OPS(X) expands X(name, signature) for every operator (forward ops and their `*_backward`
// ops); DIFFFLOW_FORWARD_OPS(X) for the forward ops only (the ones with an autograd formula). Everything that
// iterates over the ops in C++ (kernel registration, autograd registration, dispatcher handles, the
// signature checks) expands these lists. The schemas themselves are declared once, in Python
// (SCHEMAS in diffflow_ext/ops/_library.py); `sig::<name>` is the C++ function type that schema maps to,
// and every kernel is statically checked against it.
#pragma once

#include <array>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace diffflow_ext {
namespace sig {
using at::Tensor;
using T = const at::Tensor&;
using O = const std::optional<at::Tensor>&;
}  // namespace sig
}  // namespace diffflow_ext

// X(name, C++ function type of its schema), with T = const Tensor&, O = const optional<Tensor>&.
#define DIFFFLOW_FORWARD_OPS(X)                                                                                 \
  /* (x, drift, noise, dt, g) -> x_next */                                                                      \
  X(em_step, Tensor(T, T, T, T, T))                                                                             \
  /* (x_prev, x_next, drift_next, score_next, dt, g) -> (delta, half_sqnorm) */                                 \
  X(backward_noise, std::tuple<Tensor, Tensor>(T, T, T, T, T, T))                                               \
  /* (x_prev, x, drift, score, noise, dt_prev, dt, g) -> (x_next, half_sqnorm_prev) */                          \
  X(flow_step, std::tuple<Tensor, Tensor>(T, T, T, T, T, T, T, T))                                              \
  /* (x_prev, x, drift, score, weight, adj_next, adj_direct, dt_prev, dt, g)                                    \
     -> (adj_prev_direct, cot_x, cot_drift, cot_score) */                                                       \
  X(adjoint_step, std::tuple<Tensor, Tensor, Tensor, Tensor>(T, T, T, T, T, T, T, T, T, T))

#define DIFFFLOW_BACKWARD_OPS(X)                                                                                \
  /* (grad_out, drift?, noise?, dt, g, dt_g_grad, output_mask) -> (grad_drift, grad_noise, grad_dt, grad_g) */  \
  X(em_step_backward, std::tuple<Tensor, Tensor, Tensor, Tensor>(T, O, O, T, T, bool, std::array<bool, 2>))     \
  /* (grad_delta?, grad_half_sqnorm?, delta, drift_next?, score_next?, dt, g, dt_g_grad, output_mask)           \
     -> (grad_x_prev, grad_x_next, grad_drift_next, grad_score_next, grad_dt, grad_g) */                        \
  X(backward_noise_backward,                                                                                    \
    std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(O, O, T, O, O, T, T, bool, std::array<bool, 4>)) \
  /* (grad_x_next?, grad_half_sqnorm?, x_prev, x, drift, score, noise?, dt_prev, dt, g, dt_g_grad, output_mask) \
     -> (grad_x_prev, grad_x, grad_drift, grad_score, grad_noise, grad_dt_prev, grad_dt, grad_g) */             \
  X(flow_step_backward, std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(             \
                            O, O, T, T, T, T, O, T, T, T, bool, std::array<bool, 5>))

#define DIFFFLOW_OPS(X)   \
  DIFFFLOW_FORWARD_OPS(X) \
  DIFFFLOW_BACKWARD_OPS(X)

namespace diffflow_ext {
namespace sig {
// sig::<name>: the C++ function type of op <name>.
#define DIFFFLOW_DECLARE_SIG(NAME, ...) using NAME = __VA_ARGS__;
DIFFFLOW_OPS(DIFFFLOW_DECLARE_SIG)
#undef DIFFFLOW_DECLARE_SIG
}  // namespace sig
}  // namespace diffflow_ext
