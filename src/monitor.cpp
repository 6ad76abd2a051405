// The Monitor: schedules, the per-step launch of the fused parameter pass and custom quantities,
// the device ring of step results with its asynchronous copies to pinned host memory, the hand-
// over of finished steps to sinks, and the file sinks.
#include "trainscope/monitor.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>
#if defined(TRAINSCOPE_WITH_CUDA)
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#endif

#include "src/device_constants.h"
#include "src/nvtx.h"
#include "src/tensor_checks.h"
#include "trainscope/alpha.h"
#include "trainscope/curvature.h"
#include "trainscope/grad_variance.h"
#include "trainscope/param_stats.h"

namespace trainscope {

// ---------------------------------------------------------------------------------------------
// Schedule

namespace {

// floor(start · 10^(i / per_decade)); the relative nudge keeps exact powers (10^(20/10) · 1 =
// 100) from landing just below their integer through rounding in pow.
int64_t log_value(int64_t start, int64_t per_decade, int64_t i) {
  const double v = static_cast<double>(start) *
                   std::pow(10.0, static_cast<double>(i) / static_cast<double>(per_decade));
  return static_cast<int64_t>(std::floor(v * (1.0 + 1e-12)));
}

bool parse_int(const std::string& text, int64_t* out) {
  if (text.empty()) return false;
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(text.c_str(), &end, 10);
  if (errno != 0 || end != text.c_str() + text.size()) return false;
  *out = static_cast<int64_t>(v);
  return true;
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> parts;
  size_t begin = 0;
  while (true) {
    const size_t pos = s.find(sep, begin);
    parts.push_back(s.substr(begin, pos == std::string::npos ? std::string::npos : pos - begin));
    if (pos == std::string::npos) break;
    begin = pos + 1;
  }
  return parts;
}

}  // namespace

Schedule Schedule::every(int64_t k, int64_t start) {
  TORCH_CHECK(k >= 1, "trainscope::Schedule::every: k must be >= 1, got ", k);
  Schedule s;
  s.kind_ = Kind::kEvery;
  s.k_ = k;
  s.start_ = start;
  return s;
}

Schedule Schedule::at(std::vector<int64_t> steps) {
  Schedule s;
  s.kind_ = Kind::kAt;
  std::sort(steps.begin(), steps.end());
  steps.erase(std::unique(steps.begin(), steps.end()), steps.end());
  s.steps_ = std::move(steps);
  return s;
}

Schedule Schedule::log_spaced(int64_t per_decade, int64_t start) {
  TORCH_CHECK(per_decade >= 1, "trainscope::Schedule::log_spaced: per_decade must be >= 1, got ", per_decade);
  TORCH_CHECK(start >= 1, "trainscope::Schedule::log_spaced: start must be >= 1, got ", start);
  Schedule s;
  s.kind_ = Kind::kLog;
  s.k_ = per_decade;
  s.start_ = start;
  return s;
}

Schedule Schedule::on_demand() {
  Schedule s;
  s.kind_ = Kind::kOnDemand;
  return s;
}

Schedule Schedule::parse(const std::string& spec, const char* arg) {
  const std::vector<std::string> parts = split(spec, ':');
  const std::string& kind = parts[0];
  auto bad = [&](const std::string& why) {
    TORCH_CHECK(false, "trainscope::Schedule::parse: ", arg, " = '", spec, "' ", why,
                "; expected every:K, every:K:START, at:S1,S2,..., log:PER_DECADE, "
                "log:PER_DECADE:START or on_demand");
  };
  int64_t a = 0, b = 0;
  if (kind == "every" && (parts.size() == 2 || parts.size() == 3)) {
    if (!parse_int(parts[1], &a) || (parts.size() == 3 && !parse_int(parts[2], &b))) bad("has a bad integer");
    if (a < 1) bad("needs K >= 1");
    return every(a, parts.size() == 3 ? b : 0);
  }
  if (kind == "log" && (parts.size() == 2 || parts.size() == 3)) {
    b = 1;
    if (!parse_int(parts[1], &a) || (parts.size() == 3 && !parse_int(parts[2], &b))) bad("has a bad integer");
    if (a < 1) bad("needs PER_DECADE >= 1");
    if (b < 1) bad("needs START >= 1");
    return log_spaced(a, b);
  }
  if (kind == "at" && parts.size() == 2) {
    std::vector<int64_t> steps;
    if (!parts[1].empty()) {
      for (const std::string& t : split(parts[1], ',')) {
        if (!parse_int(t, &a)) bad("has a bad step '" + t + "'");
        steps.push_back(a);
      }
    }
    return at(std::move(steps));
  }
  if (kind == "on_demand" && parts.size() == 1) return on_demand();
  bad("is not a schedule");
  return on_demand();  // not reached
}

bool Schedule::due(int64_t step) const {
  switch (kind_) {
    case Kind::kEvery:
      return step >= start_ && (step - start_) % k_ == 0;
    case Kind::kAt:
      return std::binary_search(steps_.begin(), steps_.end(), step);
    case Kind::kLog: {
      if (step < start_) return false;
      // The values are non-decreasing in i: look around the i whose value is nearest `step`.
      const double x = static_cast<double>(k_) * std::log10(static_cast<double>(step) / static_cast<double>(start_));
      const int64_t i0 = std::max<int64_t>(0, static_cast<int64_t>(std::floor(x)) - 2);
      for (int64_t i = i0; i <= i0 + 5; ++i) {
        const int64_t v = log_value(start_, k_, i);
        if (v == step) return true;
        if (v > step) break;
      }
      return false;
    }
    case Kind::kOnDemand:
      return false;
  }
  return false;
}

std::string Schedule::describe() const {
  std::ostringstream os;
  switch (kind_) {
    case Kind::kEvery: os << "every " << k_ << " from " << start_; break;
    case Kind::kAt: {
      os << "at steps ";
      if (steps_.empty()) os << "(none)";
      for (size_t i = 0; i < steps_.size(); ++i) os << (i ? ", " : "") << steps_[i];
      break;
    }
    case Kind::kLog: os << "log-spaced, " << k_ << " per decade from " << start_; break;
    case Kind::kOnDemand: os << "on demand"; break;
  }
  return os.str();
}

// ---------------------------------------------------------------------------------------------
// Monitor

namespace {

constexpr const char* kParamMetricsKey = "param_metrics";
constexpr const char* kGradHistKey = "grad_hist";
constexpr const char* kGradHistName = "grad_hist1d";
constexpr const char* kPerSampleKey = "per_sample";
constexpr const char* kPerSampleHistKey = "per_sample_hist";
constexpr const char* kPerSampleHistName = "per_sample_grad_hist1d";
constexpr const char* kGradVarianceKey = "grad_variance";
constexpr const char* kAlphaKey = "alpha";
constexpr const char* kCurvatureKey = "curvature";

// The built-in scalar metrics of a record, one bit each in a step's due set: the Metric columns
// (bit c for Metric c), then the non-finite gradient count and the loss. Record order is bit order
// (the loss first).
constexpr int kNonfiniteBit = static_cast<int>(kNumMetrics);
constexpr int kLossBit = kNonfiniteBit + 1;
constexpr int kNumBuiltinBits = kLossBit + 1;
constexpr uint32_t bit(int b) { return 1u << b; }
constexpr uint32_t bit(Metric m) { return 1u << static_cast<int>(m); }
// What needs the gradients, the parameters, θ₀ and θ_prev.
constexpr uint32_t kGradBits = bit(Metric::kGradNorm) | bit(Metric::kGradMagnitude) | bit(kNonfiniteBit);
constexpr uint32_t kInitBits = bit(Metric::kDistance);
constexpr uint32_t kPrevBits = bit(Metric::kUpdateSize) | bit(Metric::kUpdateRatio);
constexpr uint32_t kParamBits = bit(Metric::kWeightMagnitude) | bit(Metric::kWeightNorm) | kInitBits | kPrevBits;

std::string builtin_metric_name(int b) {
  if (b == kNonfiniteBit) return "nonfinite_count";
  if (b == kLossBit) return "loss";
  return metric_name(static_cast<Metric>(b));
}

// The bit of a built-in metric name, or -1.
int builtin_metric_bit(const std::string& name) {
  for (int b = 0; b < kNumBuiltinBits; ++b) {
    if (name == builtin_metric_name(b)) return b;
  }
  return -1;
}

// Every built-in metric name, for messages: "loss, grad_norm, ...".
std::string builtin_metric_names() {
  std::string out = "loss";
  for (int b = 0; b < kLossBit; ++b) out += ", " + builtin_metric_name(b);
  return out;
}

// The names the built-ins log under; a custom key or extra scalar must not take one.
bool builtin_record_name(const std::string& name) {
  return name == kGradHistName || builtin_metric_bit(name) >= 0;
}

// The part of a record name before its first '/' ("grad_norm" of "grad_norm/fc1.weight").
std::string head_of(const std::string& name) { return name.substr(0, name.find('/')); }

// Where a step's values sit in its slot: the scalar names in blocks (the built-in blocks are
// shared between steps, so a step costs no string copies), and the histograms after them.
struct Layout {
  std::vector<std::shared_ptr<const std::vector<std::string>>> blocks;
  int64_t num_scalars = 0;
  // Histograms after the scalars, in order, each numel int64 values.
  struct Hist {
    std::string name;
    std::shared_ptr<const std::vector<double>> edges, edges2;  // edges2 empty for 1-D
    int64_t numel;
  };
  std::vector<Hist> hists;

