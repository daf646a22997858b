// Host-side wrappers of the DiffFlow step ops, shared by the CPU and the CUDA libraries.
//
// They check the arguments (every error names the argument), view every state-shaped tensor as a
// contiguous (B, D) matrix (D = product of the non-batch dims; non-contiguous or expanded inputs
// are copied by .contiguous()), allocate the outputs (contiguous, the shape of the state) and hand
// raw pointers to a Launcher (CpuLauncher in csrc/cpu, CudaLauncher in csrc/cuda) which runs one
// pass over memory with the element math of math.h.
//
// Launcher interface:
//   struct Guard { explicit Guard(const at::Tensor&); };     // device guard
//   static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions&);  // state-shaped outputs
//   template <typename scalar_t, typename Op>
//   static void run(const Op&, int64_t B, int64_t D,
//                   const std::array<const scalar_t*, Op::NIN>& in,    // null = read as zeros
//                   const std::array<scalar_t*, Op::NOUT>& out,                // null = not written
//                   const std::array<at::Tensor, Op::NRED>& red);      // (B,) sums; undefined = skip
//
// The schemas live in Python (diffflow_ext/ops/_library.py); these functions must match them.
#pragma once

#include <array>
#include <optional>
#include <tuple>
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "diffflow_ext/math.h"
#include "diffflow_ext/ops.h"

namespace diffflow_ext {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;

inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_state(const char* name, const Tensor& x) {
  TORCH_CHECK(x.defined(), name, ": expected a tensor, got None");
  TORCH_CHECK(x.dim() >= 1 && x.size(0) >= 1, name, ": expected a tensor of shape (B, ...) with B >= 1, got shape ",
              x.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, name,
              ": expected a floating dtype (float16, bfloat16, float32 or float64), got ", t);
}

inline void check_like(const char* name, const Tensor& t, const Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), name, ": expected shape ", ref.sizes(), " (the shape of ", ref_name,
              "), got ", t.sizes());
  TORCH_CHECK(t.device() == ref.device(), name, ": expected device ", ref.device(), " (the device of ", ref_name,
              "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(), " (the dtype of ",
              ref_name, "), got ", t.scalar_type());
}

// A per-sample (B,) tensor in the accumulation dtype of x, on x's device (any stride).
inline void check_row(const char* name, const Tensor& v, const Tensor& x) {
  const int64_t B = x.size(0);
  TORCH_CHECK(v.dim() == 1 && v.size(0) == B, name, ": expected a per-sample tensor of shape (", B, ",), got shape ",
              v.sizes());
  TORCH_CHECK(v.device() == x.device(), name, ": expected device ", x.device(), " (the device of the state), got ",
              v.device());
  TORCH_CHECK(v.scalar_type() == acc_dtype(x.scalar_type()), name, ": expected dtype ", acc_dtype(x.scalar_type()),
              " (the accumulation dtype of a ", x.scalar_type(), " state), got ", v.scalar_type());
}

inline Tensor flat(const Tensor& t, int64_t B, int64_t D) { return t.contiguous().view({B, D}); }
inline Tensor flat(const OptTensor& t, int64_t B, int64_t D) {
  return (t.has_value() && t->defined()) ? flat(*t, B, D) : Tensor();
}
inline bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

template <typename T>
inline const T* cptr(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}
template <typename T>
inline T* mptr(const Tensor& t) {
  return t.mutable_data_ptr<T>();
}
template <typename A>
inline math::RowParam<A> rowp(const Tensor& v) {
  if (!v.defined()) return {};
  return {v.const_data_ptr<A>(), v.stride(0)};
}

inline Tensor row_out(const Tensor& x, bool wanted = true) {
  return at::empty({wanted ? x.size(0) : 0}, x.options().dtype(acc_dtype(x.scalar_type())));
}

// A state-shaped output (contiguous), allocated by the launcher (the CPU one backs large outputs with
// transparent huge pages).
template <typename L>
inline Tensor state_out(const Tensor& x) {
  return L::empty(x.sizes(), x.options());
}
// An elementwise gradient output: the state's shape when wanted, else an empty (0,) tensor (not written).
template <typename L>
inline Tensor grad_out_like(const Tensor& x, bool wanted) {
  return wanted ? state_out<L>(x) : at::empty({0}, x.options());
}
template <typename T>
inline T* optr(const Tensor& t, bool wanted) {
  return wanted ? t.mutable_data_ptr<T>() : nullptr;
}

#define DIFFFLOW_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

