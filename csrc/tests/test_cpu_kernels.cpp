// C++ test of the CPU kernels without Python (CMake: ctest). Calls the kernels directly
// (diffflow_ext::cpu::*, the same code the dispatcher calls) and compares them with the
// reference formulas written in ATen, for awkward shapes, float32 and float64.
#include <cstdio>
#include <string>

#include <ATen/ATen.h>

#include "diffflow_ext/cpu.h"

using at::Tensor;
namespace CpuOps = diffflow_ext::cpu;

static int failures = 0;

static void expect_close(const Tensor& got, const Tensor& want, const std::string& what, double tol) {
  const bool ok = got.sizes() == want.sizes() && got.scalar_type() == want.scalar_type() &&
                  at::allclose(got.to(at::kDouble), want.to(at::kDouble), tol, tol);
  if (!ok) {
    ++failures;
    std::printf("FAIL %s (max abs diff %g)\n", what.c_str(),
                got.sizes() == want.sizes() ? (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>()
                                            : -1.0);
  }
}

static Tensor col(const Tensor& v, const Tensor& x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[0] = v.size(0);
  return v.view(shape);
}

static void check(at::IntArrayRef shape, at::ScalarType dtype) {
  const auto opts = at::TensorOptions().dtype(dtype);
  const auto acc = at::TensorOptions().dtype(dtype == at::kDouble ? at::kDouble : at::kFloat);
  const int64_t B = shape[0];
  const double tol = dtype == at::kDouble ? 1e-10 : 1e-4;
  const std::string tag = std::string(c10::toString(dtype)) + " " + c10::str(shape);
  Tensor xp = at::randn(shape, opts), x = at::randn(shape, opts), f = at::randn(shape, opts),
         s = at::randn(shape, opts), n = at::randn(shape, opts), an = at::randn(shape, opts),
         ad = at::randn(shape, opts);
  Tensor dt = at::rand({B}, acc) + 0.1, dtp = at::rand({B}, acc) + 0.1, g = at::rand({B}, acc) + 0.5,
         w = at::randn({B}, acc);
  Tensor dt_b = col(dt, x), dtp_b = col(dtp, x), g_b = col(g, x), w_b = col(w, x);

  // em_step
  expect_close(CpuOps::em_step(x, f, n, dt, g), x + f * dt_b + g_b * dt_b.sqrt() * n, "em_step " + tag, tol);
  // backward_noise
  Tensor delta = (xp - x + (f - g_b * g_b * s) * dt_b) / (g_b * dt_b.sqrt());
  Tensor hs = 0.5 * delta.square().reshape({B, -1}).sum(1);
  auto [d_got, hs_got] = CpuOps::backward_noise(xp, x, f, s, dt, g);
  expect_close(d_got, delta, "backward_noise delta " + tag, tol);
  expect_close(hs_got, hs, "backward_noise half_sqnorm " + tag, tol);
  // flow_step (delta of the previous transition with dt_prev)
  Tensor delta_p = (xp - x + (f - g_b * g_b * s) * dtp_b) / (g_b * dtp_b.sqrt());
  auto [xn_got, hsp_got] = CpuOps::flow_step(xp, x, f, s, n, dtp, dt, g);
  expect_close(xn_got, x + f * dt_b + g_b * dt_b.sqrt() * n, "flow_step x_next " + tag, tol);
  expect_close(hsp_got, 0.5 * delta_p.square().reshape({B, -1}).sum(1), "flow_step half_sqnorm " + tag, tol);
  // adjoint_step
  Tensor gd = w_b * delta_p, apd = gd / (g_b * dtp_b.sqrt());
  auto [a0, a1, a2, a3] = CpuOps::adjoint_step(xp, x, f, s, w, an, ad, dtp, dt, g);
  expect_close(a0, apd, "adjoint_step adj_prev_direct " + tag, tol);
  expect_close(a1, ad + an - apd, "adjoint_step cot_x " + tag, tol);
  expect_close(a2, an * dt_b + gd * dtp_b.sqrt() / g_b, "adjoint_step cot_drift " + tag, tol);
  expect_close(a3, -gd * g_b * dtp_b.sqrt(), "adjoint_step cot_score " + tag, tol);
  // backward_noise_backward with grad_half_sqnorm only: G = w * delta
  auto bwd = CpuOps::backward_noise_backward(std::nullopt, w, delta, f, s, dt, g, true, {true, true, false, false});
  Tensor G = w_b * delta;
  expect_close(std::get<0>(bwd), G / (g_b * dt_b.sqrt()), "backward_noise_backward x_prev " + tag, tol);
  expect_close(std::get<1>(bwd), -G / (g_b * dt_b.sqrt()), "backward_noise_backward x_next " + tag, tol);
  if (std::get<2>(bwd).numel() != 0 || std::get<3>(bwd).numel() != 0) {
    ++failures;
    std::printf("FAIL backward_noise_backward wrote masked-out gradients\n");
  }
  expect_close(std::get<4>(bwd),
               (G * (-delta / (2 * dt_b) + (f / g_b - g_b * s) / dt_b.sqrt())).reshape({B, -1}).sum(1),
               "backward_noise_backward dt " + tag, tol * 10);
  expect_close(std::get<5>(bwd), (G * (-delta / g_b - 2 * s * dt_b.sqrt())).reshape({B, -1}).sum(1),
               "backward_noise_backward g " + tag, tol * 10);
  // argument checks name the argument
  bool threw = false;
  try {
    CpuOps::em_step(x, f, at::randn({B + 1}, opts), dt, g);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("noise: expected shape") != std::string::npos;
  }
  if (!threw) {
    ++failures;
    std::printf("FAIL em_step did not reject a bad noise shape\n");
  }
}

int main() {
#ifdef DIFFFLOW_TEST_REQUIRES_AVX2
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
    std::printf("skipped: this CPU has no AVX2/FMA\n");
    return 77;
  }
#endif
  at::manual_seed(0);
  const std::vector<std::vector<int64_t>> shapes = {{1, 1}, {3, 7}, {5, 97}, {2, 1031}, {2, 70000}, {4, 3, 5}, {6}};
  for (auto dtype : {at::kFloat, at::kDouble}) {
    for (const auto& shape : shapes) check(shape, dtype);
  }
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("all CPU kernel checks passed\n");
  return 0;
}
