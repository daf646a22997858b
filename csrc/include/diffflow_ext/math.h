// The per-element math of the DiffFlow step kernels, shared by the C++ CPU and the CUDA kernels.
//
// It mirrors diffflow_ext/ops/reference.py (THE math); the Triton kernels in
// diffflow_ext/ops/triton_kernels.py are built from the same helpers, as @triton.jit functions.
//
// Each formula is written once, below, as a small host+device helper templated on T, which is either
// the accumulation type A (CUDA, scalar CPU tails) or at::vec::Vectorized<A> (CPU):
//
//   Euler-Maruyama step   y = x + f dt + g sqrt(dt) n                          em_step
//     VJP (cotangent go)  dy/dx = 1, dy/df = dt, dy/dn = g sqrt(dt)            em_step_vjp_state
//                         dy/ddt = f + g n / (2 sqrt dt), dy/dg = sqrt(dt) n   em_step_vjp_coef
//   backward noise        delta = (xp - xn + (f - g^2 s) dt) / (g sqrt dt)     delta
//     VJP (cotangent G)   ddelta/dxp = 1/(g sqrt dt) = -ddelta/dxn,            delta_vjp_state
//                         ddelta/df = sqrt(dt)/g, ddelta/ds = -g sqrt(dt)
//                         ddelta/ddt = -delta/(2 dt) + (f/g - g s)/sqrt(dt)    delta_vjp_coef
//                         ddelta/dg  = -delta/g - 2 s sqrt(dt)
//   half squared norm     0.5 delta^2 per element, summed per row by the drivers; its cotangent on
//                         delta is G = grad_delta + grad_half_sqnorm * delta.
//
// The per-sample constants of each formula (EmCoef, NoiseCoef) are computed once per row from dt and g.
// Every kernel functor below only wires these helpers together:
//   * NIN / NOUT / NRED: number of elementwise inputs, elementwise outputs and per-row sums;
//   * row(b): the per-sample constants of row b (dt, g, ... are (B,) tensors with a stride, stride 0
//     for an expanded scalar), computed once per row in the accumulation type A;
//   * elem(row, in, out, red): the element math; `red[k]` is the element's contribution to the k-th
//     per-row sum (the driver accumulates it in A).
// Inputs that are absent (optional gradients, tensors not needed for the requested gradients) are
// passed as null pointers and read as zeros by the drivers.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include <c10/macros/Macros.h>

