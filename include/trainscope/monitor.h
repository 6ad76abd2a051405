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
// Inside a CUDA graph capture, step() records only device work into a fixed slot; after each
// replay, call collect_captured(step) to queue that step's copy to the host (see the docs).
//
// Memory: θ₀ and θ_prev are one copy of the parameters each (in their own dtype), kept only when
// distance / update_size are tracked (MonitorConfig::track_init / track_prev). The ring holds
// ring_slots × (metrics + histogram bins) float64 values on the device and in pinned memory.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>

namespace trainscope {

// When a quantity is computed: steps are the caller's step numbers (0-based or not, as given).
class Schedule {
 public:
  static Schedule every(int64_t k, int64_t start = 0);      // start, start + k, start + 2k, ...
  static Schedule at(std::vector<int64_t> steps);           // exactly the listed steps
  // About `per_decade` steps per power of ten from `start` (≥ 1): the distinct values of
  // floor(start · 10^(i / per_decade)), i = 0, 1, ... — 1, 2, 3, ..., 10, 12, 15, 19, 25, ...
  static Schedule log_spaced(int64_t per_decade = 10, int64_t start = 1);
  static Schedule on_demand();                              // only after Monitor::request(key)
  // The same from text, for configuration files and the Python package: "every:K" or
  // "every:K:START", "at:S1,S2,...", "log:PER_DECADE" or "log:PER_DECADE:START", "on_demand".
  // Anything else throws c10::Error naming `arg`.
  static Schedule parse(const std::string& spec, const char* arg = "schedule");
  bool due(int64_t step) const;
  std::string describe() const;                             // "every 10 from 0", ...

 private:
  enum class Kind { kEvery, kAt, kLog, kOnDemand };
  Kind kind_ = Kind::kEvery;
  int64_t k_ = 1, start_ = 0;
  std::vector<int64_t> steps_;  // kAt, sorted
};

struct QuantityConfig {
  bool enabled = true;
  Schedule schedule = Schedule::every(1);
};

struct MonitorConfig {
  // loss, grad_norm, grad_magnitude, weight_magnitude, distance, update_size, nonfinite_count;
  // globally, and per parameter tensor when per_tensor.
  QuantityConfig param_metrics;
  QuantityConfig grad_hist;     // the 1-D gradient histogram (SPEC.md §4)
  int64_t nbins = 100;
  double maxval = 0.05;
  bool per_tensor = true;
  bool weights_matrices_only = false;
  bool track_init = true;       // keep θ₀ for distance
  bool track_prev = true;       // keep θ_prev for update_size (refreshed when the next step is due)
  int64_t ring_slots = 64;      // steps in flight before step() waits for the oldest
};

// One finished step, on the host.
struct StepRecord {
  int64_t step = 0;
  // Global values under the metric name ("grad_norm"), per tensor under "<metric>/<name>",
  // custom quantities under their key (or "<key>/<sub-name>").
  std::vector<std::pair<std::string, double>> scalars;
  struct Histogram {
    std::string name;             // "grad_hist1d", or a custom histogram's key
    std::vector<double> edges;    // nbins + 1
    std::vector<int64_t> counts;  // nbins
  };
  std::vector<Histogram> histograms;
};

using Sink = std::function<void(const StepRecord&)>;

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
// that returns device tensors (no host sync): 0-d tensors are scalars, logged as "<key>" for the
// entry named "" or "<key>/<name>" otherwise.
class Quantity {
 public:
  virtual ~Quantity() = default;
  virtual std::string key() const = 0;
  virtual std::map<std::string, at::Tensor> compute(const QuantityContext& context) = 0;
};

class Monitor {
 public:
  Monitor(std::vector<std::pair<std::string, at::Tensor>> named_params, MonitorConfig config = {});
  ~Monitor();
  Monitor(const Monitor&) = delete;
  Monitor& operator=(const Monitor&) = delete;

  // Keys must be unique among built-ins ("param_metrics", "grad_hist") and custom quantities.
  void add_quantity(std::shared_ptr<Quantity> quantity, Schedule schedule = Schedule::every(1));
  void add_sink(Sink sink);
  // A quantity computed by the caller (a Python Quantity): reserves the key with its schedule, so
  // due(key, step) answers for it; its values arrive through step()'s extra_scalars.
  void add_external_quantity(const std::string& key, Schedule schedule = Schedule::every(1));
  // Extra scalars recorded at a step by the caller (e.g. from Python quantities) travel with the
  // step's results: name → 0-d tensor on the parameters' device.
  void step(int64_t step, const at::Tensor& per_sample_losses = {},
            const std::map<std::string, at::Tensor>& extras = {},
            const std::map<std::string, at::Tensor>& extra_scalars = {});
  // Makes an on-demand (or any) quantity due at the next step() (e.g. at a task boundary).
  void request(const std::string& key);
  bool due(const std::string& key, int64_t step) const;
  // Hands every finished step to the sinks without waiting; returns how many.
  int64_t poll();
  // Waits for every step in flight and hands it to the sinks.
  void flush();
  // After replaying a graph that captured step(): queue the captured slot's copy as `step`.
  void collect_captured(int64_t step);

  const std::vector<std::string>& names() const;
  const MonitorConfig& config() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// File sinks. JSONL: one object per step, {"step": s, "scalars": {"<name>": value, ...},
// "histograms": {"<name>": {"edges": [...], "counts": [...]}}} (NaN and ±Inf written as null).
// CSV: long format, a header "step,name,value" then one row per scalar, since schedules make the
// set of names differ from step to step. Both append and flush after each record.
Sink JsonlSink(const std::string& path);
Sink CsvSink(const std::string& path);

}  // namespace trainscope
