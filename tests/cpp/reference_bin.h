// The histogram rule of SPEC.md §4 in its plainest form, the reference both C++ test files
// check hist_bin and the kernels against.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

inline int64_t reference_bin(double x, int64_t nbins, double maxval) {
  const double w = 2.0 * maxval / static_cast<double>(nbins);
  const double c = std::min(std::max(x, -maxval), maxval);
  const double b = std::floor((c + maxval) / w);
  if (b < 0.0) return 0;
  if (b >= static_cast<double>(nbins)) return nbins - 1;
  return static_cast<int64_t>(b);
}
