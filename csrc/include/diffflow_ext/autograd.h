// The autograd of the compiled step ops, in C++ (a torch::autograd::Function per differentiable op),
// registered for the backend's autograd key (AutogradCPU / AutogradCUDA) by the library that registers
// the kernels. A kernel registered directly for AutogradCPU/AutogradCUDA takes precedence over the
// Python `register_autograd` formula (diffflow_ext/ops/_library.py, registered for the Autograd alias
// key), which stays the path of the Triton namespace and of any kernel registered without this file.
// The formulas are the same: each op saves what its `*_backward` op needs and calls it once, asking
// only for the gradients the autograd task needs (`needs_input_grad`, the `output_mask`); the per-sample
// dt/g gradient sums only when dt or g requires grad. This removes the Python autograd.Function of the
// register_autograd path (tens of microseconds per op and per backward).
//
// Calls without any input requiring grad (or under no_grad) go straight to the kernel.
#pragma once

#include <array>
#include <optional>
#include <tuple>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "diffflow_ext/ops.h"

namespace diffflow_ext {
namespace autograd {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

// Typed dispatcher handles of `diffflow_ext::<name>`, looked up on first use (the schemas are defined by
// diffflow_ext/ops/_library.py before any kernel library is loaded).
struct Handles {
#define DIFFFLOW_HANDLE(NAME, ...)                                                                        \
  static const c10::TypedOperatorHandle<sig::NAME>& NAME() {                                           \
    static const auto handle =                                                                         \
        c10::Dispatcher::singleton().findSchemaOrThrow("diffflow_ext::" #NAME, "").typed<sig::NAME>(); \
    return handle;                                                                                     \
  }
  DIFFFLOW_OPS(DIFFFLOW_HANDLE)
#undef DIFFFLOW_HANDLE
};

inline bool any_requires_grad(std::initializer_list<const Tensor*> ts) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor* t : ts) {
    if (t->requires_grad()) return true;
  }
  return false;
}

inline Tensor if_needed(bool wanted, const Tensor& t) { return wanted ? t : Tensor(); }
inline OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); }

// em_step(x, drift, noise, dt, g) -> x_next
struct EmStepFn : torch::autograd::Function<EmStepFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& drift, const Tensor& noise,
                        const Tensor& dt, const Tensor& g) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->set_materialize_grads(false);
    const bool dt_g_grad = dt.requires_grad() || g.requires_grad();
    ctx->save_for_backward({if_needed(dt_g_grad, drift), if_needed(dt_g_grad, noise), dt, g});
    return Handles::em_step().call(x, drift, noise, dt, g);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& grad_out = grads[0];
    if (!grad_out.defined()) return variable_list(5);
    const auto saved = ctx->get_saved_variables();
    const bool dt_g_grad = ctx->needs_input_grad(3) || ctx->needs_input_grad(4);
    const std::array<bool, 2> mask{ctx->needs_input_grad(1), ctx->needs_input_grad(2)};
    auto [g_drift, g_noise, g_dt, g_g] = Handles::em_step_backward().call(grad_out, opt(saved[0]), opt(saved[1]),
                                                                          saved[2], saved[3], dt_g_grad, mask);
    return {if_needed(ctx->needs_input_grad(0), grad_out), if_needed(mask[0], g_drift), if_needed(mask[1], g_noise),
            if_needed(ctx->needs_input_grad(3), g_dt), if_needed(ctx->needs_input_grad(4), g_g)};
  }
};