  void add(std::shared_ptr<const std::vector<std::string>> names) {
    num_scalars += static_cast<int64_t>(names->size());
    blocks.push_back(std::move(names));
  }
  int64_t size() const {
    int64_t n = num_scalars;
    for (const Hist& h : hists) n += h.numel;
    return n;
  }
};

// The event that marks a step's copy to pinned memory done, recorded on the current stream of a
// CUDA device. A CPU copy is done when it returns: no event, and a CPU-only build has none to make.
#if defined(TRAINSCOPE_WITH_CUDA)
class CopyEvent {
 public:
  void record(const at::Device& device) {
    if (!event_) event_ = std::make_unique<at::cuda::CUDAEvent>();
    event_->record(at::cuda::getCurrentCUDAStream(device.index()));
  }
  bool query() const { return event_->query(); }
  void synchronize() const { event_->synchronize(); }

 private:
  std::unique_ptr<at::cuda::CUDAEvent> event_;
};
#else
class CopyEvent {
 public:
  void record(const at::Device&) { TORCH_INTERNAL_ASSERT(false, "a CPU-only build records no CUDA event"); }
  bool query() const { return true; }
  void synchronize() const {}
};
#endif

struct Slot {
  at::Tensor device;  // float64 [capacity] on the parameters' device; histograms as int64 bits
  at::Tensor host;    // float64 [capacity], pinned for CUDA
  CopyEvent event;
};

struct InFlight {
  int64_t step;
  int64_t slot;
  std::shared_ptr<const Layout> layout;
  bool has_event;
};

}  // namespace

struct Monitor::Impl {
  MonitorConfig cfg;
  std::vector<std::string> names;
  std::vector<at::Tensor> params;
  std::vector<at::Tensor> init, prev;       // θ₀, θ_prev (empty when not tracked)
  std::vector<at::Tensor> zero_grads;       // stand-ins for missing gradients, made when needed
  at::Device device{at::kCPU};

  struct Custom {
    std::string key;
    std::shared_ptr<Quantity> quantity;  // null for an external (caller-computed) quantity
    Schedule schedule;
  };
  std::vector<Custom> customs;
  std::set<std::string> requested;

  // The per-sample family (MonitorConfig::per_sample): this step's captures, one entry per layer
  // name in the order first captured, each holding its uses.
  struct PerSampleLayer {
    std::string name;
    bool conv = false;
    bool has_bias = true;
    std::vector<int64_t> kernel_size, stride, padding, dilation;
    int64_t groups = 1;
    std::vector<at::Tensor> inputs;
    std::vector<OutputGradCapture> grads;
  };
  std::vector<PerSampleLayer> ps_layers;
  std::shared_ptr<const std::vector<std::string>> ps_names;
  std::shared_ptr<const std::vector<std::string>> alpha_names =
      std::make_shared<const std::vector<std::string>>(std::vector<std::string>{kAlphaKey});
  std::optional<int64_t> last_step;  // the latest step() or collect_captured()
  std::vector<Sink> sinks;

  // Each built-in metric's switch and schedule (config.metrics, else config.param_metrics), and
  // whether it can be computed at all (off, or θ₀ / θ_prev not kept: never).
  QuantityConfig metric_cfg[kNumBuiltinBits];
  uint32_t available = 0;
  // Built-in scalar names of a set of due metrics, made once per set.
  std::map<uint32_t, std::shared_ptr<const std::vector<std::string>>> builtin_names;
  std::shared_ptr<const std::vector<double>> hist_edges, no_edges;

  std::vector<Slot> ring;
  int64_t next_slot = 0;
  std::deque<InFlight> in_flight;

  Slot capture;  // device part only
  std::shared_ptr<const Layout> captured_layout;

  // Parameter metrics go through the cross-rank path (distributed.h).
  bool across_ranks() const { return cfg.group.is_distributed() || !cfg.layouts.empty(); }
  bool writes_records() const { return !cfg.group.is_distributed() || cfg.group.rank() == 0 || cfg.sinks_on_all_ranks; }

  bool builtin_due(const QuantityConfig& q, const char* key, int64_t step) const {
    return q.enabled && (q.schedule.due(step) || requested.count(key) > 0);
  }

  // The built-in metrics due at `step`: each on its schedule, or requested by its name or as
  // "param_metrics" (every metric).
  uint32_t metrics_due(int64_t step) const {
    const bool all = requested.count(kParamMetricsKey) > 0;
    uint32_t due = 0;
    for (int b = 0; b < kNumBuiltinBits; ++b) {
      if (!(available & bit(b))) continue;
      if (all || metric_cfg[b].schedule.due(step) || requested.count(builtin_metric_name(b)) > 0) due |= bit(b);
    }
    return due;
  }

  // The record names of the built-in metrics in `due` (the loss only when losses were given).
  std::shared_ptr<const std::vector<std::string>> names_of(uint32_t due) {
    auto it = builtin_names.find(due);
    if (it != builtin_names.end()) return it->second;
    auto out = std::make_shared<std::vector<std::string>>();
    if (due & bit(kLossBit)) out->push_back("loss");
    for (int b = 0; b < kLossBit; ++b) {
      if (due & bit(b)) out->push_back(builtin_metric_name(b));
    }
    if (cfg.per_tensor) {
      for (int b = 0; b < kLossBit; ++b) {
        if (!(due & bit(b))) continue;
        for (const std::string& n : names) out->push_back(builtin_metric_name(b) + "/" + n);
      }
    }
    builtin_names.emplace(due, out);
    return out;
  }

  const Custom* find_custom(const std::string& key) const {
    for (const Custom& c : customs) {
      if (c.key == key) return &c;
    }
    return nullptr;
  }

  bool known(const std::string& key) const {
    return key == kParamMetricsKey || key == kGradHistKey || builtin_metric_bit(key) >= 0 ||
           (key == kPerSampleKey && cfg.per_sample.enabled) ||
           (key == kPerSampleHistKey && cfg.per_sample_hist.enabled) ||
           (key == kGradVarianceKey && cfg.grad_variance.enabled) || (key == kAlphaKey && cfg.alpha.enabled) ||
           (key == kCurvatureKey && cfg.curvature.enabled) || find_custom(key) != nullptr;
  }

  bool per_sample_stats_due(int64_t step) const {
    return cfg.per_sample.enabled && (cfg.per_sample.schedule.due(step) || requested.count(kPerSampleKey) > 0);
  }
  bool per_sample_hist_due(int64_t step) const {
    return cfg.per_sample_hist.enabled &&
           (cfg.per_sample_hist.schedule.due(step) || requested.count(kPerSampleHistKey) > 0);
  }
  bool grad_variance_due(int64_t step) const {
    return cfg.grad_variance.enabled &&
           (cfg.grad_variance.schedule.due(step) || requested.count(kGradVarianceKey) > 0);
  }
  bool curvature_due(int64_t step) const {
    return cfg.curvature.enabled && (cfg.curvature.schedule.due(step) || requested.count(kCurvatureKey) > 0);
  }

  // The curvature family from config.curvature_loss (called here only): its values and names.
  std::pair<at::Tensor, std::shared_ptr<std::vector<std::string>>> curvature_values() {
    const CurvatureStats c = curvature_stats(cfg.curvature_loss, params, cfg.curvature_options);
    auto names = std::make_shared<std::vector<std::string>>();
    std::vector<at::Tensor> values;
    auto add = [&](const char* name, const at::Tensor& v) {
      names->push_back(std::string(kCurvatureKey) + "/" + name);
      values.push_back(v.reshape({1}).to(at::kDouble));
    };
    if (cfg.curvature_options.max_ev) add("hess_max_ev", c.hess_max_ev);
    if (cfg.curvature_options.diag) {
      add("hess_trace", c.hess_trace);
      if (cfg.curvature_options.method == CurvatureMethod::kHutchinson) add("hess_trace_stderr", c.hess_trace_stderr);
      add("tic_diag", c.tic_diag);
      add("tic_trace", c.tic_trace);
    }
    return {at::cat(values).to(device), names};
  }

  // alpha: a due step is a start point, the next its end point.
  bool alpha_due(int64_t step) const {
    return cfg.alpha.enabled && (cfg.alpha.schedule.due(step) || requested.count(kAlphaKey) > 0);
  }
  bool alpha_end(int64_t step) const { return alpha_start && *alpha_start == step - 1; }
  // Whether the step's forward pass is captured: a quantity of the captures is due.
  bool per_sample_due(int64_t step) const {
    return per_sample_stats_due(step) || per_sample_hist_due(step) || grad_variance_due(step) || alpha_due(step) ||
           alpha_end(step);
  }
  bool captures_on() const {
    return cfg.per_sample.enabled || cfg.per_sample_hist.enabled || cfg.grad_variance.enabled || cfg.alpha.enabled;
  }

