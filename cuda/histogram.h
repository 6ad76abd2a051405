// Histogram binning shared by every family (SPEC.md §4): host and device, so CPU paths, kernels
// and tests put each value in the same bin.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/common.h"

namespace trainscope {
namespace cuda {

// Histogram binning (SPEC.md §4), evaluated in float64 so CUDA, CPU and a NumPy float64 reference
// put every element in the same bin.
struct HistSpec {
  int64_t nbins;
  double maxval;
  double width;      // 2·maxval / nbins
  double inv_width;  // 1 / width
};

inline HistSpec make_hist_spec(int64_t nbins, double maxval) {
  HistSpec h;
  h.nbins = nbins;
  h.maxval = maxval;
  h.width = 2.0 * maxval / static_cast<double>(nbins);
  h.inv_width = 1.0 / h.width;
  return h;
}

// Largest nbins accepted: keeps the multiply-then-check shortcut below exact (see hist_bin).
constexpr int64_t kMaxHistBins = int64_t{1} << 20;

// An axis hist_bin can bin on: 1 ≤ nbins ≤ kMaxHistBins, maxval positive and finite, and a bin
// width 2·maxval/nbins that is a normal float64 with a finite reciprocal (a tinier maxval would
// put every value in bin 0 instead of SPEC.md §4's edge bins).
inline bool hist_axis_ok(int64_t nbins, double maxval) {
  if (nbins < 1 || nbins > kMaxHistBins || !(maxval > 0.0) || !std::isfinite(maxval)) return false;
  const HistSpec h = make_hist_spec(nbins, maxval);
  return std::isnormal(h.width) && std::isfinite(h.inv_width);
}

// Bin of a finite value: floor((clamp(x, −m, m) + m) / w), x = m in the last bin. A multiply by
// 1/w is off from the division by at most a few ulp (≤ 1e-9 for nbins ≤ 2^20), so the exact
// division is only evaluated when the quotient lies that close to a bin edge.
// s = c + m ≥ 0 (c ≥ −m and rounding is monotone), so truncation is floor: no libm call on a
// CPU built without SSE4.1's round instruction.
TS_HD int64_t hist_bin(double x, const HistSpec& h) {
  const double c = x < -h.maxval ? -h.maxval : (x > h.maxval ? h.maxval : x);
  const double s = c + h.maxval;
  const double t = s * h.inv_width;
  int64_t b = static_cast<int64_t>(t);
  const double f = static_cast<double>(b);
  if (t - f < 1e-9 || f + 1.0 - t < 1e-9) b = static_cast<int64_t>(s / h.width);
  return b < h.nbins ? (b < 0 ? 0 : b) : h.nbins - 1;
}

}  // namespace cuda
}  // namespace trainscope
