// trainscope::curvature_stats (include/trainscope/curvature.h) on a least-squares loss whose
// Hessian, its diagonal and S are known in closed form: ℓᵢ = ½(xᵢᵀθ − yᵢ)², so H = XᵀX / B and
// gᵢ = xᵢ(xᵢᵀθ − yᵢ). Exact method to rounding, Hutchinson within 5 standard errors, the Lanczos
// and power iterations against the eigenvalues and each other, NaN for a NaN loss, errors naming
// bad options.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string>
#include <vector>

#include "tests/cpp/torch_test_util.h"
#include "trainscope/curvature.h"

namespace {

const auto kF64 = at::TensorOptions().dtype(at::kDouble);

struct Problem {
  at::Tensor X, y, theta;
  std::function<at::Tensor()> losses() const {
    return [this] { return 0.5 * (at::mv(X, theta) - y).square(); };
  }
  at::Tensor hessian() const { return at::mm(X.t(), X) / static_cast<double>(X.size(0)); }
  at::Tensor s() const {
    const at::Tensor r = at::mv(X, theta.detach()) - y;
    return (X * r.unsqueeze(1)).square().sum(0);
  }
};

Problem make(int64_t B, int64_t P, int64_t seed) {
  at::manual_seed(seed);
  Problem p{at::randn({B, P}, kF64), at::randn({B}, kF64), at::randn({P}, kF64).requires_grad_()};
  return p;
}

TEST(CurvatureStats, ExactMethodMatchesTheClosedForm) {
  const Problem p = make(12, 6, 1);
  trainscope::CurvatureOptions o;
  o.method = trainscope::CurvatureMethod::kExact;
  o.rtol = 1e-12;
  o.atol = 0;
  o.max_iter = 5000;
  const trainscope::CurvatureStats c = trainscope::curvature_stats(p.losses(), {p.theta}, o);
  const at::Tensor H = p.hessian(), h = H.diagonal(), S = p.s();
  EXPECT_NEAR(c.hess_trace.item<double>(), h.sum().item<double>(), 1e-12);
  EXPECT_EQ(c.hess_trace_stderr.item<double>(), 0.0);
  EXPECT_NEAR(c.hess_max_ev.item<double>(), at::linalg_eigvalsh(H).max().item<double>(), 1e-8);
  o.solver = trainscope::MaxEvSolver::kPower;
  EXPECT_NEAR(trainscope::curvature_stats(p.losses(), {p.theta}, o).hess_max_ev.item<double>(),
              at::linalg_eigvalsh(H).max().item<double>(), 1e-8);
  const double B = 12.0;
  EXPECT_NEAR(c.tic_diag.item<double>(), (S / B / (h + 1e-7)).sum().item<double>(), 1e-9);
  EXPECT_NEAR(c.tic_trace.item<double>(), (S.sum() / B / (h.sum() + 1e-7)).item<double>(), 1e-12);
  EXPECT_FALSE(p.theta.grad().defined()) << "nothing is written to .grad";
}

TEST(CurvatureStats, HutchinsonTraceWithinItsStandardError) {
  const Problem p = make(20, 15, 2);
  trainscope::CurvatureOptions o;
  o.samples = 400;
  o.max_ev = false;
  const trainscope::CurvatureStats c = trainscope::curvature_stats(p.losses(), {p.theta}, o);
  const double want = p.hessian().trace().item<double>(), se = c.hess_trace_stderr.item<double>();
  EXPECT_GT(se, 0.0);
  EXPECT_LE(std::abs(c.hess_trace.item<double>() - want), 5 * se) << "trace " << c.hess_trace << " want " << want;
  EXPECT_TRUE(std::isnan(c.hess_max_ev.item<double>())) << "not asked for";
}

TEST(CurvatureStats, NegativeDominantEigenvalueGivesTheLargest) {
  at::manual_seed(3);
  const at::Tensor theta = at::randn({3}, kF64).requires_grad_();
  const at::Tensor A = at::diag(at::tensor({-5.0, 1.0, 2.0}, kF64));
  trainscope::CurvatureOptions o;
  o.diag = false;
  o.rtol = 1e-12;
  o.atol = 0;
  o.max_iter = 10000;
  for (const auto solver : {trainscope::MaxEvSolver::kLanczos, trainscope::MaxEvSolver::kPower}) {
    o.solver = solver;
    const trainscope::CurvatureStats c =
        trainscope::curvature_stats([&] { return 0.5 * theta.dot(at::mv(A, theta)); }, {theta}, o);
    EXPECT_NEAR(c.hess_max_ev.item<double>(), 2.0, 1e-6) << (solver == trainscope::MaxEvSolver::kPower);
  }
}

// After k products the Lanczos Krylov space holds the power iterate: its largest Ritz value is at
// least the power iteration's Rayleigh quotient (equal after one), and at most λ_max.
TEST(CurvatureStats, LanczosIsNeverBelowThePowerIterationAfterAsManyProducts) {
  const Problem p = make(40, 30, 6);
  const double lam_max = at::linalg_eigvalsh(p.hessian()).max().item<double>();
  trainscope::CurvatureOptions o;
  o.diag = false;
  o.rtol = 0;
  o.atol = 0;
  for (int64_t k = 1; k <= 8; ++k) {
    o.max_iter = k;
    o.solver = trainscope::MaxEvSolver::kPower;
    const double power = trainscope::curvature_stats(p.losses(), {p.theta}, o).hess_max_ev.item<double>();
    o.solver = trainscope::MaxEvSolver::kLanczos;
    const double lanczos = trainscope::curvature_stats(p.losses(), {p.theta}, o).hess_max_ev.item<double>();
    EXPECT_GE(lanczos, power * (1 - 1e-12)) << "k " << k;
    EXPECT_LE(lanczos, lam_max * (1 + 1e-12)) << "k " << k;
    if (k == 1) EXPECT_NEAR(lanczos, power, 1e-12 * power);
  }
  // To a tight stop both find λ_max.
  o.max_iter = 200;
  o.rtol = 1e-13;
  EXPECT_NEAR(trainscope::curvature_stats(p.losses(), {p.theta}, o).hess_max_ev.item<double>(), lam_max,
              1e-9 * lam_max);
  EXPECT_EQ(trainscope::parse_max_ev_solver("power"), trainscope::MaxEvSolver::kPower);
  try {
    trainscope::parse_max_ev_solver("arnoldi");
    ADD_FAILURE() << "an unknown solver accepted";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("solver"), std::string::npos) << e.what();
  }
}