  // alpha's state: θ at the start step (copied when the captures are armed for it), and the
  // pending start: its step, its update d (one tensor per parameter), t = ‖d‖ and its moments.
  std::vector<at::Tensor> alpha_theta;
  std::optional<int64_t> alpha_start;
  std::vector<at::Tensor> alpha_dir;
  at::Tensor alpha_t, alpha_start_moments;

  void alpha_snapshot() {
    alpha_theta.clear();
    for (const at::Tensor& p : params) alpha_theta.push_back(p.detach().clone());
  }

  // The index of `name` among the parameters, or -1.
  int64_t param_index(const std::string& name) const {
    const auto it = std::find(names.begin(), names.end(), name);
    return it == names.end() ? -1 : static_cast<int64_t>(it - names.begin());
  }

  // Σ over the captured layers of gᵢ·D [B] float64, D given per parameter (index-aligned).
  at::Tensor projections_of_captures(const std::vector<at::Tensor>& dir) {
    at::Tensor total;
    for (PerSampleLayer& l : ps_layers) {
      const auto [xs, dys] = captured_uses(l, /*per_sample_losses=*/true);
      if (xs.empty()) continue;
      const int64_t w = param_index(l.name + ".weight"), b = param_index(l.name + ".bias");
      TORCH_CHECK(w >= 0, "trainscope::Monitor: alpha projects the update on the captured layer '", l.name,
                  "', whose weight must be the parameter '", l.name, ".weight' (name the capture as the module)");
      const at::Tensor bias = l.has_bias && b >= 0 ? dir[b] : at::Tensor();
      const at::Tensor p = l.conv ? conv2d_per_sample_projections(xs, dys, dir[w], bias, l.stride, l.padding,
                                                                  l.dilation, l.groups)
                                  : linear_per_sample_projections(xs, dys, dir[w], bias);
      total = total.defined() ? total + p : p;
    }
    return total;
  }

  // alpha at `step` (step() only): the end point of the pending start (its value, or undefined),
  // then this step as a start point when due. Losses are needed; without them nothing is kept.
  at::Tensor alpha_of_captures(int64_t step, bool start_due, const at::Tensor& losses) {
    at::Tensor value;
    const bool end = alpha_end(step);
    std::vector<at::Tensor> theta;
    theta.swap(alpha_theta);
    if (!losses.defined() || losses.numel() == 0 || ps_layers.empty()) {
      alpha_start.reset();
      return value;
    }
    const at::Tensor l = losses.detach().reshape({-1});
    if (end) {
      const at::Tensor proj = projections_of_captures(alpha_dir);
      if (proj.defined()) {
        value = alpha_from_moments(alpha_t, alpha_start_moments, alpha_point_moments(l, proj, alpha_t)).reshape({1});
      }
    }
    alpha_start.reset();
    alpha_dir.clear();
    if (start_due && !theta.empty()) {
      std::vector<at::Tensor> d;
      at::Tensor sq = at::zeros({}, l.options().dtype(at::kDouble));
      for (size_t k = 0; k < params.size(); ++k) {
        d.push_back(params[k].detach() - theta[k]);
        sq = sq + d.back().to(at::kDouble).square().sum();
      }
      const at::Tensor proj = projections_of_captures(d);
      if (proj.defined()) {
        alpha_t = sq.sqrt();
        alpha_start_moments = alpha_point_moments(l, proj, alpha_t);
        alpha_dir = std::move(d);
        alpha_start = step;
      }
    }
    return value;
  }

  // Armed for the step after the latest one (step 0 before the first).
  bool per_sample_armed() const { return per_sample_due(last_step ? *last_step + 1 : 0); }

  // The capture entry of `layer`, made at its first use in the step; a later use must be of the
  // same kind and geometry.
  PerSampleLayer& ps_layer(const char* op, const std::string& layer, const PerSampleLayer& like) {
    for (PerSampleLayer& l : ps_layers) {
      if (l.name != layer) continue;
      TORCH_CHECK(l.conv == like.conv && l.has_bias == like.has_bias && l.kernel_size == like.kernel_size &&
                      l.stride == like.stride && l.padding == like.padding && l.dilation == like.dilation &&
                      l.groups == like.groups,
                  op, ": layer '", layer, "' was captured earlier in this step as another kind or geometry; "
                  "every use of one layer must describe the same layer");
      return l;
    }
    ps_layers.push_back(like);
    ps_layers.back().name = layer;
    return ps_layers.back();
  }

  at::Tensor capture_layer(const char* op, const std::string& layer, const at::Tensor& input, const at::Tensor& output,
                     const PerSampleLayer& like) {
    TORCH_CHECK(captures_on(), op,
                ": the per-sample family is off (MonitorConfig::per_sample, per_sample_hist and grad_variance)");
    TORCH_CHECK(!layer.empty(), op, ": layer is empty; name the layer (its uses add up by name)");
    TORCH_CHECK(input.defined(), op, ": input is an undefined tensor");
    TORCH_CHECK(output.defined(), op, ": output is an undefined tensor");
    if (!per_sample_armed() || !c10::GradMode::is_enabled()) return output;
    TORCH_CHECK(input.size(0) == output.size(0), op, ": input has ", input.size(0), " samples but output has ",
                output.size(0));
    PerSampleLayer& l = ps_layer(op, layer, like);
    l.inputs.push_back(input.detach());
    l.grads.emplace_back();
    return l.grads.back().watch(output);
  }

  // The inputs and output gradients of a layer's uses whose output reached the loss (a use that
  // did not adds nothing). per_sample_losses: with per_sample_loss_mean, δ scaled back by B, so
  // that the gradients formed are those of the per-sample losses ℓᵢ.
  std::pair<std::vector<at::Tensor>, std::vector<at::Tensor>> captured_uses(PerSampleLayer& l,
                                                                            bool per_sample_losses) const {
    std::vector<at::Tensor> xs, dys;
    for (size_t u = 0; u < l.inputs.size(); ++u) {
      if (!l.grads[u].has_grad()) continue;
      xs.push_back(l.inputs[u]);
      const bool scale = per_sample_losses && cfg.per_sample_loss_mean;
      dys.push_back(scale ? l.grads[u].grad() * static_cast<double>(l.inputs[u].size(0)) : l.grads[u].grad());
    }
    return {xs, dys};
  }

  // The six statistics of the step's captures ([6] float64), or undefined when nothing reached
  // the loss. Never throws for numerical reasons: a batch of one gives NaN.
  at::Tensor per_sample_stats_of_captures() {
    std::optional<PerSampleParts> parts;
    for (PerSampleLayer& l : ps_layers) {
      const auto [xs, dys] = captured_uses(l, /*per_sample_losses=*/false);
      if (xs.empty()) continue;
      if (xs[0].size(0) < 2) {
        return at::full({kNumPerSampleStats}, std::numeric_limits<double>::quiet_NaN(), device_opt());
      }
      PerSampleParts p = l.conv ? conv2d_per_sample_parts(xs, dys, l.kernel_size, l.stride, l.padding, l.dilation,
                                                          l.groups, l.has_bias, cfg.per_sample_method)
                                : linear_per_sample_parts(xs, dys, l.has_bias, cfg.per_sample_method);
      if (parts) {
        *parts += p;
      } else {
        parts = std::move(p);
      }
    }
    if (!parts) return at::Tensor();
    if (cfg.per_sample_loss_mean) {  // δ of a mean-reduced loss is ∇ℓᵢ / B: the parts scale by 1/B²
      const double b2 = static_cast<double>(parts->batch_size()) * static_cast<double>(parts->batch_size());
      parts->sq_norms = parts->sq_norms * b2;
      parts->dots = parts->dots * b2;
      parts->mean_sq_norm = parts->mean_sq_norm * b2;
    }
    return per_sample_stats_from_parts(*parts).to(at::kDouble);
  }

  // The per-sample gradient histogram of the step's captures (int64 [nbins], on the axis of the
  // gradient histogram), or undefined when nothing reached the loss. The counts are of ∇ℓᵢ: with
  // per_sample_loss_mean the output gradients are scaled back by B.
  at::Tensor per_sample_hist_of_captures() {
    at::Tensor hist;
    for (PerSampleLayer& l : ps_layers) {
      const auto [xs, dys] = captured_uses(l, /*per_sample_losses=*/true);
      if (xs.empty()) continue;
      const at::Tensor h = l.conv ? conv2d_per_sample_grad_hist1d(xs, dys, l.kernel_size, l.stride, l.padding,
                                                                  l.dilation, l.groups, l.has_bias, cfg.nbins,
                                                                  cfg.maxval)
                                  : linear_per_sample_grad_hist1d(xs, dys, l.has_bias, cfg.nbins, cfg.maxval);
      hist = hist.defined() ? hist.add_(h) : h;
    }
    return hist;
  }