// backward_noise(x_prev, x_next, drift_next, score_next, dt, g) -> (delta, half_sqnorm)
struct BackwardNoiseFn : torch::autograd::Function<BackwardNoiseFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x_prev, const Tensor& x_next,
                               const Tensor& drift_next, const Tensor& score_next, const Tensor& dt,
                               const Tensor& g) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->set_materialize_grads(false);
    const bool dt_g_grad = dt.requires_grad() || g.requires_grad();
    auto [delta, half_sqnorm] = Handles::backward_noise().call(x_prev, x_next, drift_next, score_next, dt, g);
    ctx->save_for_backward({delta, if_needed(dt_g_grad, drift_next), if_needed(dt_g_grad, score_next), dt, g});
    return {delta, half_sqnorm};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined() && !grads[1].defined()) return variable_list(6);
    const auto saved = ctx->get_saved_variables();
    const bool dt_g_grad = ctx->needs_input_grad(4) || ctx->needs_input_grad(5);
    const std::array<bool, 4> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2),
                                   ctx->needs_input_grad(3)};
    auto outs = Handles::backward_noise_backward().call(opt(grads[0]), opt(grads[1]), saved[0], opt(saved[1]),
                                                        opt(saved[2]), saved[3], saved[4], dt_g_grad, mask);
    return {if_needed(mask[0], std::get<0>(outs)), if_needed(mask[1], std::get<1>(outs)),
            if_needed(mask[2], std::get<2>(outs)), if_needed(mask[3], std::get<3>(outs)),
            if_needed(ctx->needs_input_grad(4), std::get<4>(outs)),
            if_needed(ctx->needs_input_grad(5), std::get<5>(outs))};
  }
};

// flow_step(x_prev, x, drift, score, noise, dt_prev, dt, g) -> (x_next, half_sqnorm_prev)
struct FlowStepFn : torch::autograd::Function<FlowStepFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x_prev, const Tensor& x, const Tensor& drift,
                               const Tensor& score, const Tensor& noise, const Tensor& dt_prev, const Tensor& dt,
                               const Tensor& g) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->set_materialize_grads(false);
    const bool dt_g_grad = dt_prev.requires_grad() || dt.requires_grad() || g.requires_grad();
    ctx->save_for_backward({x_prev, x, drift, score, if_needed(dt_g_grad, noise), dt_prev, dt, g});
    auto [x_next, half_sqnorm] = Handles::flow_step().call(x_prev, x, drift, score, noise, dt_prev, dt, g);
    return {x_next, half_sqnorm};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined() && !grads[1].defined()) return variable_list(8);
    const auto saved = ctx->get_saved_variables();
    const bool dt_g_grad = ctx->needs_input_grad(5) || ctx->needs_input_grad(6) || ctx->needs_input_grad(7);
    std::array<bool, 5> mask{};
    for (size_t i = 0; i < mask.size(); ++i) mask[i] = ctx->needs_input_grad(i);
    auto outs = Handles::flow_step_backward().call(opt(grads[0]), opt(grads[1]), saved[0], saved[1], saved[2],
                                                   saved[3], opt(saved[4]), saved[5], saved[6], saved[7], dt_g_grad,
                                                   mask);
    return {if_needed(mask[0], std::get<0>(outs)), if_needed(mask[1], std::get<1>(outs)),
            if_needed(mask[2], std::get<2>(outs)), if_needed(mask[3], std::get<3>(outs)),
            if_needed(mask[4], std::get<4>(outs)), if_needed(ctx->needs_input_grad(5), std::get<5>(outs)),
            if_needed(ctx->needs_input_grad(6), std::get<6>(outs)),
            if_needed(ctx->needs_input_grad(7), std::get<7>(outs))};
  }
};

// adjoint_step is itself a backward pass: outputs that depend on inputs requiring grad get a node whose
// backward raises (as the Python formula does).
struct AdjointStepFn : torch::autograd::Function<AdjointStepFn> {
  static variable_list forward(AutogradContext*, const Tensor& x_prev, const Tensor& x, const Tensor& drift,
                               const Tensor& score, const Tensor& weight, const Tensor& adj_next,
                               const Tensor& adj_direct, const Tensor& dt_prev, const Tensor& dt, const Tensor& g) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [a, b, c, d] =
        Handles::adjoint_step().call(x_prev, x, drift, score, weight, adj_next, adj_direct, dt_prev, dt, g);
    return {a, b, c, d};
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false,
                "diffflow_ext::adjoint_step is not differentiable: it is itself the backward pass (the VJP of "
                "flow_step) of the stochastic adjoint. Differentiate through flow_step / backward_noise instead.");
  }
};