template <typename L>
struct Ops {
  static Tensor em_step(const Tensor& x, const Tensor& drift, const Tensor& noise, const Tensor& dt, const Tensor& g) {
    check_state("x", x);
    check_like("drift", drift, x, "x");
    check_like("noise", noise, x, "x");
    check_row("dt", dt, x);
    check_row("g", g, x);
    typename L::Guard guard(x);
    const int64_t B = x.size(0), D = x.numel() / B;
    auto xc = flat(x, B, D), fc = flat(drift, B, D), nc = flat(noise, B, D);
    auto out = state_out<L>(x);
    DIFFFLOW_DISPATCH(x.scalar_type(), "diffflow_ext::em_step", [&] {
      using A = at::opmath_type<scalar_t>;
      math::EmStepFwd<A> op{rowp<A>(dt), rowp<A>(g)};
      L::template run<scalar_t>(op, B, D, {cptr<scalar_t>(xc), cptr<scalar_t>(fc), cptr<scalar_t>(nc)},
                                {mptr<scalar_t>(out)}, {});
    });
    return out;
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor> em_step_backward(const Tensor& grad_out, const OptTensor& drift,
                                                                     const OptTensor& noise, const Tensor& dt,
                                                                     const Tensor& g, bool dt_g_grad,
                                                                     std::array<bool, 2> mask) {
    check_state("grad_out", grad_out);
    if (present(drift)) check_like("drift", *drift, grad_out, "grad_out");
    if (present(noise)) check_like("noise", *noise, grad_out, "grad_out");
    TORCH_CHECK(!dt_g_grad || (present(drift) && present(noise)),
                "em_step_backward: drift and noise are required when dt_g_grad is true");
    check_row("dt", dt, grad_out);
    check_row("g", g, grad_out);
    typename L::Guard guard(grad_out);
    const int64_t B = grad_out.size(0), D = grad_out.numel() / B;
    auto go = flat(grad_out, B, D);
    auto fc = dt_g_grad ? flat(drift, B, D) : Tensor();
    auto nc = dt_g_grad ? flat(noise, B, D) : Tensor();
    auto g_drift = grad_out_like<L>(grad_out, mask[0]), g_noise = grad_out_like<L>(grad_out, mask[1]);
    auto g_dt = row_out(grad_out, dt_g_grad), g_g = row_out(grad_out, dt_g_grad);
    DIFFFLOW_DISPATCH(grad_out.scalar_type(), "diffflow_ext::em_step_backward", [&] {
      using A = at::opmath_type<scalar_t>;
      math::EmStepBwd<A> op{rowp<A>(dt), rowp<A>(g)};
      L::template run<scalar_t>(op, B, D, {cptr<scalar_t>(go), cptr<scalar_t>(fc), cptr<scalar_t>(nc)},
                                {optr<scalar_t>(g_drift, mask[0]), optr<scalar_t>(g_noise, mask[1])},
                                {dt_g_grad ? g_dt : Tensor(), dt_g_grad ? g_g : Tensor()});
    });
    return {g_drift, g_noise, g_dt, g_g};
  }

  static std::tuple<Tensor, Tensor> backward_noise(const Tensor& x_prev, const Tensor& x_next, const Tensor& drift_next,
                                                   const Tensor& score_next, const Tensor& dt, const Tensor& g) {
    check_state("x_prev", x_prev);
    check_like("x_next", x_next, x_prev, "x_prev");
    check_like("drift_next", drift_next, x_prev, "x_prev");
    check_like("score_next", score_next, x_prev, "x_prev");
    check_row("dt", dt, x_prev);
    check_row("g", g, x_prev);
    typename L::Guard guard(x_prev);
    const int64_t B = x_prev.size(0), D = x_prev.numel() / B;
    auto xp = flat(x_prev, B, D), xn = flat(x_next, B, D), fc = flat(drift_next, B, D), sc = flat(score_next, B, D);
    auto delta = state_out<L>(x_prev);
    auto hs = row_out(x_prev);
    DIFFFLOW_DISPATCH(x_prev.scalar_type(), "diffflow_ext::backward_noise", [&] {
      using A = at::opmath_type<scalar_t>;
      math::BackwardNoiseFwd<A> op{rowp<A>(dt), rowp<A>(g)};
      L::template run<scalar_t>(
          op, B, D, {cptr<scalar_t>(xp), cptr<scalar_t>(xn), cptr<scalar_t>(fc), cptr<scalar_t>(sc)},
          {mptr<scalar_t>(delta)}, {hs});
    });
    return {delta, hs};
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward_noise_backward(
      const OptTensor& grad_delta, const OptTensor& grad_half_sqnorm, const Tensor& delta,
      const OptTensor& drift_next, const OptTensor& score_next, const Tensor& dt, const Tensor& g, bool dt_g_grad,
      std::array<bool, 4> mask) {
    check_state("delta", delta);
    if (present(grad_delta)) check_like("grad_delta", *grad_delta, delta, "delta");
    if (present(grad_half_sqnorm)) check_row("grad_half_sqnorm", *grad_half_sqnorm, delta);
    if (present(drift_next)) check_like("drift_next", *drift_next, delta, "delta");
    if (present(score_next)) check_like("score_next", *score_next, delta, "delta");
    TORCH_CHECK(!dt_g_grad || (present(drift_next) && present(score_next)),
                "backward_noise_backward: drift_next and score_next are required when dt_g_grad is true");
    check_row("dt", dt, delta);
    check_row("g", g, delta);
    typename L::Guard guard(delta);
    const int64_t B = delta.size(0), D = delta.numel() / B;
    auto gd = flat(grad_delta, B, D), dc = flat(delta, B, D);
    auto fc = dt_g_grad ? flat(drift_next, B, D) : Tensor();
    auto sc = dt_g_grad ? flat(score_next, B, D) : Tensor();
    const Tensor gh = present(grad_half_sqnorm) ? *grad_half_sqnorm : Tensor();
    std::array<Tensor, 4> o;
    for (int i = 0; i < 4; ++i) o[i] = grad_out_like<L>(delta, mask[i]);
    auto g_dt = row_out(delta, dt_g_grad), g_g = row_out(delta, dt_g_grad);
    DIFFFLOW_DISPATCH(delta.scalar_type(), "diffflow_ext::backward_noise_backward", [&] {
      using A = at::opmath_type<scalar_t>;
      math::BackwardNoiseBwd<A> op{rowp<A>(gh), rowp<A>(dt), rowp<A>(g)};
      L::template run<scalar_t>(
          op, B, D, {cptr<scalar_t>(gd), cptr<scalar_t>(dc), cptr<scalar_t>(fc), cptr<scalar_t>(sc)},
          {optr<scalar_t>(o[0], mask[0]), optr<scalar_t>(o[1], mask[1]), optr<scalar_t>(o[2], mask[2]),
           optr<scalar_t>(o[3], mask[3])},
          {dt_g_grad ? g_dt : Tensor(), dt_g_grad ? g_g : Tensor()});
    });
    return {o[0], o[1], o[2], o[3], g_dt, g_g};
  }

  static std::tuple<Tensor, Tensor> flow_step(const Tensor& x_prev, const Tensor& x, const Tensor& drift,
                                              const Tensor& score, const Tensor& noise, const Tensor& dt_prev,
                                              const Tensor& dt, const Tensor& g) {
    check_state("x", x);
    check_like("x_prev", x_prev, x, "x");
    check_like("drift", drift, x, "x");
    check_like("score", score, x, "x");
    check_like("noise", noise, x, "x");
    check_row("dt_prev", dt_prev, x);
    check_row("dt", dt, x);
    check_row("g", g, x);
    typename L::Guard guard(x);
    const int64_t B = x.size(0), D = x.numel() / B;
    auto xp = flat(x_prev, B, D), xc = flat(x, B, D), fc = flat(drift, B, D), sc = flat(score, B, D),
         nc = flat(noise, B, D);
    auto x_next = state_out<L>(x);
    auto hs = row_out(x);
    DIFFFLOW_DISPATCH(x.scalar_type(), "diffflow_ext::flow_step", [&] {
      using A = at::opmath_type<scalar_t>;
      math::FlowStepFwd<A> op{rowp<A>(dt_prev), rowp<A>(dt), rowp<A>(g)};
      L::template run<scalar_t>(op, B, D,
                                {cptr<scalar_t>(xp), cptr<scalar_t>(xc), cptr<scalar_t>(fc), cptr<scalar_t>(sc),
                                 cptr<scalar_t>(nc)},
                                {mptr<scalar_t>(x_next)}, {hs});
    });
    return {x_next, hs};
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> flow_step_backward(
      const OptTensor& grad_x_next, const OptTensor& grad_half_sqnorm, const Tensor& x_prev, const Tensor& x,
      const Tensor& drift, const Tensor& score, const OptTensor& noise, const Tensor& dt_prev, const Tensor& dt,
      const Tensor& g, bool dt_g_grad, std::array<bool, 5> mask) {
    check_state("x", x);
    if (present(grad_x_next)) check_like("grad_x_next", *grad_x_next, x, "x");
    if (present(grad_half_sqnorm)) check_row("grad_half_sqnorm", *grad_half_sqnorm, x);
    check_like("x_prev", x_prev, x, "x");
    check_like("drift", drift, x, "x");
    check_like("score", score, x, "x");
    if (present(noise)) check_like("noise", *noise, x, "x");
    TORCH_CHECK(!dt_g_grad || present(noise), "flow_step_backward: noise is required when dt_g_grad is true");
    check_row("dt_prev", dt_prev, x);
    check_row("dt", dt, x);
    check_row("g", g, x);
    typename L::Guard guard(x);
    const int64_t B = x.size(0), D = x.numel() / B;
    const bool has_gh = present(grad_half_sqnorm), has_go = present(grad_x_next);
    // Only read what the requested cotangents need.
    auto go = has_go ? flat(grad_x_next, B, D) : Tensor();
    auto xp = has_gh ? flat(x_prev, B, D) : Tensor();
    auto xc = has_gh ? flat(x, B, D) : Tensor();
    auto fc = (has_gh || (dt_g_grad && has_go)) ? flat(drift, B, D) : Tensor();
    auto sc = has_gh ? flat(score, B, D) : Tensor();
    auto nc = (dt_g_grad && has_go) ? flat(noise, B, D) : Tensor();
    const Tensor gh = has_gh ? *grad_half_sqnorm : Tensor();
    std::array<Tensor, 5> o;
    for (int i = 0; i < 5; ++i) o[i] = grad_out_like<L>(x, mask[i]);
    auto g_dtp = row_out(x, dt_g_grad), g_dt = row_out(x, dt_g_grad), g_g = row_out(x, dt_g_grad);
    DIFFFLOW_DISPATCH(x.scalar_type(), "diffflow_ext::flow_step_backward", [&] {
      using A = at::opmath_type<scalar_t>;
      math::FlowStepBwd<A> op{rowp<A>(gh), rowp<A>(dt_prev), rowp<A>(dt), rowp<A>(g)};
      L::template run<scalar_t>(op, B, D,
                                {cptr<scalar_t>(go), cptr<scalar_t>(xp), cptr<scalar_t>(xc), cptr<scalar_t>(fc),
                                 cptr<scalar_t>(sc), cptr<scalar_t>(nc)},
                                {optr<scalar_t>(o[0], mask[0]), optr<scalar_t>(o[1], mask[1]),
                                 optr<scalar_t>(o[2], mask[2]), optr<scalar_t>(o[3], mask[3]),
                                 optr<scalar_t>(o[4], mask[4])},
                                {dt_g_grad ? g_dtp : Tensor(), dt_g_grad ? g_dt : Tensor(), dt_g_grad ? g_g : Tensor()});
    });
    return {o[0], o[1], o[2], o[3], o[4], g_dtp, g_dt, g_g};
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor> adjoint_step(const Tensor& x_prev, const Tensor& x,
                                                                 const Tensor& drift, const Tensor& score,
                                                                 const Tensor& weight, const Tensor& adj_next,
                                                                 const Tensor& adj_direct, const Tensor& dt_prev,
                                                                 const Tensor& dt, const Tensor& g) {
    check_state("x", x);
    check_like("x_prev", x_prev, x, "x");
    check_like("drift", drift, x, "x");
    check_like("score", score, x, "x");
    check_row("weight", weight, x);
    check_like("adj_next", adj_next, x, "x");
    check_like("adj_direct", adj_direct, x, "x");
    check_row("dt_prev", dt_prev, x);
    check_row("dt", dt, x);
    check_row("g", g, x);
    typename L::Guard guard(x);
    const int64_t B = x.size(0), D = x.numel() / B;
    auto xp = flat(x_prev, B, D), xc = flat(x, B, D), fc = flat(drift, B, D), sc = flat(score, B, D),
         an = flat(adj_next, B, D), ad = flat(adj_direct, B, D);
    std::array<Tensor, 4> o;
    for (auto& t : o) t = state_out<L>(x);
    DIFFFLOW_DISPATCH(x.scalar_type(), "diffflow_ext::adjoint_step", [&] {
      using A = at::opmath_type<scalar_t>;
      math::AdjointStep<A> op{rowp<A>(weight), rowp<A>(dt_prev), rowp<A>(dt), rowp<A>(g)};
      L::template run<scalar_t>(op, B, D,
                                {cptr<scalar_t>(xp), cptr<scalar_t>(xc), cptr<scalar_t>(fc), cptr<scalar_t>(sc),
                                 cptr<scalar_t>(an), cptr<scalar_t>(ad)},
                                {mptr<scalar_t>(o[0]), mptr<scalar_t>(o[1]), mptr<scalar_t>(o[2]),
                                 mptr<scalar_t>(o[3])},
                                {});
    });
    return {o[0], o[1], o[2], o[3]};
  }
};

// Registers the impls of every op for one dispatch key (each checked against its signature in ops.h).
template <typename L>
void register_impls(torch::Library& m) {
#define DIFFFLOW_IMPL(NAME, ...)                                                                            \
  static_assert(std::is_same_v<decltype(Ops<L>::NAME), sig::NAME>, #NAME ": signature differs from ops.h"); \
  m.impl(#NAME, &Ops<L>::NAME);
  DIFFFLOW_OPS(DIFFFLOW_IMPL)
#undef DIFFFLOW_IMPL
}

}  // namespace diffflow_ext
