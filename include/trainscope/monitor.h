// trainscope — the Monitor: every metric once per batch, with no host synchronisation.
//
//   #include <trainscope/monitor.h>
//
//   trainscope::MonitorConfig cfg;                           // parameter metrics + histogram every step
//   cfg.grad_hist.schedule = trainscope::Schedule::every(10);
//   trainscope::Monitor monitor(model->named_parameters().pairs(), cfg);  // θ₀, θ_prev taken here
//   monitor.add_sink(trainscope::JsonlSink("runs/metrics.jsonl"));
//   for (int64_t step = 0; step < steps; ++step) {
//     ... forward, per_sample_losses, loss.backward(), optimizer.step() ...
//     monitor.step(step, per_sample_losses);                 // launches, never waits
//   }
//   monitor.flush();                                         // the one wait, at the end
//
// step() launches the fused kernels on the current stream, writes the step's results into a slot
// of a device ring buffer, and queues an asynchronous copy of that slot into pinned host memory
// with an event. Finished steps (event complete) are turned into StepRecords and handed to the
// sinks by the next step() or poll(), on the calling thread; only flush() and a full ring (more
// than `ring_slots` steps in flight) wait for the GPU.
//
// Inside a CUDA graph capture, step() records only device work into a fixed capture slot; after
// each replay, call collect_captured(step) (outside the capture) to queue that slot's copy to the
// host as step `step`. Which quantities the captured step computes is decided at capture time
// (schedules and requests are evaluated then, for the step number given to the captured call);
// every replay computes that same set. The first step() should run eagerly before capturing
// (the usual CUDA-graph warm-up), and no poll happens inside a capture.
//
// Memory: θ₀ and θ_prev are one copy of the parameters each (in their own dtype), kept only when
// distance / update_size are tracked (MonitorConfig::track_init / track_prev). The ring holds
// ring_slots × (scalars + histogram bins) 8-byte values on the device and in pinned memory.
// A step at which nothing is due makes no record.
// A parameter whose .grad() is undefined at a step (while others have one) is read as zeros,
// from a zero tensor of its size kept from then on; when no parameter has a gradient, the
// gradient metrics are NaN and the histogram counts are zero (across ranks, where the lists must
// agree on every rank, missing gradients are always read as zeros).
//
// θ_prev refresh: update_size must mean the latest optimizer step, whatever step comes next
// (an on-demand request can make any step due), so θ_prev ← θ at every step(): inside the fused
// pass when parameter metrics are due, otherwise by one multi-tensor copy (one read and one
// write of the parameters, in their dtype). Call step() once per optimizer step.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>

#include "trainscope/distributed.h"
#include "trainscope/curvature.h"
#include "trainscope/per_sample_factors.h"

namespace trainscope {

// When a quantity is computed: steps are the caller's step numbers (0-based or not, as given).
class Schedule {
 public:
  static Schedule every(int64_t k, int64_t start = 0);      // start, start + k, start + 2k, ...
  static Schedule at(std::vector<int64_t> steps);           // exactly the listed steps
  // About `per_decade` steps per power of ten from `start` (≥ 1): the distinct values of
  // floor(start · 10^(i / per_decade)), i = 0, 1, ... — with the defaults
  // 1, 2, 3, 5, 6, 7, 10, 12, 15, 19, 25, 31, 39, 50, 63, 79, 100, ...
  // Checks (c10::Error naming the argument): every: k ≥ 1; log_spaced: per_decade ≥ 1, start ≥ 1.
  static Schedule log_spaced(int64_t per_decade = 10, int64_t start = 1);
  static Schedule on_demand();                              // only after Monitor::request(key)
  // "at:" (no steps) is a schedule that never fires.
  // The same from text, for configuration files and the Python package: "every:K" or
  // "every:K:START", "at:S1,S2,...", "log:PER_DECADE" or "log:PER_DECADE:START", "on_demand".
  // Anything else throws c10::Error naming `arg`.
  static Schedule parse(const std::string& spec, const char* arg = "schedule");
  bool due(int64_t step) const;  // on_demand: always false (requests live in the Monitor)
  std::string describe() const;                             // "every 10 from 0", ...