  // The per-element gradient variance family of the step's captures (SPEC.md §6): its values and
  // their names ("grad_variance/<quantity>", per tensor ".../<layer>.weight|bias"), or nothing
  // when nothing reached the loss. cabs only with the losses and config.grad_variance_lr.
  std::pair<at::Tensor, std::shared_ptr<std::vector<std::string>>> grad_variance_of_captures(const at::Tensor& losses) {
    std::vector<at::Tensor> sums, sqs;
    std::vector<std::string> tensors;
    int64_t batch = 0;
    for (PerSampleLayer& l : ps_layers) {
      const auto [xs, dys] = captured_uses(l, /*per_sample_losses=*/true);
      if (xs.empty()) continue;
      batch = xs[0].size(0);
      const PerSampleMoments m = l.conv ? conv2d_per_sample_grad_moments(xs, dys, l.kernel_size, l.stride, l.padding,
                                                                         l.dilation, l.groups, l.has_bias)
                                        : linear_per_sample_grad_moments(xs, dys, l.has_bias);
      sums.push_back(m.weight_sum);
      sqs.push_back(m.weight_sq_sum);
      tensors.push_back(l.name + ".weight");
      if (m.bias_sum.defined()) {
        sums.push_back(m.bias_sum);
        sqs.push_back(m.bias_sq_sum);
        tensors.push_back(l.name + ".bias");
      }
    }
    if (sums.empty() || batch < 1) return {at::Tensor(), nullptr};
    const double lr = cfg.grad_variance_lr ? cfg.grad_variance_lr() : std::numeric_limits<double>::quiet_NaN();
    const bool cabs = losses.defined() && losses.numel() > 0 && !std::isnan(lr);
    const at::Tensor rows = grad_variance_stats(sums, sqs, batch, cabs ? losses.detach().to(at::kDouble).mean() : at::Tensor(), lr);
    const int64_t nq = cabs ? kNumGradVarianceStats : kNumGradVarianceStats - 1;  // cabs is the last column
    auto names = std::make_shared<std::vector<std::string>>();
    std::vector<at::Tensor> values{rows[0].narrow(0, 0, nq)};
    for (int64_t q = 0; q < nq; ++q) {
      names->push_back(std::string(kGradVarianceKey) + "/" + grad_variance_stat_name(static_cast<GradVarianceStat>(q)));
    }
    if (cfg.per_tensor) {
      for (int64_t q = 0; q < nq; ++q) {
        values.push_back(rows.narrow(0, 1, rows.size(0) - 1).select(1, q));
        for (const std::string& t : tensors) {
          names->push_back(std::string(kGradVarianceKey) + "/" +
                           grad_variance_stat_name(static_cast<GradVarianceStat>(q)) + "/" + t);
        }
      }
    }
    return {at::cat(values), names};
  }

  void check_new_key(const char* op, const std::string& key) const {
    check_quantity_key(key, std::string("trainscope::Monitor::") + op);
    TORCH_CHECK(!known(key), "trainscope::Monitor::", op, ": key '", key,
                "' is already registered; every quantity needs a unique key");
  }

  // Grows `t` to hold `n` values; only called on a slot that has no copy in flight.
  static void ensure(at::Tensor& t, int64_t n, const at::TensorOptions& opt) {
    if (t.defined() && t.numel() >= n) return;
    t = at::empty({std::max<int64_t>(n, 1)}, opt);
  }

  at::TensorOptions device_opt() const { return at::TensorOptions().dtype(at::kDouble).device(device); }
  at::TensorOptions host_opt() const {
    return at::TensorOptions().dtype(at::kDouble).device(at::kCPU).pinned_memory(device.is_cuda());
  }

  std::vector<at::Tensor> current_grads(const std::vector<at::Tensor>& given) {
    std::vector<at::Tensor> grads(params.size());
    bool any = false;
    for (size_t i = 0; i < params.size(); ++i) {
      grads[i] = given.empty() ? params[i].grad() : given[i];
      any = any || grads[i].defined();
    }
    // Across ranks the lists must agree on every rank (a rank whose FSDP shards are all empty
    // has no gradients while the others have): there missing gradients are always zeros.
    if (!any && !across_ranks()) return {};
    for (size_t i = 0; i < params.size(); ++i) {
      if (grads[i].defined()) continue;
      if (!zero_grads[i].defined()) zero_grads[i] = at::zeros_like(params[i], at::MemoryFormat::Contiguous);
      grads[i] = zero_grads[i];
    }
    return grads;
  }

  std::vector<at::Tensor> detached_params() const {
    std::vector<at::Tensor> out;
    out.reserve(params.size());
    for (const at::Tensor& p : params) out.push_back(p.detach());
    return out;
  }

  at::Tensor as_scalar(const at::Tensor& t, const std::string& name, const char* what) const {
    TORCH_CHECK(t.defined(), "trainscope::Monitor::step: ", what, " '", name, "' is an undefined tensor");
    TORCH_CHECK(t.numel() == 1, "trainscope::Monitor::step: ", what, " '", name,
                "' must be a one-element tensor, got shape ", t.sizes());
    TORCH_CHECK(t.device() == device, "trainscope::Monitor::step: ", what, " '", name, "' is on ", t.device(),
                " but the parameters are on ", device, "; return device tensors (no host copies)");
    TORCH_CHECK(!t.is_complex(), "trainscope::Monitor::step: ", what, " '", name, "' is complex");
    return t.detach().reshape({1}).to(at::kDouble);
  }

  // What one record holds: the built-in metrics (bits), the histogram, the custom quantities
  // (by index), whether the parameters' gradients belong to this point, and whether θ_prev then
  // follows the parameters (step(): yes; measure_now(): untouched).
  struct Due {
    uint32_t metrics = 0;
    bool hist = false;
    std::vector<bool> customs;
    bool per_sample = false;
    bool per_sample_hist = false;
    bool grad_variance = false;
    bool alpha = false;  // a start point
    bool curvature = false;
    bool gradients = true;
    bool refresh_prev = true;
  };

  Due due_at(int64_t step) const {
    Due d;
    d.metrics = metrics_due(step);
    d.hist = builtin_due(cfg.grad_hist, kGradHistKey, step);
    for (const Custom& c : customs) d.customs.push_back(c.schedule.due(step) || requested.count(c.key) > 0);
    d.per_sample = per_sample_stats_due(step);
    d.per_sample_hist = per_sample_hist_due(step);
    d.grad_variance = grad_variance_due(step);
    d.alpha = alpha_due(step);
    d.curvature = curvature_due(step);
    return d;
  }

