// Per-sample gradient statistics of a batch split over the ranks of a torch.distributed job
// (include/trainscope/distributed.h): every statistic equals the single-process one on the
// concatenated batch.
//
// The statistics are sums over samples of ‖gᵢ‖², gᵢ·ḡ and their squares, finished with B and
// ‖ḡ‖², so once every rank holds the global ḡ they add up across ranks:
//
//   1. (per_sample_stats_across_ranks only) each rank sums its samples' gradients, Σᵢ gᵢ per
//      element in float64, and one all-reduce of [P + 1] doubles (the sums and B_r) gives
//      ḡ = Σ_r Σᵢ gᵢ / B on every rank, B = Σ_r B_r staying a device value;
//   2. each rank takes its samples' ‖gᵢ‖² (the fused local pass, which also counts the histogram
//      and the non-finite elements) and gᵢ·ḡ against the global ḡ (float64, in column chunks);
//   3. per_sample_stats_from_local_parts: one all-reduce of [B_r, Σ‖gᵢ‖², Σ(gᵢ·ḡ − ‖ḡ‖²)²,
//      Σ(gᵢ·ḡ)²] plus the histogram counts and the non-finite count (float64, exact up to 2^53),
//      and every rank finishes the six statistics with per_sample_stats_from_parts's formulas.
//
// Nothing reads device values back to the host.
#include "trainscope/distributed.h"

#include <algorithm>
#include <vector>

#include "src/nvtx.h"
#include "src/per_sample_stats_internal.h"

namespace trainscope {

namespace {

// The largest float64 temporary of the column-chunked passes: 2^22 doubles (32 MiB).
constexpr int64_t kChunkElems = int64_t{1} << 22;

int64_t chunk_cols(int64_t rows, int64_t cols) {
  return std::max<int64_t>(1, std::min<int64_t>(cols, kChunkElems / std::max<int64_t>(rows, 1)));
}

// Calls fn(offset, chunk) for column chunks of the [rows, cols] matrix m, chunk in float64.
template <typename Fn>
void for_each_column_chunk(const at::Tensor& m, Fn&& fn) {
  const int64_t rows = m.size(0), cols = m.size(1);
  const int64_t step = chunk_cols(rows, cols);
  for (int64_t c0 = 0; c0 < cols; c0 += step) {
    const int64_t w = std::min(step, cols - c0);
    fn(c0, m.narrow(1, c0, w).to(at::kDouble));
  }
}

}  // namespace

at::Tensor per_sample_stats_from_local_parts(const PerSampleParts& local, const RankGroup& group,
                                             at::Tensor* extra_sums) {
  const char* op = "trainscope::per_sample_stats_from_local_parts";
  // One process: the parts are the whole batch's (and extra_sums its own sum).
  if (!group.is_distributed()) return per_sample_stats_from_parts(local);
  NvtxRange range{op};
  const int64_t b = check_per_sample_parts(op, local, /*min_batch=*/1);
  const at::Device device = local.sq_norms.device();
  at::Tensor extra;
  if (extra_sums != nullptr && extra_sums->defined()) {
    TORCH_CHECK(extra_sums->scalar_type() == at::kDouble && extra_sums->device() == device, op,
                ": extra_sums must be a float64 tensor on the parts' device (", device, "), got ",
                extra_sums->scalar_type(), " on ", extra_sums->device());
    extra = extra_sums->reshape({-1});
  }

  const at::Tensor sq = local.sq_norms.to(at::kDouble);
  const at::Tensor dots = local.dots.to(at::kDouble);
  const at::Tensor m = local.mean_sq_norm.to(at::kDouble).reshape({});
  std::vector<at::Tensor> pieces{at::full({1}, static_cast<double>(b), sq.options()), sq.sum().reshape({1}),
                                 (dots - m).square().sum().reshape({1}), dots.square().sum().reshape({1})};
  if (extra.defined()) pieces.push_back(extra);
  at::Tensor packed = at::cat(pieces);
  group.all_reduce_sum_(packed);

  const at::Tensor stats = per_sample_stats_from_sums(packed[0], packed[1], packed[2], packed[3], m);
  if (extra.defined()) {
    extra_sums->copy_(packed.narrow(0, 4, extra.numel()).view_as(*extra_sums));
  }
  return stats;
}

PerSampleStats per_sample_stats_across_ranks(at::TensorList per_sample_grads, const RankGroup& group,
                                             const PerSampleOptions& options) {
  if (!group.is_distributed()) return per_sample_stats(per_sample_grads, options);
  const char* op = "trainscope::per_sample_stats_across_ranks";
  NvtxRange range{op};
  // Checks (B_r >= 1), then ‖gᵢ‖², the histogram and the non-finite count in the fused pass; its
  // dots are against this rank's own mean and are replaced below.
  PerSampleStats local = per_sample_parts_impl(op, per_sample_grads, options, /*min_batch=*/1);
  const int64_t b = local.parts.batch_size();
  const auto f64 = local.parts.sq_norms.options();

  std::vector<at::Tensor> rows;  // [B_r, cols] of every non-empty tensor
  for (const at::Tensor& t : per_sample_grads) {
    if (t.numel() > 0) rows.push_back(t.reshape({b, -1}));
  }

  // 1. ḡ of the whole batch: one all-reduce of this rank's column sums and B_r.
  std::vector<at::Tensor> pieces;
  for (const at::Tensor& r : rows) {
    for_each_column_chunk(r, [&](int64_t, const at::Tensor& chunk) { pieces.push_back(chunk.sum(0)); });
  }
  pieces.push_back(at::full({1}, static_cast<double>(b), f64));
  at::Tensor sums = at::cat(pieces);
  group.all_reduce_sum_(sums);
  const int64_t p = sums.numel() - 1;
  const at::Tensor mean = sums.narrow(0, 0, p) / sums.narrow(0, p, 1);  // B stays on the device

  // 2. gᵢ·ḡ against the global ḡ, and ‖ḡ‖².
  at::Tensor dots = at::zeros({b}, f64);
  int64_t offset = 0;
  for (const at::Tensor& r : rows) {
    for_each_column_chunk(r, [&](int64_t c0, const at::Tensor& chunk) {
      dots.add_(at::mv(chunk, mean.narrow(0, offset + c0, chunk.size(1))));
    });
    offset += r.size(1);
  }
  local.parts.dots = dots;
  local.parts.mean_sq_norm = mean.square().sum();

  // 3. The statistics, with the histogram and the non-finite count in the same all-reduce.
  const int64_t nbins = local.hist.numel();
  at::Tensor extra = at::cat({local.hist.to(at::kDouble), local.nonfinite.to(at::kDouble).reshape({1})});
  local.stats = per_sample_stats_from_local_parts(local.parts, group, &extra);
  local.hist = extra.narrow(0, 0, nbins).round().to(at::kLong);
  local.nonfinite = extra[nbins].round().to(at::kLong);
  return local;
}

}  // namespace trainscope