 private:
  enum class Kind { kEvery, kAt, kLog, kOnDemand };
  Kind kind_ = Kind::kEvery;
  int64_t k_ = 1, start_ = 0;
  std::vector<int64_t> steps_;  // kAt, sorted
};

struct QuantityConfig {
  bool enabled = true;          // off: never computed, not even when requested
  Schedule schedule = Schedule::every(1);
};

struct MonitorConfig {
  // The built-in metrics: loss, grad_norm, grad_magnitude, weight_magnitude, distance,
  // update_size, weight_norm, update_ratio, nonfinite_count; globally, and per parameter tensor
  // when per_tensor. Each follows its own entry of `metrics` (by that name: its switch and
  // schedule), and param_metrics when it has none. The fused pass reads only the arrays the
  // metrics due at a step need (gradients, parameters, θ₀, θ_prev); a metric that is off is never
  // computed, and θ₀ (θ_prev) is kept only while distance (update_size or update_ratio) is on.
  // An unknown name throws c10::Error at construction.
  QuantityConfig param_metrics;
  std::map<std::string, QuantityConfig> metrics;
  QuantityConfig grad_hist;     // the 1-D gradient histogram (SPEC.md §4)
  int64_t nbins = 100;
  double maxval = 0.05;
  bool per_tensor = true;
  bool weights_matrices_only = false;
  bool track_init = true;       // keep θ₀ for distance; off: no "distance" entries in records
  bool track_prev = true;       // keep θ_prev for update_size and update_ratio; off: neither in records
  int64_t ring_slots = 64;      // steps in flight before step() waits for the oldest (≥ 1)

  // Data-parallel training (distributed.h): the ranks the parameter metrics, the histogram and the
  // loss are combined over (default: this process alone), and how each parameter lies across
  // them (empty: every parameter replicated, as under DDP; one entry per parameter otherwise,
  // e.g. sharded for FSDP). With more than one rank, a step that computes parameter metrics or
  // the histogram runs one all-reduce of T·(8 + nbins) + 2 doubles, so every rank must build
  // the Monitor with the same parameter list and config and make the same step() and request()
  // calls (losses on every rank or on none). Custom quantities stay each rank's own.
  RankGroup group;
  std::vector<TensorLayout> layouts;
  bool sinks_on_all_ranks = false;  // off: only rank 0 hands records to the sinks

