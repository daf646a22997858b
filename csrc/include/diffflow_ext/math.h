// The per-element math of the DiffFlow step kernels, shared by the C++ CPU and the CUDA kernels.
//
// It mirrors diffflow_ext/ops/reference.py (THE math); the Triton kernels in
// diffflow_ext/ops/triton_kernels.py implement the same formulas.
//
// Every op is a small struct:
//   * NIN / NOUT / NRED: number of elementwise inputs, elementwise outputs and per-row sums;
//   * row(b): the per-sample constants of row b (dt, g, ... are (B,) tensors with a stride,
//     stride 0 for an expanded scalar), computed once per row in the accumulation type A;
//   * elem(row, in, out, red): the element math, templated on T, which is either A (CUDA, scalar
//     CPU tails) or at::vec::Vectorized<A> (CPU), so the formulas are written once. `red[k]` is the
//     element's contribution to the k-th per-row sum (the driver accumulates it in A).
// Inputs that are absent (optional gradients, tensors not needed for the requested gradients)
// are passed as null pointers and read as zeros by the drivers.
//
// Derivatives used by the backward ops (per sample, c = g*sqrt(dt)):
//   em_step:        y = x + f dt + g sqrt(dt) n
//                   dy/dx = 1, dy/df = dt, dy/dn = c, dy/ddt = f + g n / (2 sqrt dt), dy/dg = sqrt(dt) n
//   backward_noise: delta = (xp - xn + (f - g^2 s) dt) / c
//                   ddelta/dxp = 1/c = -ddelta/dxn, ddelta/df = sqrt(dt)/g, ddelta/ds = -g sqrt(dt)
//                   ddelta/ddt = -delta/(2 dt) + (f/g - g s)/sqrt(dt)
//                   ddelta/dg  = -delta/g - 2 s sqrt(dt)
//   half_sqnorm = 0.5 sum delta^2  =>  cotangent of delta: G = grad_delta + grad_half_sqnorm * delta.
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

// out = x + drift*dt + g*sqrt(dt)*noise          in: x, drift, noise
template <typename A>
struct EmStepFwd {
  static constexpr int NIN = 3, NOUT = 1, NRED = 0;
  RowParam<A> dt, g;
  struct Row {
    A dt, c;
  };
  C10_HOST_DEVICE Row row(int64_t b) const {
    const A d = dt(b);
    return {d, g(b) * sqrt_(d)};
  }
  template <typename T>
  C10_HOST_DEVICE void elem(const Row& r, const T* in, T* out, T* /*red*/) const {
    out[0] = in[0] + in[1] * T(r.dt) + T(r.c) * in[2];
  }
};

// in: grad_out, drift?, noise?   out: grad_drift, grad_noise   red: grad_dt, grad_g
// (grad_x is grad_out itself and is not computed here)
template <typename A>
struct EmStepBwd {
  static constexpr int NIN = 3, NOUT = 2, NRED = 2;
  RowParam<A> dt, g;
  struct Row {
    A dt, c, half_g_over_sdt, sdt;
  };
  C10_HOST_DEVICE Row row(int64_t b) const {
    const A d = dt(b), gg = g(b), s = sqrt_(d);
    return {d, gg * s, gg / (A(2) * s), s};
  }
  template <typename T>
  C10_HOST_DEVICE void elem(const Row& r, const T* in, T* out, T* red) const {
    const T go = in[0], f = in[1], n = in[2];
    out[0] = go * T(r.dt);
    out[1] = go * T(r.c);
    red[0] = go * (f + n * T(r.half_g_over_sdt));
    red[1] = go * n * T(r.sdt);
  }
};

// in: x_prev, x_next, drift_next, score_next   out: delta   red: half_sqnorm
template <typename A>
struct BackwardNoiseFwd {
  static constexpr int NIN = 4, NOUT = 1, NRED = 1;
  RowParam<A> dt, g;
  struct Row {
    A dt, g2, inv;
  };
  C10_HOST_DEVICE Row row(int64_t b) const {
    const A d = dt(b), gg = g(b);
    return {d, gg * gg, A(1) / (gg * sqrt_(d))};
  }
  template <typename T>
  C10_HOST_DEVICE void elem(const Row& r, const T* in, T* out, T* red) const {
    const T delta = (in[0] - in[1] + (in[2] - T(r.g2) * in[3]) * T(r.dt)) * T(r.inv);
    out[0] = delta;
    red[0] = T(A(0.5)) * delta * delta;
  }
};

// in: grad_delta?, delta, drift_next?, score_next?  (row: grad_half_sqnorm?)
// out: grad_x_prev, grad_x_next, grad_drift_next, grad_score_next   red: grad_dt, grad_g
template <typename A>
struct BackwardNoiseBwd {
  static constexpr int NIN = 4, NOUT = 4, NRED = 2;
  RowParam<A> gh, dt, g;
  struct Row {
    A gh, inv, ninv, sdt_over_g, n_g_sdt, inv_2dt, inv_g, n_inv_g, inv_sdt, g, n_2sdt;
  };
  C10_HOST_DEVICE Row row(int64_t b) const {
    const A d = dt(b), gg = g(b), s = sqrt_(d), inv = A(1) / (gg * s);
    return {gh(b), inv, -inv, s / gg, -gg * s, A(1) / (A(2) * d), A(1) / gg, A(-1) / gg, A(1) / s, gg, A(-2) * s};
  }
  template <typename T>
  C10_HOST_DEVICE void elem(const Row& r, const T* in, T* out, T* red) const {
    const T delta = in[1], f = in[2], s = in[3];
    const T G = in[0] + T(r.gh) * delta;
    out[0] = G * T(r.inv);
    out[1] = G * T(r.ninv);
    out[2] = G * T(r.sdt_over_g);
    out[3] = G * T(r.n_g_sdt);
    red[0] = G * ((f * T(r.inv_g) - T(r.g) * s) * T(r.inv_sdt) - delta * T(r.inv_2dt));
    red[1] = G * (delta * T(r.n_inv_g) + s * T(r.n_2sdt));
  }
};

