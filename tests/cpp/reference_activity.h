// The dead-unit rule of SPEC.md §3 in float64, the reference the dead-unit tests check the
// activity test, the kernel and the LibTorch API against. Kinds by value: 0 ReLU, 1 tanh,
// 2 sigmoid (trainscope::ActivationKind and trainscope::cuda::ActivityKind share them).
#pragma once

#include <cmath>

// ReLU a ≠ 0; tanh |a| ≤ 1 − ε; sigmoid ε ≤ a ≤ 1 − ε.
template <typename Kind>
bool reference_active(double a, Kind kind, double eps) {
  switch (static_cast<int>(kind)) {
    case 0: return a != 0.0;
    case 1: return std::fabs(a) <= 1.0 - eps;
    default: return eps <= a && a <= 1.0 - eps;
  }
}

template <typename Kind>
const char* reference_kind_name(Kind kind) {
  const int k = static_cast<int>(kind);
  return k == 0 ? "relu" : (k == 1 ? "tanh" : "sigmoid");
}