  // The per-sample gradient statistics (SPEC.md §2) from layer factors, recorded as
  // "per_sample/<stat>" for the six per_sample_stat_name()s (off by default; key "per_sample" for
  // request() and due()). LibTorch modules have no forward hooks, so the model's forward hands
  // each tracked layer's input and output to Monitor::capture_linear / capture_conv2d, which
  // record them only while the Monitor is armed: armed iff the step after the latest step() (step
  // 0 before the first) is due, or "per_sample" was requested. Every trainable parameter the
  // statistics should cover must pass through a capture; what does not is left out. With
  // per_sample_loss_mean the loss is the mean of the per-sample losses (torch's default), whose
  // output gradients are ∇ℓᵢ/B: scaled back, so the statistics describe ∇ℓᵢ (only tr Σ̂ and ‖G‖²
  // depend on that scale). One process only: with a group of several ranks it is refused at
  // construction (the Python Monitor covers torch.distributed).
  QuantityConfig per_sample{false, Schedule::every(1)};
  // The histogram of every per-sample gradient element of the captured layers (SPEC.md §4, on the
  // axis nbins / maxval of the gradient histogram), recorded as "per_sample_grad_hist1d" (off by
  // default; key "per_sample_hist"). It arms the same captures as per_sample; with
  // per_sample_loss_mean it counts the elements of ∇ℓᵢ. Formed in tiles of per-sample gradients:
  // it costs more than the statistics (bench/README.md, "The per-sample histogram").
  QuantityConfig per_sample_hist{false, Schedule::every(1)};
  // The per-element gradient variance family of the captured layers (SPEC.md §6, grad_variance.h)
  // on its own schedule (off by default; key "grad_variance"): "grad_variance/mean_gsnr",
  // "grad_variance/early_stopping" and, when grad_variance_lr is set and step() has the per-sample
  // losses, "grad_variance/cabs"; with per_tensor also ".../<layer>.weight" and ".../<layer>.bias".
  // It arms the same captures. grad_variance_lr: the SGD learning rate η, read at each due step
  // (cabs is defined for SGD without momentum; set it only for such an optimizer).
  QuantityConfig grad_variance{false, Schedule::every(1)};
  std::function<double()> grad_variance_lr;
  // The normalised step length (SPEC.md §6, alpha.h; off by default; key "alpha"), a two-step
  // quantity from the captures: a due step s is its start point (θ_s is copied when the captures
  // are armed for it), step s + 1 its end point (armed too); "alpha" is recorded with step s + 1,
  // the α of the update made at step s. Needs the per-sample losses in both step() calls, and
  // each captured layer named as its module, so that "<layer>.weight" (and ".bias") are its
  // parameters' names (an error names the layer otherwise).
  QuantityConfig alpha{false, Schedule::every(1)};
  // The curvature family (SPEC.md §6, curvature.h; off by default; key "curvature"):
  // "curvature/hess_max_ev", "curvature/hess_trace" (and "curvature/hess_trace_stderr" when
  // estimated), "curvature/tic_diag", "curvature/tic_trace" (NaN unless curvature_loss returns the
  // per-sample losses). curvature_loss recomputes the loss of the step's batch with a fresh
  // forward pass at the current parameters (after the optimizer step when step() follows it); it
  // is called by step() on due steps only, so only they pay for second derivatives. Required
  // when curvature is on; one process only.
  QuantityConfig curvature{false, Schedule::every(1)};
  std::function<at::Tensor()> curvature_loss;
  CurvatureOptions curvature_options;
  FactorMethod per_sample_method = FactorMethod::kAuto;
  bool per_sample_loss_mean = true;
};

// One finished step, on the host.
struct StepRecord {
  int64_t step = 0;
  // Global values under the metric name ("grad_norm"), per tensor under "<metric>/<name>",
  // custom quantities under their key (or "<key>/<sub-name>"), extra scalars under their name.
  // Order: loss (when losses were given), grad_norm, grad_magnitude, weight_magnitude, distance,
  // update_size, weight_norm, update_ratio, nonfinite_count (those due); then the per-tensor values
  // metric by metric, each in parameter order; then custom quantities in registration order; then extra scalars by name.
  std::vector<std::pair<std::string, double>> scalars;
  struct Histogram {
    std::string name;             // "grad_hist1d" (every parameter's gradient), or a name given to step()
    std::vector<double> edges;    // nbins + 1 (the first axis of a 2-D histogram)
    std::vector<int64_t> counts;  // nbins, or row-major [edges.size() − 1, edges2.size() − 1]
    std::vector<double> edges2;   // a 2-D histogram's second axis; empty for 1-D
  };
  std::vector<Histogram> histograms;
};

using Sink = std::function<void(const StepRecord&)>;

// A histogram the caller computed on the device at a step (per-sample gradient histograms, say),
// recorded with the step's results: counts int64 on the parameters' device, [edges.size() − 1]
// or, with edges2, [edges.size() − 1, edges2.size() − 1]. Edges are host values.
struct HistogramInput {
  at::Tensor counts;
  std::vector<double> edges;
  std::vector<double> edges2;
};

// What a custom quantity sees at a step. Pointers are null (lists empty) when not given.
struct QuantityContext {
  int64_t step = 0;
  const std::vector<std::string>* names = nullptr;  // parameter names
  const std::vector<at::Tensor>* params = nullptr;  // current parameters
  std::vector<at::Tensor> grads;                    // their .grad() (undefined where none)
  at::Tensor losses;                                // per-sample losses of the batch
  // Anything else the training loop passes to step(): per-sample data, activations, ...
  const std::map<std::string, at::Tensor>* extras = nullptr;
};

// A user-defined quantity (the seed's "Creating new quantities"): a unique key and a compute
// that returns device tensors (no host sync): one-element tensors on the parameters' device
// (any floating or integer dtype, logged as float64), logged as "<key>" for the entry named ""
// or "<key>/<name>" otherwise. Anything else throws c10::Error naming the key. compute runs
// under no-grad, only at steps where the quantity is due.
class Quantity {
 public:
  virtual ~Quantity() = default;
  virtual std::string key() const = 0;
  virtual std::map<std::string, at::Tensor> compute(const QuantityContext& context) = 0;
};

// What a run resumed from a checkpoint needs to continue its curves (Monitor::state_dict()).
// Schedules are functions of the step number and need no state of their own.
struct MonitorState {
  std::vector<std::string> names;      // the parameter names, in order
  std::vector<at::Tensor> init;        // θ₀, one per parameter; empty when not tracked or left out
  std::vector<at::Tensor> prev;        // θ_prev, likewise
  std::vector<std::string> requested;  // keys request()ed for the next step, sorted
  std::optional<int64_t> step;         // the latest step() (or collect_captured()); none before
  int64_t rank = 0;                    // the rank and group size it was taken on: the state of a
  int64_t world_size = 1;              // sharded parameter is that rank's shard
};

class Monitor {
 public:
  Monitor(std::vector<std::pair<std::string, at::Tensor>> named_params, MonitorConfig config = {});
  ~Monitor();
  Monitor(const Monitor&) = delete;
  Monitor& operator=(const Monitor&) = delete;

