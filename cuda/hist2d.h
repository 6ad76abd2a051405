// Joint histogram of (per-sample gradient element, parameter value) (SPEC.md §2 `grad_hist2d`,
// Cockpit's GradHist2d): the torch-free launcher interface and the work plan and binning shared
// by the CUDA kernel (hist2d.cu) and the CPU implementation (src/hist2d.cpp).
//
// Pair t of the list is a per-sample gradient G_t [B, P_t] and its parameter θ_t [P_t], both
// contiguous and of one dtype. Every (G_t[b, j], θ_t[j]) is counted into
// counts[nbins_grad, nbins_param] (int64, row-major, flat index bx·nbins_param + by), each axis
// binned by the §4 rule (cuda/histogram.h); a pair with a NaN or ±Inf on either side is not
// binned but counted in `nonfinite`, so Σ counts + nonfinite = B · Σ P_t.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#if defined(TRAINSCOPE_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

#include "cuda/common.h"
#include "cuda/histogram.h"

namespace trainscope {
namespace cuda {

// Largest nbins_grad · nbins_param accepted (each axis is also limited to kMaxHistBins). Keeps the
// flat bin index in an int32 and the histogram within 128 MiB of int64 counters.
constexpr int64_t kMaxHist2dBins = int64_t{1} << 24;

// An axis the kernels can bin on (hist_axis_ok, cuda/histogram.h).
inline bool hist2d_axis_ok(const HistSpec& h) { return hist_axis_ok(h.nbins, h.maxval); }

// ---------------------------------------------------------------------------------------------
// Work plan. A pair's [B, P] matrix is cut into items, each a rectangle of rows × columns that one
// CUDA block (or one CPU task) takes: it bins each parameter value of the item once and reuses that
// bin for every gradient row of the item.
//   wide pairs (P ≥ kHist2dWindow): a window of kHist2dWindow columns, one row per pass;
//   narrow pairs (P < kHist2dWindow): all P columns, floor(kHist2dWindow / P) rows per pass, so a
//     pass still covers up to kHist2dWindow contiguous elements.
// An item has kHist2dPassesPerItem passes (fewer in the last row group).
constexpr int64_t kHist2dWindow = 2048;  // elements of one pass: 256 threads × 8
constexpr int64_t kHist2dPassesPerItem = 16;

struct Hist2dPlan {
  int64_t rows_per_pass;  // 1 for wide pairs
  int64_t col_tiles;      // column windows per row group
  int64_t row_groups;
  int64_t items;          // col_tiles · row_groups; 0 for an empty pair
};

TS_HD Hist2dPlan hist2d_plan(int64_t batch, int64_t numel) {
  Hist2dPlan p;
  p.rows_per_pass = 1;
  p.col_tiles = p.row_groups = p.items = 0;
  if (batch <= 0 || numel <= 0) return p;
  if (numel >= kHist2dWindow) {
    p.col_tiles = ceil_div(numel, kHist2dWindow);
  } else {
    p.rows_per_pass = kHist2dWindow / numel;
    p.col_tiles = 1;
  }
  p.row_groups = ceil_div(batch, p.rows_per_pass * kHist2dPassesPerItem);
  p.items = p.col_tiles * p.row_groups;
  return p;
}

// Rows [row_begin, row_end) × columns [col_begin, col_end) of item `item` (0 ≤ item < plan.items).
struct Hist2dItem {
  int64_t row_begin, row_end, col_begin, col_end;
};

TS_HD Hist2dItem hist2d_item(const Hist2dPlan& p, int64_t batch, int64_t numel, int64_t item) {
  // Neighbouring items are neighbouring column windows of the same rows: blocks running at the
  // same time read nearby memory.
  const int64_t group = item / p.col_tiles;
  const int64_t tile = item - group * p.col_tiles;
  const int64_t rows = p.rows_per_pass * kHist2dPassesPerItem;
  Hist2dItem it;
  it.row_begin = group * rows;
  it.row_end = it.row_begin + rows < batch ? it.row_begin + rows : batch;
  it.col_begin = tile * kHist2dWindow;
  it.col_end = it.col_begin + kHist2dWindow < numel ? it.col_begin + kHist2dWindow : numel;
  return it;
}

// How the kernel walks an item: thread slot s (0 ≤ s < kHist2dWindow) is element s of each pass's
// window, i.e. row offset s / width and column s % width (width = col_end − col_begin), and goes
// down through the item's passes. The slot's element in pass p lies p·rows_per_pass·P + s elements
// after the item's first element (row_begin, col_begin), since a narrow item spans whole rows.
struct Hist2dSlot {
  int32_t col;     // column within the item; the parameter index is col_begin + col
  int32_t passes;  // passes that reach the slot: 0 when s is past the window of a full pass
};

TS_HD Hist2dSlot hist2d_slot(const Hist2dItem& it, int64_t rows_per_pass, int32_t s) {
  const int32_t width = static_cast<int32_t>(it.col_end - it.col_begin);
  const int32_t rows = static_cast<int32_t>(it.row_end - it.row_begin);  // ≤ kHist2dWindow · passes
  Hist2dSlot slot;
  if (rows_per_pass == 1) {  // wide: no division on the common path
    slot.col = s;
    slot.passes = s < width ? rows : 0;
    return slot;
  }
  const int32_t rpp = static_cast<int32_t>(rows_per_pass);
  const int32_t full = rows / rpp;             // passes of rpp rows
  const int32_t last_rows = rows - full * rpp;  // rows of a shorter last pass
  const int32_t row = s / width;
  slot.col = s - row * width;
  slot.passes = row >= rpp ? 0 : full + (row < last_rows ? 1 : 0);
  return slot;
}

// ---------------------------------------------------------------------------------------------
// Binning. The parameter bin of a column is found once per item; a NaN/±Inf parameter is -1.
TS_HD int32_t hist2d_param_bin(double p, const HistSpec& param) {
  return is_finite(p) ? static_cast<int32_t>(hist_bin(p, param)) : -1;
}

// Flat bin of a gradient value against a parameter bin from hist2d_param_bin, or -1 when the pair
// is not binned (either side NaN/±Inf).
TS_HD int32_t hist2d_flat_bin(double g, int32_t param_bin, const HistSpec& grad, int64_t nbins_param) {
  if (param_bin < 0 || !is_finite(g)) return -1;
  return static_cast<int32_t>(hist_bin(g, grad) * nbins_param + param_bin);
}

// Both steps at once, for tests and one-off values.
TS_HD int32_t hist2d_bin(double g, double p, const HistSpec& grad, const HistSpec& param) {
  return hist2d_flat_bin(g, hist2d_param_bin(p, param), grad, param.nbins);
}

// ---------------------------------------------------------------------------------------------
// One pair of the list, as both paths read it.
struct Hist2dPair {
  const void* grad;   // [batch, numel], contiguous
  const void* param;  // [numel], contiguous, same dtype
  int64_t numel;      // P; 0 skips the pair (null pointers allowed then)
  DType dtype;
};

// ---------------------------------------------------------------------------------------------
// The CUDA launcher, in a build with CUDA only: everything above is plain C++ too.
#if defined(TRAINSCOPE_WITH_CUDA)
struct Hist2dArgs {
  const Hist2dPair* pairs;  // host array of num_pairs entries
  int64_t num_pairs;
  int64_t batch;            // B, shared by every pair; 0 counts nothing
  HistSpec grad_spec;       // nbins_grad over [−maxval_grad, maxval_grad]
  HistSpec param_spec;      // nbins_param over [−maxval_param, maxval_param]
  int64_t* counts;          // device [grad_spec.nbins · param_spec.nbins]; cleared by the launch
  int64_t* nonfinite;       // device [1]; cleared by the launch
};

// Enqueues the whole computation on `stream` (clearing the outputs first) and returns the first
// CUDA error; never synchronises, needs no workspace, and can be captured in a CUDA graph.
// Invalid arguments return cudaErrorInvalidValue before any CUDA call.
cudaError_t hist2d_launch(const Hist2dArgs& args, cudaStream_t stream);
#endif  // TRAINSCOPE_WITH_CUDA

}  // namespace cuda
}  // namespace trainscope