  // Computes the step's values into `dst` (a device buffer, grown as needed) and returns where
  // they sit. Only device work; nothing here waits for the GPU.
  std::shared_ptr<const Layout> compute(int64_t step, const Due& due, const at::Tensor& losses,
                                        const std::map<std::string, at::Tensor>& extras,
                                        const std::map<std::string, at::Tensor>& extra_scalars,
                                        const std::map<std::string, HistogramInput>& extra_histograms,
                                        const std::vector<at::Tensor>& given_grads, at::Tensor& dst) {
    uint32_t mask = due.metrics;
    if (!losses.defined()) mask &= ~bit(kLossBit);
    if (!due.gradients) mask &= ~kGradBits;
    const bool hist_due = due.hist && due.gradients;
    auto layout = std::make_shared<Layout>();
    std::vector<at::Tensor> pieces;

    // Only the arrays the due metrics need are read: a metric that is not due costs nothing.
    const std::vector<at::Tensor> grads =
        ((mask & kGradBits) || hist_due) ? current_grads(given_grads) : std::vector<at::Tensor>{};
    const std::vector<at::Tensor> ps = detached_params();
    const std::vector<at::Tensor> none;
    const bool pass_params = (mask & kParamBits) != 0;
    const bool pass_prev = (mask & kPrevBits) && !prev.empty();
    const bool hist = hist_due && !grads.empty();
    ParamStatsOptions o;
    o.histogram = hist;
    o.nbins = cfg.nbins;
    o.maxval = cfg.maxval;
    o.weights_matrices_only = cfg.weights_matrices_only;
    o.refresh_prev = pass_prev && due.refresh_prev;
    ParamStats s;
    at::Tensor loss_sums;  // [Σℓ, count] across ranks, riding in the parameter metrics' all-reduce
    if (!grads.empty() || pass_params) {
      const auto& p = pass_params ? ps : none;
      const auto& p0 = (mask & kInitBits) ? init : none;
      const auto& pp = pass_prev ? prev : none;
      if (across_ranks()) {
        o.float64_results = true;
        if (mask & bit(kLossBit)) {
          loss_sums = at::stack({losses.detach().sum(c10::nullopt, false, at::kDouble),
                                 at::full({}, static_cast<double>(losses.numel()), device_opt())});
        }
        s = param_stats_across_ranks(grads, p, p0, pp, cfg.layouts, cfg.group, o,
                                     loss_sums.defined() ? &loss_sums : nullptr);
      } else {
        s = param_stats(grads, p, p0, pp, o);
      }
    } else if (mask) {
      // Only gradient metrics due and no gradient anywhere: NaN, and no non-finite element.
      const auto nan = std::numeric_limits<double>::quiet_NaN();
      const auto n = static_cast<int64_t>(params.size());
      s.metrics = at::full({kNumMetrics}, nan, device_opt());
      s.per_tensor = at::full({n, kNumMetrics}, nan, device_opt());
      s.nonfinite = at::zeros({}, device_opt().dtype(at::kLong));
      s.nonfinite_per_tensor = at::zeros({n}, device_opt().dtype(at::kLong));
    }
    if (mask) {
      layout->add(names_of(mask));
      if (mask & bit(kLossBit)) {
        if (loss_sums.defined()) {
          pieces.push_back((loss_sums[0] / loss_sums[1]).reshape({1}));
        } else if (across_ranks()) {
          pieces.push_back(loss_across_ranks(losses.detach(), cfg.group).reshape({1}).to(at::kDouble));
        } else {
          pieces.push_back(loss(losses.detach()).reshape({1}).to(at::kDouble));
        }
      }
      const at::Tensor metrics = s.metrics.to(at::kDouble);
      for (int64_t c = 0; c < kNumMetrics; ++c) {
        if (mask & bit(static_cast<int>(c))) pieces.push_back(metrics.narrow(0, c, 1));
      }
      if (mask & bit(kNonfiniteBit)) pieces.push_back(s.nonfinite.reshape({1}).to(at::kDouble));
      if (cfg.per_tensor) {
        const at::Tensor pt = s.per_tensor.to(at::kDouble);
        for (int64_t c = 0; c < kNumMetrics; ++c) {
          if (mask & bit(static_cast<int>(c))) pieces.push_back(pt.select(1, c));
        }
        if (mask & bit(kNonfiniteBit)) pieces.push_back(s.nonfinite_per_tensor.to(at::kDouble));
      }
    }
    at::Tensor hist_counts;
    if (hist) hist_counts = s.hist;
    if (hist_due && !hist_counts.defined()) {
      hist_counts = at::zeros({cfg.nbins}, at::TensorOptions().dtype(at::kLong).device(device));
    }
    if (due.refresh_prev && !o.refresh_prev && !prev.empty()) at::_foreach_copy_(prev, ps);

    if (due.per_sample) {
      const at::Tensor stats = per_sample_stats_of_captures();
      if (stats.defined()) {
        pieces.push_back(stats);
        layout->add(ps_names);
      }
    }
    if (due.grad_variance) {
      auto [values, gv_names] = grad_variance_of_captures(losses);
      if (values.defined()) {
        pieces.push_back(values);
        layout->add(std::move(gv_names));
      }
    }
    if (cfg.alpha.enabled && due.refresh_prev && (due.alpha || alpha_end(step))) {  // step() only
      const at::Tensor a = alpha_of_captures(step, due.alpha, losses);
      if (a.defined()) {
        pieces.push_back(a.to(at::kDouble));
        layout->add(alpha_names);
      }
    }
    if (due.curvature && due.refresh_prev) {  // step() only
      auto [values, names] = curvature_values();
      pieces.push_back(values);
      layout->add(std::move(names));
    }
    const at::Tensor ps_hist = due.per_sample_hist ? per_sample_hist_of_captures() : at::Tensor();
    if (due.refresh_prev) ps_layers.clear();  // step(): a step's captures serve that step only

    if (!customs.empty()) {
      QuantityContext ctx;
      ctx.step = step;
      ctx.names = &names;
      ctx.params = &params;
      ctx.grads.reserve(params.size());
      for (const at::Tensor& p : params) ctx.grads.push_back(p.grad());
      ctx.losses = losses;
      ctx.extras = &extras;
      for (size_t i = 0; i < customs.size(); ++i) {
        const Custom& c = customs[i];
        if (!c.quantity || !due.customs[i]) continue;
        const std::map<std::string, at::Tensor> values = c.quantity->compute(ctx);
        auto block = std::make_shared<std::vector<std::string>>();
        for (const auto& [sub, t] : values) {
          const std::string name = sub.empty() ? c.key : c.key + "/" + sub;
          pieces.push_back(as_scalar(t, name, "quantity"));
          block->push_back(name);
        }
        layout->add(std::move(block));
      }
    }
    if (!extra_scalars.empty()) {
      auto block = std::make_shared<std::vector<std::string>>();
      for (const auto& [name, t] : extra_scalars) {
        TORCH_CHECK(!builtin_record_name(head_of(name)), "trainscope::Monitor::step: extra scalar '", name,
                    "' would take the name of a built-in record (", head_of(name), "); choose another name");
        pieces.push_back(as_scalar(t, name, "extra scalar"));
        block->push_back(name);
      }
      layout->add(std::move(block));
    }

    std::vector<at::Tensor> hist_values;
    if (hist_counts.defined()) {
      layout->hists.push_back({kGradHistName, hist_edges, no_edges, cfg.nbins});
      hist_values.push_back(hist_counts);
    }
    if (ps_hist.defined()) {
      layout->hists.push_back({kPerSampleHistName, hist_edges, no_edges, cfg.nbins});
      hist_values.push_back(ps_hist);
    }
    for (const auto& [name, h] : extra_histograms) {
      TORCH_CHECK(name != kGradHistName, "trainscope::Monitor::step: extra_histograms has the name '", name,
                  "' of the built-in gradient histogram; choose another name");
      TORCH_CHECK(!(ps_hist.defined() && name == kPerSampleHistName), "trainscope::Monitor::step: extra_histograms "
                  "has the name '", name, "' of the per-sample histogram (per_sample_hist); choose another name");
      hist_values.push_back(checked_histogram(name, h));
      layout->hists.push_back({name, std::make_shared<const std::vector<double>>(h.edges),
                               h.edges2.empty() ? no_edges : std::make_shared<const std::vector<double>>(h.edges2),
                               hist_values.back().numel()});
    }

    ensure(dst, layout->size(), device_opt());
    if (!pieces.empty()) {
      at::Tensor out = dst.narrow(0, 0, layout->num_scalars);
      at::cat_out(out, pieces);
    }
    int64_t offset = layout->num_scalars;
    for (const at::Tensor& counts : hist_values) {
      dst.narrow(0, offset, counts.numel()).view(at::kLong).copy_(counts.reshape({-1}));
      offset += counts.numel();
    }
    return layout;
  }

  // An extra histogram's counts as int64, after checking them against their edges.
  at::Tensor checked_histogram(const std::string& name, const HistogramInput& h) const {
    const char* op = "trainscope::Monitor::step: extra_histograms";
    TORCH_CHECK(h.counts.defined(), op, " '", name, "': counts is an undefined tensor");
    TORCH_CHECK(h.counts.device() == device, op, " '", name, "': counts is on ", h.counts.device(),
                " but the parameters are on ", device);
    TORCH_CHECK(!at::isFloatingType(h.counts.scalar_type()) && !h.counts.is_complex(), op, " '", name,
                "': counts must be an integer tensor, got ", h.counts.scalar_type());
    TORCH_CHECK(h.edges.size() >= 2, op, " '", name, "': edges needs at least 2 values, got ", h.edges.size());
    const int64_t n0 = static_cast<int64_t>(h.edges.size()) - 1;
    if (h.edges2.empty()) {
      TORCH_CHECK(h.counts.dim() == 1 && h.counts.size(0) == n0, op, " '", name, "': counts has shape ",
                  h.counts.sizes(), " but edges has ", h.edges.size(), " values; a 1-D histogram has [",
                  n0, "] counts");
    } else {
      const int64_t n1 = static_cast<int64_t>(h.edges2.size()) - 1;
      TORCH_CHECK(h.counts.dim() == 2 && h.counts.size(0) == n0 && h.counts.size(1) == n1, op, " '", name,
                  "': counts has shape ", h.counts.sizes(), " but the edges give [", n0, ", ", n1, "]");
    }
    return h.counts.detach().to(at::kLong);
  }

  int64_t layout_size(const Layout& l) const { return l.size(); }

  // The next ring slot, freed first when the ring is full: the one wait outside flush(), for
  // the oldest step in flight (which holds this slot, as slots are used in turn).
  int64_t free_slot() {
    if (static_cast<int64_t>(in_flight.size()) >= cfg.ring_slots) {
      const InFlight& oldest = in_flight.front();
      if (oldest.has_event) ring[oldest.slot].event.synchronize();
      deliver_front();
    }
    return next_slot;
  }

  // Queues the copy of `n` values of `src` into the slot's host buffer, and its event.
  void enqueue(int64_t step, int64_t slot, std::shared_ptr<const Layout> layout, const at::Tensor& src) {
    Slot& s = ring[slot];
    next_slot = (slot + 1) % cfg.ring_slots;
    const int64_t n = layout_size(*layout);
    ensure(s.host, n, host_opt());
    s.host.narrow(0, 0, n).copy_(src.narrow(0, 0, n), /*non_blocking=*/device.is_cuda());
    bool has_event = false;
    if (device.is_cuda()) {
      s.event.record(device);
      has_event = true;
    }
    in_flight.push_back(InFlight{step, slot, std::move(layout), has_event});
  }

  bool front_ready() const {
    const InFlight& f = in_flight.front();
    return !f.has_event || ring[f.slot].event.query();
  }