  // named_params: non-empty, unique names, floating tensors on one device (CPU or CUDA).
  // A key is non-empty, has no '/', and is none of the built-in keys ("param_metrics",
  // "grad_hist"), built-in record names ("loss", "grad_norm", "grad_magnitude",
  // "weight_magnitude", "distance", "update_size", "weight_norm", "update_ratio",
  // "nonfinite_count", "grad_hist1d") or other
  // quantities' keys, so that every name in a record is unique; otherwise c10::Error naming it.
  void add_quantity(std::shared_ptr<Quantity> quantity, Schedule schedule = Schedule::every(1));
  void add_sink(Sink sink);
  // A quantity computed by the caller (a Python Quantity): reserves the key with its schedule, so
  // due(key, step) answers for it; its values arrive through step()'s extra_scalars.
  void add_external_quantity(const std::string& key, Schedule schedule = Schedule::every(1));
  // Extra scalars recorded at a step by the caller (e.g. from Python quantities) travel with the
  // step's results: name → 0-d tensor on the parameters' device; a name whose part before any
  // '/' is a built-in record name throws, as does an extra histogram named "grad_hist1d". `grads`, when given, are the
  // parameters' gradients (one per parameter, undefined where none) instead of their .grad():
  // for parameters whose gradient lives elsewhere (the local shards of FSDP's DTensors).
  void step(int64_t step, const at::Tensor& per_sample_losses = {},
            const std::map<std::string, at::Tensor>& extras = {},
            const std::map<std::string, at::Tensor>& extra_scalars = {},
            const std::map<std::string, HistogramInput>& extra_histograms = {},
            const std::vector<at::Tensor>& grads = {});
  // Measures now, outside every schedule (a task boundary, the start or end of an epoch), and
  // records it as step `step`; θ_prev and pending requests are left as they are. `metrics`: the
  // built-in metric names, "grad_hist", "param_metrics" (every built-in metric) and custom
  // quantity keys to measure; none (nullopt): every built-in metric that is on, the histogram when
  // on, and every custom quantity. The gradient metrics (grad_norm, grad_magnitude,
  // nonfinite_count) and the histogram only with `gradients` (the parameters' .grad() are this
  // point's gradients; otherwise they are absent from the record, never stale values);
  // update_size and update_ratio never (they belong to an optimizer step). A name that is
  // unknown, or a metric that is off, throws c10::Error naming it. Not inside a graph capture.
  void measure_now(int64_t step, const at::Tensor& per_sample_losses = {},
                   const std::optional<std::vector<std::string>>& metrics = std::nullopt, bool gradients = false,
                   const std::map<std::string, at::Tensor>& extras = {},
                   const std::map<std::string, at::Tensor>& extra_scalars = {},
                   const std::map<std::string, HistogramInput>& extra_histograms = {},
                   const std::vector<at::Tensor>& grads = {});
  // The per-sample captures (MonitorConfig::per_sample). Inside the model's forward, for each use
  // of a tracked layer, with the layer's name (uses of one name in a step add up as one layer's,
  // cross terms included): returns `output`, and when armed records `input` and watches
  // `output`'s gradient (output must require grad then). A capture of a step that is not due
  // costs nothing. c10::Error naming the argument for bad shapes, or when per_sample is off.
  at::Tensor capture_linear(const std::string& layer, const at::Tensor& input, const at::Tensor& output,
                            bool has_bias);
  at::Tensor capture_conv2d(const std::string& layer, const at::Tensor& input, const at::Tensor& output,
                            std::vector<int64_t> kernel_size, std::vector<int64_t> stride,
                            std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
                            bool has_bias);
  // Whether the next step()'s forward pass is captured (see MonitorConfig::per_sample).
  bool per_sample_armed() const;