namespace diffflow_ext {
namespace math {

template <typename A>
C10_HOST_DEVICE inline A sqrt_(A v) {
  if constexpr (std::is_same_v<A, float>) {
    return ::sqrtf(v);
  } else {
    return ::sqrt(v);
  }
}

// A (B,) per-sample parameter: pointer + element stride (0 for an expanded scalar); null reads 0.
template <typename A>
struct RowParam {
  const A* p = nullptr;
  int64_t stride = 0;
  C10_HOST_DEVICE A operator()(int64_t b) const { return p ? p[b * stride] : A(0); }
};

// ------------------------------------------------------------------------------------------------
// The formulas.

// Per-sample constants of the Euler-Maruyama step with step dt and diffusion g.
template <typename A>
struct EmCoef {
  A dt, g_sdt, half_g_over_sdt, sdt;  // dt, g sqrt(dt), g / (2 sqrt dt), sqrt(dt)
  C10_HOST_DEVICE static EmCoef make(A dt, A g) {
    const A s = sqrt_(dt);
    return {dt, g * s, g / (A(2) * s), s};
  }
};

template <typename A, typename T>
C10_HOST_DEVICE inline T em_step(const EmCoef<A>& k, T x, T f, T n) {
  return x + f * T(k.dt) + T(k.g_sdt) * n;
}

// Cotangents of (drift, noise) from the cotangent go of the step's output (that of x is go itself).
template <typename T>
struct EmStateVjp {
  T drift, noise;
};
template <typename A, typename T>
C10_HOST_DEVICE inline EmStateVjp<T> em_step_vjp_state(const EmCoef<A>& k, T go) {
  return {go * T(k.dt), go * T(k.g_sdt)};
}

// Per-element contributions to the cotangents of (dt, g).
template <typename T>
struct CoefVjp {
  T dt, g;
};
template <typename A, typename T>
C10_HOST_DEVICE inline CoefVjp<T> em_step_vjp_coef(const EmCoef<A>& k, T go, T f, T n) {
  return {go * (f + n * T(k.half_g_over_sdt)), go * n * T(k.sdt)};
}

// Per-sample constants of the backward noise of a transition with step dt and diffusion g.
template <typename A>
struct NoiseCoef {
  A dt, g, g2, inv, neg_inv, sdt_over_g, neg_g_sdt, inv_g, neg_inv_g, inv_sdt, inv_2dt, neg_2sdt;
  C10_HOST_DEVICE static NoiseCoef make(A dt, A g) {
    // (fields a kernel does not read are dropped by the compiler once row() and elem() are inlined)
    const A s = sqrt_(dt), inv = A(1) / (g * s), inv_g = A(1) / g;
    return {dt, g, g * g, inv, -inv, s * inv_g, -g * s, inv_g, -inv_g, A(1) / s, A(0.5) / dt, A(-2) * s};
  }
};

template <typename A, typename T>
C10_HOST_DEVICE inline T delta(const NoiseCoef<A>& k, T x_prev, T x_next, T f, T s) {
  return (x_prev - x_next + (f - T(k.g2) * s) * T(k.dt)) * T(k.inv);
}

template <typename T>
C10_HOST_DEVICE inline T half_square(T d) {
  return T(0.5) * d * d;
}

// Cotangents of (x_prev, x_next, drift, score) from the cotangent G of delta.
template <typename T>
struct DeltaStateVjp {
  T x_prev, x_next, drift, score;
};
template <typename A, typename T>
C10_HOST_DEVICE inline DeltaStateVjp<T> delta_vjp_state(const NoiseCoef<A>& k, T G) {
  return {G * T(k.inv), G * T(k.neg_inv), G * T(k.sdt_over_g), G * T(k.neg_g_sdt)};
}

template <typename A, typename T>
C10_HOST_DEVICE inline CoefVjp<T> delta_vjp_coef(const NoiseCoef<A>& k, T G, T d, T f, T s) {
  return {G * ((f * T(k.inv_g) - T(k.g) * s) * T(k.inv_sdt) - d * T(k.inv_2dt)),
          G * (d * T(k.neg_inv_g) + s * T(k.neg_2sdt))};
}

// ------------------------------------------------------------------------------------------------
// The kernel functors (one per op and direction), built from the formulas above.

// out = em_step(x, drift, noise)          in: x, drift, noise
template <typename A>
struct EmStepFwd {
  static constexpr int NIN = 3, NOUT = 1, NRED = 0;
  RowParam<A> dt, g;
  using Row = EmCoef<A>;
  C10_HOST_DEVICE Row row(int64_t b) const { return Row::make(dt(b), g(b)); }
  template <typename T>
  C10_HOST_DEVICE void elem(const Row& r, const T* in, T* out, T* /*red*/) const {
    out[0] = em_step(r, in[0], in[1], in[2]);
  }
};

// in: grad_out, drift?, noise?   out: grad_drift, grad_noise   red: grad_dt, grad_g
// (grad_x is grad_out itself and is not computed here)
template <typename A>
struct EmStepBwd {
  static constexpr int NIN = 3, NOUT = 2, NRED = 2;
  RowParam<A> dt, g;
  using Row = EmCoef<A>;
  C10_HOST_DEVICE Row row(int64_t b) const { return Row::make(dt(b), g(b)); }
  template <typename T>
  C10_HOST_DEVICE void elem(const Row& r, const T* in, T* out, T* red) const {
    const auto v = em_step_vjp_state(r, in[0]);
    const auto c = em_step_vjp_coef(r, in[0], in[1], in[2]);
    out[0] = v.drift;
    out[1] = v.noise;
    red[0] = c.dt;
    red[1] = c.g;
  }
};

// in: x_prev, x_next, drift_next, score_next   out: delta   red: half_sqnorm
template <typename A>
struct BackwardNoiseFwd {
  static constexpr int NIN = 4, NOUT = 1, NRED = 1;
  RowParam<A> dt, g;
  using Row = NoiseCoef<A>;
  C10_HOST_DEVICE Row row(int64_t b) const { return Row::make(dt(b), g(b)); }
  template <typename T>
  C10_HOST_DEVICE void elem(const Row& r, const T* in, T* out, T* red) const {
    const T d = delta(r, in[0], in[1], in[2], in[3]);
    out[0] = d;
    red[0] = half_square(d);
  }
};

// in: grad_delta?, delta, drift_next?, score_next?  (row: grad_half_sqnorm?)
// out: grad_x_prev, grad_x_next, grad_drift_next, grad_score_next   red: grad_dt, grad_g
template <typename A>
struct BackwardNoiseBwd {
  static constexpr int NIN = 4, NOUT = 4, NRED = 2;
  RowParam<A> grad_half_sqnorm, dt, g;
  struct Row {
    A grad_half_sqnorm;
    NoiseCoef<A> noise;
  };
  C10_HOST_DEVICE Row row(int64_t b) const { return {grad_half_sqnorm(b), NoiseCoef<A>::make(dt(b), g(b))}; }
  template <typename T>
  C10_HOST_DEVICE void elem(const Row& r, const T* in, T* out, T* red) const {
    const T d = in[1];
    const T G = in[0] + T(r.grad_half_sqnorm) * d;
    const auto v = delta_vjp_state(r.noise, G);
    const auto c = delta_vjp_coef(r.noise, G, d, in[2], in[3]);
    out[0] = v.x_prev;
    out[1] = v.x_next;
    out[2] = v.drift;
    out[3] = v.score;
    red[0] = c.dt;
    red[1] = c.g;
  }
};

// One state of the forward walk: the EM step from x (dt, g) and the backward noise of the transition
// x_prev -> x (dt_prev, the same g).
template <typename A>
struct WalkRow {
  EmCoef<A> em;
  NoiseCoef<A> prev;
  C10_HOST_DEVICE static WalkRow make(A dt_prev, A dt, A g) {
    return {EmCoef<A>::make(dt, g), NoiseCoef<A>::make(dt_prev, g)};
  }
};

// in: x_prev, x, drift, score, noise   out: x_next   red: half_sqnorm_prev
template <typename A>
struct FlowStepFwd {
  static constexpr int NIN = 5, NOUT = 1, NRED = 1;
  RowParam<A> dt_prev, dt, g;
  using Row = WalkRow<A>;
  C10_HOST_DEVICE Row row(int64_t b) const { return Row::make(dt_prev(b), dt(b), g(b)); }
  template <typename T>
  C10_HOST_DEVICE void elem(const Row& r, const T* in, T* out, T* red) const {
    const T xp = in[0], x = in[1], f = in[2], s = in[3], n = in[4];
    out[0] = em_step(r.em, x, f, n);
    red[0] = half_square(delta(r.prev, xp, x, f, s));
  }
};

// in: grad_x_next?, x_prev?, x?, drift?, score?, noise?   (row: grad_half_sqnorm?)
// out: grad_x_prev, grad_x, grad_drift, grad_score, grad_noise   red: grad_dt_prev, grad_dt, grad_g
template <typename A>
struct FlowStepBwd {
  static constexpr int NIN = 6, NOUT = 5, NRED = 3;
  RowParam<A> grad_half_sqnorm, dt_prev, dt, g;
  struct Row {
    A grad_half_sqnorm;
    WalkRow<A> walk;
  };
  C10_HOST_DEVICE Row row(int64_t b) const { return {grad_half_sqnorm(b), WalkRow<A>::make(dt_prev(b), dt(b), g(b))}; }
  template <typename T>
  C10_HOST_DEVICE void elem(const Row& r, const T* in, T* out, T* red) const {
    const T go = in[0], xp = in[1], x = in[2], f = in[3], s = in[4], n = in[5];
    const T d = delta(r.walk.prev, xp, x, f, s);
    const T G = T(r.grad_half_sqnorm) * d;
    const auto dv = delta_vjp_state(r.walk.prev, G);
    const auto dc = delta_vjp_coef(r.walk.prev, G, d, f, s);
    const auto ev = em_step_vjp_state(r.walk.em, go);
    const auto ec = em_step_vjp_coef(r.walk.em, go, f, n);
    out[0] = dv.x_prev;
    out[1] = go + dv.x_next;
    out[2] = ev.drift + dv.drift;
    out[3] = dv.score;
    out[4] = ev.noise;
    red[0] = dc.dt;
    red[1] = ec.dt;
    red[2] = ec.g + dc.g;
  }
};

// The VJP of flow_step for the state-shaped inputs, with cotangent adj_next on x_next and weight on the
// half squared norm, plus the cotangent adj_direct already collected on x.
// in: x_prev, x, drift, score, adj_next, adj_direct   (row: weight)
// out: adj_prev_direct, cot_x, cot_drift, cot_score
template <typename A>
struct AdjointStep {
  static constexpr int NIN = 6, NOUT = 4, NRED = 0;
  RowParam<A> weight, dt_prev, dt, g;
  struct Row {
    A weight;
    WalkRow<A> walk;
  };
  C10_HOST_DEVICE Row row(int64_t b) const { return {weight(b), WalkRow<A>::make(dt_prev(b), dt(b), g(b))}; }
  template <typename T>
  C10_HOST_DEVICE void elem(const Row& r, const T* in, T* out, T* /*red*/) const {
    const T xp = in[0], x = in[1], f = in[2], s = in[3], adj_next = in[4], adj_direct = in[5];
    const T G = T(r.weight) * delta(r.walk.prev, xp, x, f, s);
    const auto dv = delta_vjp_state(r.walk.prev, G);
    const auto ev = em_step_vjp_state(r.walk.em, adj_next);
    out[0] = dv.x_prev;
    out[1] = adj_direct + adj_next + dv.x_next;
    out[2] = ev.drift + dv.drift;
    out[3] = dv.score;
  }
};

}  // namespace math
}  // namespace diffflow_ext