  void deliver_front() {
    const InFlight f = std::move(in_flight.front());
    in_flight.pop_front();
    StepRecord r;
    r.step = f.step;
    const double* v = ring[f.slot].host.defined() ? ring[f.slot].host.data_ptr<double>() : nullptr;
    r.scalars.reserve(f.layout->num_scalars);
    int64_t k = 0;
    for (const auto& block : f.layout->blocks) {
      for (const std::string& name : *block) r.scalars.emplace_back(name, v[k++]);
    }
    const auto* counts = reinterpret_cast<const int64_t*>(v + f.layout->num_scalars);
    for (const Layout::Hist& lh : f.layout->hists) {
      StepRecord::Histogram h;
      h.name = lh.name;
      h.edges = *lh.edges;
      h.edges2 = *lh.edges2;
      h.counts.assign(counts, counts + lh.numel);
      counts += lh.numel;
      r.histograms.push_back(std::move(h));
    }
    if (!writes_records()) return;
    for (const Sink& sink : sinks) sink(r);
  }

  int64_t poll() {
    if (is_capturing(device)) return 0;
    int64_t n = 0;
    while (!in_flight.empty() && front_ready()) {
      deliver_front();
      ++n;
    }
    return n;
  }

  void flush() {
    while (!in_flight.empty()) {
      const InFlight& f = in_flight.front();
      if (f.has_event) ring[f.slot].event.synchronize();
      deliver_front();
    }
  }
};

Monitor::Monitor(std::vector<std::pair<std::string, at::Tensor>> named_params, MonitorConfig config)
    : impl_(std::make_unique<Impl>()) {
  NvtxRange range{"trainscope::Monitor::Monitor"};
  Impl& m = *impl_;
  TORCH_CHECK(!named_params.empty(), "trainscope::Monitor: named_params is empty; give the model's named parameters");
  TORCH_CHECK(config.ring_slots >= 1, "trainscope::Monitor: ring_slots must be >= 1, got ", config.ring_slots);
  check_hist_axis("trainscope::Monitor", "nbins", config.nbins, "maxval", config.maxval);
  std::unordered_set<std::string> seen;
  for (size_t i = 0; i < named_params.size(); ++i) {
    const auto& [name, t] = named_params[i];
    TORCH_CHECK(t.defined(), "trainscope::Monitor: named_params[", i, "] ('", name, "') is an undefined tensor");
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), "trainscope::Monitor: named_params[", i, "] ('", name,
                "') has dtype ", t.scalar_type(), "; parameters must be floating point");
    TORCH_CHECK(seen.insert(name).second, "trainscope::Monitor: named_params has the name '", name,
                "' twice; names must be unique");
    if (i == 0) m.device = t.device();
    TORCH_CHECK(t.device() == m.device, "trainscope::Monitor: named_params[", i, "] ('", name, "') is on ",
                t.device(), " but named_params[0] is on ", m.device, "; all parameters must share one device");
    if (i == 0) check_device("trainscope::Monitor", "named_params[0] ('" + name + "')", m.device);
    m.names.push_back(name);
    m.params.push_back(t);
  }
  m.cfg = std::move(config);
  TORCH_CHECK(m.cfg.layouts.empty() || m.cfg.layouts.size() == m.params.size(), "trainscope::Monitor: config.layouts has ",
              m.cfg.layouts.size(), " entries but named_params has ", m.params.size(),
              "; give one layout per parameter, or none (all replicated)");
  // Each built-in metric: its own entry of config.metrics, else param_metrics.
  for (const auto& [name, q] : m.cfg.metrics) {
    TORCH_CHECK(builtin_metric_bit(name) >= 0, "trainscope::Monitor: config.metrics has the key '", name,
                "', which is no built-in metric; the keys are ", builtin_metric_names());
  }
  for (int b = 0; b < kNumBuiltinBits; ++b) {
    const auto it = m.cfg.metrics.find(builtin_metric_name(b));
    m.metric_cfg[b] = it != m.cfg.metrics.end() ? it->second : m.cfg.param_metrics;
    if (m.metric_cfg[b].enabled) m.available |= bit(b);
  }
  // θ₀ and θ_prev are a copy of the parameters each: kept only for metrics that can use them.
  if (!m.cfg.track_init) m.available &= ~kInitBits;
  if (!m.cfg.track_prev) m.available &= ~kPrevBits;
  const bool keep_init = (m.available & kInitBits) != 0, keep_prev = (m.available & kPrevBits) != 0;
  TORCH_CHECK(!m.captures_on() || !m.across_ranks(),
              "trainscope::Monitor: config.per_sample (or per_sample_hist, grad_variance) with a "
              "group of several ranks or sharded layouts is not supported in C++ (layer factors need the global "
              "mean gradient); the Python Monitor's per_sample covers torch.distributed");
  {
    auto ps_names = std::make_shared<std::vector<std::string>>();
    for (int64_t i = 0; i < kNumPerSampleStats; ++i) {
      ps_names->push_back(std::string(kPerSampleKey) + "/" + per_sample_stat_name(static_cast<PerSampleStat>(i)));
    }
    m.ps_names = std::move(ps_names);
  }
  TORCH_CHECK(!m.cfg.curvature.enabled || m.cfg.curvature_loss, "trainscope::Monitor: config.curvature is on but "
              "config.curvature_loss is empty; give a closure that recomputes the step's loss");
  TORCH_CHECK(!m.cfg.curvature.enabled || !m.across_ranks(), "trainscope::Monitor: config.curvature with a group "
              "of several ranks is not supported in C++ (each rank's closure sees its own batch)");
  for (const auto& [name, value] : {std::pair<const char*, int64_t>{"samples", m.cfg.curvature_options.samples},
                                    {"max_iter", m.cfg.curvature_options.max_iter},
                                    {"max_params", m.cfg.curvature_options.max_params}}) {
    TORCH_CHECK(!m.cfg.curvature.enabled || value >= 1, "trainscope::Monitor: config.curvature_options.", name,
                " must be at least 1, got ", value);
  }
  m.zero_grads.resize(m.params.size());
  if (m.alpha_due(0)) m.alpha_snapshot();
  c10::OptionalDeviceGuard guard;
  if (m.device.is_cuda()) guard.reset_device(m.device);
  for (const at::Tensor& p : m.params) {
    if (keep_init) m.init.push_back(p.detach().clone(at::MemoryFormat::Contiguous));
    if (keep_prev) m.prev.push_back(p.detach().clone(at::MemoryFormat::Contiguous));
  }

  const at::Tensor edges = hist_bin_edges(m.cfg.nbins, m.cfg.maxval, at::kCPU);
  m.hist_edges = std::make_shared<const std::vector<double>>(edges.data_ptr<double>(),
                                                             edges.data_ptr<double>() + edges.numel());
  m.no_edges = std::make_shared<const std::vector<double>>();

  // Slots sized for the built-ins; custom values grow a slot when it is free.
  m.ring.resize(static_cast<size_t>(m.cfg.ring_slots));
  const int64_t builtin = static_cast<int64_t>(m.names_of(m.available)->size()) + m.cfg.nbins +
                          (m.cfg.per_sample.enabled ? kNumPerSampleStats : 0) +
                          (m.cfg.per_sample_hist.enabled ? m.cfg.nbins : 0);
  for (Slot& s : m.ring) {
    Impl::ensure(s.device, builtin, m.device_opt());
    Impl::ensure(s.host, builtin, m.host_opt());
  }
  if (m.device.is_cuda()) Impl::ensure(m.capture.device, builtin, m.device_opt());
}

Monitor::~Monitor() {
  if (!impl_) return;
  try {
    if (!is_capturing(impl_->device)) impl_->flush();
  } catch (...) {
    // A destructor must not throw; flush() reports errors to callers who call it.
  }
}

void Monitor::add_quantity(std::shared_ptr<Quantity> quantity, Schedule schedule) {
  NvtxRange range{"trainscope::Monitor::add_quantity"};
  TORCH_CHECK(quantity != nullptr, "trainscope::Monitor::add_quantity: quantity is null");
  const std::string key = quantity->key();
  impl_->check_new_key("add_quantity", key);
  impl_->customs.push_back(Impl::Custom{key, std::move(quantity), std::move(schedule)});
}

void Monitor::add_external_quantity(const std::string& key, Schedule schedule) {
  NvtxRange range{"trainscope::Monitor::add_external_quantity"};
  impl_->check_new_key("add_external_quantity", key);
  impl_->customs.push_back(Impl::Custom{key, nullptr, std::move(schedule)});
}

void Monitor::add_sink(Sink sink) {
  NvtxRange range{"trainscope::Monitor::add_sink"};
  TORCH_CHECK(static_cast<bool>(sink), "trainscope::Monitor::add_sink: sink is empty");
  impl_->sinks.push_back(std::move(sink));
}