  // Makes a quantity due at the next step() (e.g. at a task boundary): "param_metrics" (every
  // built-in metric), a built-in metric's name, "grad_hist", or a custom quantity's key; the
  // request is used up by that step (not by a captured one). An unknown key throws.
  void request(const std::string& key);
  // Whether `key` is computed at `step` (its schedule, or a pending request); "param_metrics":
  // whether any built-in metric is. An unknown key throws.
  bool due(const std::string& key, int64_t step) const;
  // Hands every finished step to the sinks without waiting, in step order, stopping at the
  // first unfinished one; returns how many. Does nothing inside a CUDA graph capture.
  int64_t poll();
  // Waits for every step in flight and hands it to the sinks. Also run by the destructor
  // (errors there are swallowed: destructors must not throw).
  void flush();
  // After replaying a graph that captured step(): queue the captured slot's copy as `step`.
  void collect_captured(int64_t step);

  // The state to save with a checkpoint. init and prev are the Monitor's own tensors, not
  // copies (as at::Module::named_parameters()): save them before the next step() refreshes θ_prev.
  // With param_copies false they are left out (a checkpoint then costs no parameter copies, and
  // a Monitor loading it keeps the θ₀ and θ_prev it took at construction).
  MonitorState state_dict(bool param_copies = true) const;
  // Restores a state_dict(), e.g. after rebuilding the Monitor on a model loaded from a
  // checkpoint: θ₀ and θ_prev are copied in (those the state has and this Monitor tracks), and
  // pending requests are restored. A state of other parameters (names, order or a tensor's
  // shape differ), or one holding sharded parameters' shards from another rank or group size,
  // throws c10::Error naming what differs, before anything changes.
  void load_state_dict(const MonitorState& state);

  const std::vector<std::string>& names() const;
  const MonitorConfig& config() const;
  // Whether this process hands records to the sinks (rank 0, or sinks_on_all_ranks).
  bool writes_records() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Throws c10::Error naming `key`, with `caller` in front, unless it can be a custom quantity's key:
// non-empty, no '/', not a built-in key or record name (Monitor::add_quantity also refuses a key
// already registered).
void check_quantity_key(const std::string& key, const std::string& caller = "trainscope::check_quantity_key");

// File sinks. JSONL: one object per step, {"step": s, "scalars": {"<name>": value, ...},
// "histograms": {"<name>": {"edges": [...], "counts": [...]}}} (NaN and ±Inf written as null; a 2-D
// histogram adds "edges2" and its counts are row-major).
// CSV: long format, a header "step,name,value" (written when the file is empty) then one row per
// scalar, since schedules make the set of names differ from step to step; histograms are not
// written; NaN and ±Inf as nan, inf, -inf. Numbers (both sinks) use the fewest of 15-17
// significant digits that read back exactly.
// Both append and flush after each record; a path that cannot be opened throws c10::Error naming
// `path`.
Sink JsonlSink(const std::string& path);
Sink CsvSink(const std::string& path);

}  // namespace trainscope