// in: x_prev, x, drift, score, noise   out: x_next   red: half_sqnorm_prev
template <typename A>
struct FlowStepFwd {
  static constexpr int NIN = 5, NOUT = 1, NRED = 1;
  RowParam<A> dt_prev, dt, g;
  struct Row {
    A dt, c, dtp, g2, invp;
  };
  C10_HOST_DEVICE Row row(int64_t b) const {
    const A d = dt(b), dp = dt_prev(b), gg = g(b);
    return {d, gg * sqrt_(d), dp, gg * gg, A(1) / (gg * sqrt_(dp))};
  }
  template <typename T>
  C10_HOST_DEVICE void elem(const Row& r, const T* in, T* out, T* red) const {
    const T xp = in[0], x = in[1], f = in[2], s = in[3], n = in[4];
    out[0] = x + f * T(r.dt) + T(r.c) * n;
    const T delta = (xp - x + (f - T(r.g2) * s) * T(r.dtp)) * T(r.invp);
    red[0] = T(A(0.5)) * delta * delta;
  }
};

// in: grad_x_next?, x_prev?, x?, drift?, score?, noise?   (row: grad_half_sqnorm?)
// out: grad_x_prev, grad_x, grad_drift, grad_score, grad_noise   red: grad_dt_prev, grad_dt, grad_g
template <typename A>
struct FlowStepBwd {
  static constexpr int NIN = 6, NOUT = 5, NRED = 3;
  RowParam<A> gh, dt_prev, dt, g;
  struct Row {
    A gh, dt, c, dtp, g2, invp, ninvp, sdtp_over_g, n_g_sdtp, inv_2dtp, inv_g, n_inv_g, inv_sdtp, g, n_2sdtp,
        half_g_over_sdt, sdt;
  };
  C10_HOST_DEVICE Row row(int64_t b) const {
    const A d = dt(b), dp = dt_prev(b), gg = g(b), s = sqrt_(d), sp = sqrt_(dp), invp = A(1) / (gg * sp);
    return {gh(b),        d,          gg * s,      dp,         gg * gg,     invp,
            -invp,        sp / gg,    -gg * sp,    A(1) / (A(2) * dp),      A(1) / gg,
            A(-1) / gg,   A(1) / sp,  gg,          A(-2) * sp, gg / (A(2) * s), s};
  }
  template <typename T>
  C10_HOST_DEVICE void elem(const Row& r, const T* in, T* out, T* red) const {
    const T go = in[0], xp = in[1], x = in[2], f = in[3], s = in[4], n = in[5];
    const T delta = (xp - x + (f - T(r.g2) * s) * T(r.dtp)) * T(r.invp);
    const T G = T(r.gh) * delta;
    out[0] = G * T(r.invp);
    out[1] = go + G * T(r.ninvp);
    out[2] = go * T(r.dt) + G * T(r.sdtp_over_g);
    out[3] = G * T(r.n_g_sdtp);
    out[4] = go * T(r.c);
    red[0] = G * ((f * T(r.inv_g) - T(r.g) * s) * T(r.inv_sdtp) - delta * T(r.inv_2dtp));
    red[1] = go * (f + n * T(r.half_g_over_sdt));
    red[2] = go * n * T(r.sdt) + G * (delta * T(r.n_inv_g) + s * T(r.n_2sdtp));
  }
};

// in: x_prev, x, drift, score, adj_next, adj_direct   (row: weight)
// out: adj_prev_direct, cot_x, cot_drift, cot_score
template <typename A>
struct AdjointStep {
  static constexpr int NIN = 6, NOUT = 4, NRED = 0;
  RowParam<A> weight, dt_prev, dt, g;
  struct Row {
    A w, dt, dtp, g2, invp, sdtp_over_g, n_g_sdtp;
  };
  C10_HOST_DEVICE Row row(int64_t b) const {
    const A d = dt(b), dp = dt_prev(b), gg = g(b), sp = sqrt_(dp);
    return {weight(b), d, dp, gg * gg, A(1) / (gg * sp), sp / gg, -gg * sp};
  }
  template <typename T>
  C10_HOST_DEVICE void elem(const Row& r, const T* in, T* out, T* /*red*/) const {
    const T xp = in[0], x = in[1], f = in[2], s = in[3], an = in[4], ad = in[5];
    const T delta = (xp - x + (f - T(r.g2) * s) * T(r.dtp)) * T(r.invp);
    const T gd = T(r.w) * delta;
    const T apd = gd * T(r.invp);
    out[0] = apd;
    out[1] = ad + an - apd;
    out[2] = an * T(r.dt) + gd * T(r.sdtp_over_g);
    out[3] = gd * T(r.n_g_sdtp);
  }
};

}  // namespace math
}  // namespace diffflow_ext