void Monitor::step(int64_t step, const at::Tensor& per_sample_losses, const std::map<std::string, at::Tensor>& extras,
                   const std::map<std::string, at::Tensor>& extra_scalars,
                   const std::map<std::string, HistogramInput>& extra_histograms,
                   const std::vector<at::Tensor>& grads) {
  NvtxRange range{"trainscope::Monitor::step"};
  Impl& m = *impl_;
  c10::NoGradGuard no_grad;
  c10::OptionalDeviceGuard guard;
  if (m.device.is_cuda()) guard.reset_device(m.device);
  if (per_sample_losses.defined()) {
    TORCH_CHECK(per_sample_losses.device() == m.device, "trainscope::Monitor::step: per_sample_losses is on ",
                per_sample_losses.device(), " but the parameters are on ", m.device);
  }
  TORCH_CHECK(grads.empty() || grads.size() == m.params.size(), "trainscope::Monitor::step: grads has ", grads.size(),
              " entries but the Monitor has ", m.params.size(), " parameters; give one per parameter (undefined where none)");
  if (is_capturing(m.device)) {
    // Device work only, into the fixed capture slot; collect_captured() queues its copy.
    m.captured_layout =
        m.compute(step, m.due_at(step), per_sample_losses, extras, extra_scalars, extra_histograms, grads,
                  m.capture.device);
    return;
  }
  m.poll();
  const int64_t slot = m.free_slot();
  auto layout = m.compute(step, m.due_at(step), per_sample_losses, extras, extra_scalars, extra_histograms, grads,
                          m.ring[slot].device);
  m.requested.clear();
  m.last_step = step;
  if (m.alpha_due(step + 1)) m.alpha_snapshot();  // θ at the next start point, before its update
  // A step at which nothing was due makes no record.
  if (m.layout_size(*layout) > 0) m.enqueue(step, slot, std::move(layout), m.ring[slot].device);
}

void Monitor::measure_now(int64_t step, const at::Tensor& per_sample_losses,
                          const std::optional<std::vector<std::string>>& metrics, bool gradients,
                          const std::map<std::string, at::Tensor>& extras,
                          const std::map<std::string, at::Tensor>& extra_scalars,
                          const std::map<std::string, HistogramInput>& extra_histograms,
                          const std::vector<at::Tensor>& grads) {
  NvtxRange range{"trainscope::Monitor::measure_now"};
  const char* op = "trainscope::Monitor::measure_now";
  Impl& m = *impl_;
  c10::NoGradGuard no_grad;
  c10::OptionalDeviceGuard guard;
  if (m.device.is_cuda()) guard.reset_device(m.device);
  TORCH_CHECK(!is_capturing(m.device), op, ": not inside a CUDA graph capture (it measures once, now)");
  if (per_sample_losses.defined()) {
    TORCH_CHECK(per_sample_losses.device() == m.device, op, ": per_sample_losses is on ", per_sample_losses.device(),
                " but the parameters are on ", m.device);
  }
  TORCH_CHECK(grads.empty() || grads.size() == m.params.size(), op, ": grads has ", grads.size(),
              " entries but the Monitor has ", m.params.size(), " parameters; give one per parameter (undefined where none)");
  Impl::Due due;
  due.gradients = gradients;
  due.refresh_prev = false;
  due.customs.assign(m.customs.size(), !metrics.has_value());
  if (!metrics.has_value()) {
    due.metrics = m.available;
    due.hist = m.cfg.grad_hist.enabled;
  } else {
    for (const std::string& name : *metrics) {
      const int b = builtin_metric_bit(name);
      if (b >= 0) {
        TORCH_CHECK(m.available & bit(b), op, ": metric '", name, "' is off in this Monitor",
                    (b == static_cast<int>(Metric::kDistance) && !m.cfg.track_init) ? " (track_init is off)"
                    : ((bit(b) & kPrevBits) && !m.cfg.track_prev) ? " (track_prev is off)" : "");
        due.metrics |= bit(b);
      } else if (name == kGradHistKey || name == kGradHistName) {
        TORCH_CHECK(m.cfg.grad_hist.enabled, op, ": the gradient histogram (grad_hist) is off in this Monitor");
        due.hist = true;
      } else if (name == kParamMetricsKey) {
        due.metrics |= m.available;
      } else if ((name == kPerSampleKey && m.cfg.per_sample.enabled) ||
                 (name == kPerSampleHistKey && m.cfg.per_sample_hist.enabled) ||
                 (name == kGradVarianceKey && m.cfg.grad_variance.enabled) ||
                 (name == kAlphaKey && m.cfg.alpha.enabled) ||
                 (name == kCurvatureKey && m.cfg.curvature.enabled)) {
        TORCH_CHECK(false, op, ": ", name, " is measured by step() only (it needs the step's own backward pass)");
      } else {
        bool found = false;
        for (size_t i = 0; i < m.customs.size(); ++i) {
          if (m.customs[i].key == name) due.customs[i] = found = true;
        }
        TORCH_CHECK(found, op, ": unknown metric '", name, "'; give built-in metric names (", builtin_metric_names(),
                    "), grad_hist, param_metrics or a registered quantity's key");
      }
    }
  }
  // update_size and update_ratio belong to an optimizer step: θ_prev is the parameters before
  // the latest one, which a measurement between steps does not know.
  due.metrics &= ~kPrevBits;
  m.poll();
  const int64_t slot = m.free_slot();
  auto layout = m.compute(step, due, per_sample_losses, extras, extra_scalars, extra_histograms, grads,
                          m.ring[slot].device);
  if (m.layout_size(*layout) > 0) m.enqueue(step, slot, std::move(layout), m.ring[slot].device);
}

at::Tensor Monitor::capture_linear(const std::string& layer, const at::Tensor& input, const at::Tensor& output,
                                   bool has_bias) {
  const char* op = "trainscope::Monitor::capture_linear";
  Impl::PerSampleLayer like;
  like.has_bias = has_bias;
  if (input.defined() && output.defined()) {
    TORCH_CHECK(input.dim() >= 2 && output.dim() == input.dim(), op, ": input and output must be [B, ..., d] with the "
                "same number of dimensions, got ", input.sizes(), " and ", output.sizes());
  }
  return impl_->capture_layer(op, layer, input, output, like);
}

at::Tensor Monitor::capture_conv2d(const std::string& layer, const at::Tensor& input, const at::Tensor& output,
                                   std::vector<int64_t> kernel_size, std::vector<int64_t> stride,
                                   std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
                                   bool has_bias) {
  const char* op = "trainscope::Monitor::capture_conv2d";
  Impl::PerSampleLayer like;
  like.conv = true;
  like.has_bias = has_bias;
  like.kernel_size = std::move(kernel_size);
  like.stride = std::move(stride);
  like.padding = std::move(padding);
  like.dilation = std::move(dilation);
  like.groups = groups;
  if (input.defined() && output.defined()) {
    TORCH_CHECK(input.dim() == 4 && output.dim() == 4, op, ": input and output must be [B, C, H, W], got ",
                input.sizes(), " and ", output.sizes());
  }
  return impl_->capture_layer(op, layer, input, output, like);
}

bool Monitor::per_sample_armed() const { return impl_->per_sample_armed(); }

void Monitor::collect_captured(int64_t step) {
  NvtxRange range{"trainscope::Monitor::collect_captured"};
  Impl& m = *impl_;
  TORCH_CHECK(m.captured_layout != nullptr,
              "trainscope::Monitor::collect_captured: no step() was captured in a CUDA graph");
  c10::OptionalDeviceGuard guard;
  if (m.device.is_cuda()) guard.reset_device(m.device);
  TORCH_CHECK(!is_capturing(m.device),
              "trainscope::Monitor::collect_captured: call it after replaying the graph, outside the capture");
  m.poll();
  m.last_step = step;
  if (m.layout_size(*m.captured_layout) == 0) return;
  const int64_t slot = m.free_slot();
  m.enqueue(step, slot, m.captured_layout, m.capture.device);
}

void Monitor::request(const std::string& key) {
  NvtxRange range{"trainscope::Monitor::request"};
  TORCH_CHECK(impl_->known(key), "trainscope::Monitor::request: unknown key '", key,
              "'; request param_metrics, a built-in metric's name, grad_hist or a registered quantity's key");
  impl_->requested.insert(key);
  if (key == kAlphaKey && impl_->cfg.alpha.enabled) impl_->alpha_snapshot();  // the next step starts now
}

bool Monitor::due(const std::string& key, int64_t step) const {
  NvtxRange range{"trainscope::Monitor::due"};
  const Impl& m = *impl_;
  if (key == kPerSampleKey && m.cfg.per_sample.enabled) return m.per_sample_stats_due(step);
  if (key == kPerSampleHistKey && m.cfg.per_sample_hist.enabled) return m.per_sample_hist_due(step);
  if (key == kGradVarianceKey && m.cfg.grad_variance.enabled) return m.grad_variance_due(step);
  if (key == kAlphaKey && m.cfg.alpha.enabled) return m.alpha_due(step);
  if (key == kCurvatureKey && m.cfg.curvature.enabled) return m.curvature_due(step);
  // param_metrics: whether any built-in metric is due.
  if (key == kParamMetricsKey) return m.metrics_due(step) != 0;
  if (const int b = builtin_metric_bit(key); b >= 0) return (m.metrics_due(step) & bit(b)) != 0;
  if (key == kGradHistKey) return m.builtin_due(m.cfg.grad_hist, kGradHistKey, step);
  const Impl::Custom* c = m.find_custom(key);
  TORCH_CHECK(c != nullptr, "trainscope::Monitor::due: unknown key '", key, "'");
  return c->schedule.due(step) || m.requested.count(key) > 0;
}

int64_t Monitor::poll() {
  NvtxRange range{"trainscope::Monitor::poll"};
  return impl_->poll();
}