// The autograd kernels (signatures of the schemas).
struct Kernels {
  static Tensor em_step(const Tensor& x, const Tensor& drift, const Tensor& noise, const Tensor& dt,
                        const Tensor& g) {
    if (!any_requires_grad({&x, &drift, &noise, &dt, &g})) {
      at::AutoDispatchBelowADInplaceOrView below;
      return Handles::em_step().call(x, drift, noise, dt, g);
    }
    return EmStepFn::apply(x, drift, noise, dt, g);
  }
  static std::tuple<Tensor, Tensor> backward_noise(const Tensor& x_prev, const Tensor& x_next,
                                                   const Tensor& drift_next, const Tensor& score_next,
                                                   const Tensor& dt, const Tensor& g) {
    if (!any_requires_grad({&x_prev, &x_next, &drift_next, &score_next, &dt, &g})) {
      at::AutoDispatchBelowADInplaceOrView below;
      return Handles::backward_noise().call(x_prev, x_next, drift_next, score_next, dt, g);
    }
    auto outs = BackwardNoiseFn::apply(x_prev, x_next, drift_next, score_next, dt, g);
    return {outs[0], outs[1]};
  }
  static std::tuple<Tensor, Tensor> flow_step(const Tensor& x_prev, const Tensor& x, const Tensor& drift,
                                              const Tensor& score, const Tensor& noise, const Tensor& dt_prev,
                                              const Tensor& dt, const Tensor& g) {
    if (!any_requires_grad({&x_prev, &x, &drift, &score, &noise, &dt_prev, &dt, &g})) {
      at::AutoDispatchBelowADInplaceOrView below;
      return Handles::flow_step().call(x_prev, x, drift, score, noise, dt_prev, dt, g);
    }
    auto outs = FlowStepFn::apply(x_prev, x, drift, score, noise, dt_prev, dt, g);
    return {outs[0], outs[1]};
  }
  static std::tuple<Tensor, Tensor, Tensor, Tensor> adjoint_step(const Tensor& x_prev, const Tensor& x,
                                                                 const Tensor& drift, const Tensor& score,
                                                                 const Tensor& weight, const Tensor& adj_next,
                                                                 const Tensor& adj_direct, const Tensor& dt_prev,
                                                                 const Tensor& dt, const Tensor& g) {
    if (!any_requires_grad({&x_prev, &x, &drift, &score, &weight, &adj_next, &adj_direct, &dt_prev, &dt, &g})) {
      at::AutoDispatchBelowADInplaceOrView below;
      return Handles::adjoint_step().call(x_prev, x, drift, score, weight, adj_next, adj_direct, dt_prev, dt, g);
    }
    auto outs = AdjointStepFn::apply(x_prev, x, drift, score, weight, adj_next, adj_direct, dt_prev, dt, g);
    return {outs[0], outs[1], outs[2], outs[3]};
  }
};

// Registers the autograd kernel of every differentiable (forward) op, on a Library for an Autograd<Backend> key.
inline void register_autograd(torch::Library& m) {
#define DIFFFLOW_IMPL_AUTOGRAD(NAME, ...)                                                             \
  static_assert(std::is_same_v<decltype(Kernels::NAME), sig::NAME>, #NAME ": signature differs from ops.h"); \
  m.impl(#NAME, &Kernels::NAME);
  DIFFFLOW_FORWARD_OPS(DIFFFLOW_IMPL_AUTOGRAD)
#undef DIFFFLOW_IMPL_AUTOGRAD
}

}  // namespace autograd
}  // namespace diffflow_ext