TEST(CurvatureStats, TroubleIsNanAndBadOptionsAreNamed) {
  const Problem p = make(4, 3, 4);
  trainscope::CurvatureOptions o;
  for (const auto solver : {trainscope::MaxEvSolver::kLanczos, trainscope::MaxEvSolver::kPower}) {
    o.solver = solver;
    const trainscope::CurvatureStats c = trainscope::curvature_stats(
        [&] { return p.losses()() * std::numeric_limits<double>::quiet_NaN(); }, {p.theta}, o);
    for (const at::Tensor* t : {&c.hess_max_ev, &c.hess_trace, &c.tic_diag, &c.tic_trace}) {
      EXPECT_TRUE(std::isnan(t->item<double>()));
    }
  }
  o = {};
  o.samples = 0;
  try {
    trainscope::curvature_stats(p.losses(), {p.theta}, o);
    ADD_FAILURE() << "samples = 0 accepted";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("samples"), std::string::npos) << e.what();
  }
  o = {};
  o.method = trainscope::CurvatureMethod::kExact;
  o.max_params = 2;
  EXPECT_THROW(trainscope::curvature_stats(p.losses(), {p.theta}, o), c10::Error);
  EXPECT_THROW(trainscope::curvature_stats(p.losses(), {p.theta.detach()}, {}), c10::Error);
}

// On a GPU the closure and the backward passes run cuDNN's float32 convolutions in IEEE float32
// (its default is TF32, ~5e-4 relative); the setting is back afterwards.
TEST(CurvatureStats, CudaConvolutionsRunInIeeeFloat32) {
  SKIP_WITHOUT_CUDA();
  const trainscope_test::Tf32Convolutions tf32;
  at::manual_seed(5);
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(at::kCUDA);
  const at::Tensor x = at::randn({6, 8, 10, 10}, f32), w = (0.2 * at::randn({4, 8, 3, 3}, f32)).requires_grad_();
  std::vector<at::Float32Precision> seen;
  auto losses = [&] {
    seen.push_back(trainscope_test::Tf32Convolutions::precision());
    return at::conv2d(x, w).tanh().square().sum({1, 2, 3});
  };
  trainscope::CurvatureOptions o;
  o.samples = 4;
  const trainscope::CurvatureStats c = trainscope::curvature_stats(losses, {w}, o);
  EXPECT_TRUE(std::isfinite(c.hess_trace.item<double>()));
  ASSERT_FALSE(seen.empty());
  for (const at::Float32Precision p : seen) EXPECT_EQ(p, at::Float32Precision::IEEE);
  EXPECT_EQ(trainscope_test::Tf32Convolutions::precision(), at::Float32Precision::TF32);
}

}  // namespace