void Monitor::flush() {
  NvtxRange range{"trainscope::Monitor::flush"};
  TORCH_CHECK(!is_capturing(impl_->device), "trainscope::Monitor::flush: cannot wait inside a CUDA graph capture");
  impl_->flush();
}

MonitorState Monitor::state_dict(bool param_copies) const {
  NvtxRange range{"trainscope::Monitor::state_dict"};
  const Impl& m = *impl_;
  MonitorState st;
  st.names = m.names;
  if (param_copies) {
    st.init = m.init;
    st.prev = m.prev;
  }
  st.requested.assign(m.requested.begin(), m.requested.end());
  st.step = m.last_step;
  st.rank = m.cfg.group.rank();
  st.world_size = m.cfg.group.size();
  return st;
}

void Monitor::load_state_dict(const MonitorState& state) {
  NvtxRange range{"trainscope::Monitor::load_state_dict"};
  Impl& m = *impl_;
  const char* op = "trainscope::Monitor::load_state_dict";
  // Every check before anything changes.
  if (state.names != m.names) {
    std::ostringstream why;
    std::set<std::string> have(m.names.begin(), m.names.end()), saved(state.names.begin(), state.names.end());
    std::vector<std::string> missing, unexpected;
    for (const std::string& n : m.names) {
      if (!saved.count(n)) missing.push_back(n);
    }
    for (const std::string& n : state.names) {
      if (!have.count(n)) unexpected.push_back(n);
    }
    auto list = [](const std::vector<std::string>& v) {
      std::string out;
      for (size_t i = 0; i < v.size() && i < 5; ++i) out += (i ? ", '" : "'") + v[i] + "'";
      if (v.size() > 5) out += ", ... (" + std::to_string(v.size()) + " in all)";
      return out;
    };
    if (!missing.empty()) why << " the state lacks " << list(missing) << ";";
    if (!unexpected.empty()) why << " the state has " << list(unexpected) << ", which this Monitor does not;";
    if (missing.empty() && unexpected.empty()) why << " the same names in another order;";
    TORCH_CHECK(false, op, ": the state is of other parameters (names):", why.str(),
                " load a state saved by a Monitor of the same parameters");
  }
  auto check_tensors = [&](const std::vector<at::Tensor>& ts, const char* what) {
    if (ts.empty()) return;
    TORCH_CHECK(ts.size() == m.params.size(), op, ": state.", what, " has ", ts.size(), " tensors but there are ",
                m.params.size(), " parameters");
    for (size_t i = 0; i < ts.size(); ++i) {
      TORCH_CHECK(ts[i].defined(), op, ": state.", what, "[", i, "] ('", m.names[i], "') is an undefined tensor");
      TORCH_CHECK(ts[i].sizes() == m.params[i].sizes(), op, ": the state is of other parameters (shapes): '",
                  m.names[i], "' has shape ", m.params[i].sizes(), " but state.", what, " holds shape ",
                  ts[i].sizes());
      TORCH_CHECK(at::isFloatingType(ts[i].scalar_type()), op, ": state.", what, "[", i, "] ('", m.names[i],
                  "') has dtype ", ts[i].scalar_type(), "; expected a floating tensor");
    }
  };
  check_tensors(state.init, "init");
  check_tensors(state.prev, "prev");
  const bool has_params = !state.init.empty() || !state.prev.empty();
  bool sharded = false;
  for (const TensorLayout& l : m.cfg.layouts) sharded = sharded || l.placement == Placement::kSharded;
  TORCH_CHECK(!has_params || !sharded || (state.rank == m.cfg.group.rank() && state.world_size == m.cfg.group.size()),
              op, ": the state holds the shards of rank ", state.rank, " of ", state.world_size,
              " but this is rank ", m.cfg.group.rank(), " of ", m.cfg.group.size(),
              " and the parameters are sharded; load each rank's own state (or a state without parameter copies)");
  for (const std::string& key : state.requested) {
    TORCH_CHECK(m.known(key), op, ": the state requests '", key, "', which is not a key of this Monitor");
  }

  c10::NoGradGuard no_grad;
  c10::OptionalDeviceGuard guard;
  if (m.device.is_cuda()) guard.reset_device(m.device);
  // copy_ per tensor: a state read from a file may sit on another device or in another dtype.
  if (!state.init.empty() && !m.init.empty()) {
    for (size_t i = 0; i < m.init.size(); ++i) m.init[i].copy_(state.init[i]);
  }
  if (!state.prev.empty() && !m.prev.empty()) {
    for (size_t i = 0; i < m.prev.size(); ++i) m.prev[i].copy_(state.prev[i]);
  }
  m.requested = std::set<std::string>(state.requested.begin(), state.requested.end());
  m.last_step = state.step;
}

void check_quantity_key(const std::string& key, const std::string& caller) {
  TORCH_CHECK(!key.empty(), caller, ": the quantity key is empty");
  TORCH_CHECK(key.find('/') == std::string::npos, caller, ": key '", key,
              "' contains '/'; a quantity's values are logged as '<key>' and '<key>/<name>', so the key is one "
              "name without '/'");
  TORCH_CHECK(key != kParamMetricsKey && key != kGradHistKey, caller, ": key '", key,
              "' is a built-in key (param_metrics, grad_hist); choose another key");
  TORCH_CHECK(!builtin_record_name(key), caller, ": key '", key, "' is a built-in record name (",
              builtin_metric_names(), ", grad_hist1d); choose another key");
}

const std::vector<std::string>& Monitor::names() const { return impl_->names; }

bool Monitor::writes_records() const { return impl_->writes_records(); }
const MonitorConfig& Monitor::config() const { return impl_->cfg; }

// ---------------------------------------------------------------------------------------------
// File sinks

namespace {

// The shortest of 15, 16 or 17 significant digits that reads back as the same double.
std::string number(double v) {
  char buf[32];
  for (int digits = 15; digits <= 17; ++digits) {
    std::snprintf(buf, sizeof(buf), "%.*g", digits, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  return buf;
}

std::string json_number(double v) { return std::isfinite(v) ? number(v) : "null"; }

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    switch (ch) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += ch;
        }
    }
  }
  return out + "\"";
}

std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n\r") == std::string::npos) return s;
  std::string out = "\"";
  for (const char ch : s) out += ch == '"' ? std::string("\"\"") : std::string(1, ch);
  return out + "\"";
}

std::string csv_number(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  return number(v);
}

std::shared_ptr<std::ofstream> open_append(const char* sink, const std::string& path) {
  auto f = std::make_shared<std::ofstream>(path, std::ios::out | std::ios::app | std::ios::binary);
  TORCH_CHECK(f->is_open(), "trainscope::", sink, ": cannot open path '", path, "' for appending");
  return f;
}

}  // namespace

Sink JsonlSink(const std::string& path) {
  NvtxRange range{"trainscope::JsonlSink"};
  auto f = open_append("JsonlSink", path);
  return [f, path](const StepRecord& r) {
    NvtxRange range{"trainscope::JsonlSink::write"};
    std::string line = "{\"step\": " + std::to_string(r.step) + ", \"scalars\": {";
    for (size_t i = 0; i < r.scalars.size(); ++i) {
      line += (i ? ", " : "") + json_string(r.scalars[i].first) + ": " + json_number(r.scalars[i].second);
    }
    line += "}, \"histograms\": {";
    for (size_t i = 0; i < r.histograms.size(); ++i) {
      const auto& h = r.histograms[i];
      line += (i ? ", " : "") + json_string(h.name) + ": {\"edges\": [";
      for (size_t j = 0; j < h.edges.size(); ++j) line += (j ? ", " : "") + json_number(h.edges[j]);
      line += "], \"counts\": [";
      for (size_t j = 0; j < h.counts.size(); ++j) line += (j ? ", " : "") + std::to_string(h.counts[j]);
      line += "]";
      if (!h.edges2.empty()) {  // a 2-D histogram: counts are row-major [edges − 1, edges2 − 1]
        line += ", \"edges2\": [";
        for (size_t j = 0; j < h.edges2.size(); ++j) line += (j ? ", " : "") + json_number(h.edges2[j]);
        line += "]";
      }
      line += "}";
    }
    line += "}}\n";
    *f << line;
    f->flush();
    TORCH_CHECK(f->good(), "trainscope::JsonlSink: writing to path '", path, "' failed");
  };
}

Sink CsvSink(const std::string& path) {
  NvtxRange range{"trainscope::CsvSink"};
  auto f = open_append("CsvSink", path);
  f->seekp(0, std::ios::end);
  if (f->tellp() == std::streampos(0)) {
    *f << "step,name,value\n";
    f->flush();
  }
  return [f, path](const StepRecord& r) {
    NvtxRange range{"trainscope::CsvSink::write"};
    std::string rows;
    const std::string step = std::to_string(r.step);
    for (const auto& [name, v] : r.scalars) rows += step + "," + csv_field(name) + "," + csv_number(v) + "\n";
    *f << rows;
    f->flush();
    TORCH_CHECK(f->good(), "trainscope::CsvSink: writing to path '", path, "' failed");
  };
}

}  // namespace trainscope
