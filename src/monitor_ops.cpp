// The Monitor as a TorchScript custom class, so the Python Monitor
// (python_bindings/trainscope/monitor.py) runs the same C++ pipeline as LibTorch users:
// torch.classes.trainscope.Monitor. Python quantities are computed in Python and arrive as
// extra scalars; finished steps queue up in the holder until Python polls them.
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <torch/custom_class.h>
#include <torch/library.h>

#include "trainscope/monitor.h"

namespace trainscope {
namespace {

// (step, scalar names, scalar values, histogram names, histogram edges, histogram counts,
// histogram second-axis edges: empty for 1-D; 2-D counts are [edges − 1, edges2 − 1])
using RecordTuple = std::tuple<int64_t, std::vector<std::string>, std::vector<double>, std::vector<std::string>,
                               std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>;

// Host values of a CPU tensor of edges (Python passes host tensors: reading device ones would sync).
std::vector<double> host_values(const at::Tensor& t, const std::string& name, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "trainscope.Monitor: ", what, " of histogram '", name,
              "' must be on the CPU (bin edges are host values), got ", t.device());
  const at::Tensor c = t.to(at::kDouble).contiguous().reshape({-1});
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

QuantityConfig quantity_config(const std::string& spec, const char* arg) {
  QuantityConfig q;
  if (spec == "off") {
    q.enabled = false;
  } else {
    q.schedule = Schedule::parse(spec, arg);
  }
  return q;
}

MonitorConfig make_config(const std::string& param_metrics, const std::string& grad_hist, int64_t nbins,
                          double maxval, bool per_tensor, bool weights_matrices_only, bool track_init,
                          bool track_prev, int64_t ring_slots, const std::string& process_group,
                          const std::vector<std::string>& placements, const std::vector<int64_t>& full_dims,
                          bool sinks_on_all_ranks, const std::vector<std::string>& metric_names,
                          const std::vector<std::string>& metric_specs) {
  MonitorConfig c;
  c.param_metrics = quantity_config(param_metrics, "param_metrics");
  TORCH_CHECK(metric_names.size() == metric_specs.size(),
              "trainscope.Monitor: metric_names and metric_specs must pair up");
  for (size_t i = 0; i < metric_names.size(); ++i) {
    const std::string arg = "metrics['" + metric_names[i] + "']";
    c.metrics[metric_names[i]] = quantity_config(metric_specs[i], arg.c_str());
  }
  c.grad_hist = quantity_config(grad_hist, "grad_hist");
  c.nbins = nbins;
  c.maxval = maxval;
  c.per_tensor = per_tensor;
  c.weights_matrices_only = weights_matrices_only;
  c.track_init = track_init;
  c.track_prev = track_prev;
  c.ring_slots = ring_slots;
  c.group = RankGroup::from_process_group(process_group);
  c.layouts = tensor_layouts(placements, full_dims);
  c.sinks_on_all_ranks = sinks_on_all_ranks;
  return c;
}

std::vector<std::pair<std::string, at::Tensor>> zip_params(const std::vector<std::string>& names,
                                                           const std::vector<at::Tensor>& params) {
  TORCH_CHECK(names.size() == params.size(), "trainscope.Monitor: names has ", names.size(),
              " entries but params has ", params.size());
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (size_t i = 0; i < names.size(); ++i) out.emplace_back(names[i], params[i]);
  return out;
}

RecordTuple as_tuple(const StepRecord& r) {
  std::vector<std::string> names;
  std::vector<double> values;
  names.reserve(r.scalars.size());
  values.reserve(r.scalars.size());
  for (const auto& [n, v] : r.scalars) {
    names.push_back(n);
    values.push_back(v);
  }
  std::vector<std::string> hist_names;
  std::vector<at::Tensor> edges, counts, edges2;
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  for (const auto& h : r.histograms) {
    hist_names.push_back(h.name);
    edges.push_back(at::tensor(h.edges, f64));
    edges2.push_back(at::tensor(h.edges2, f64));
    at::Tensor c = at::tensor(h.counts, at::TensorOptions().dtype(at::kLong));
    if (!h.edges2.empty()) c = c.reshape({static_cast<int64_t>(h.edges.size()) - 1, -1});
    counts.push_back(c);
  }
  return {r.step,          std::move(names),  std::move(values), std::move(hist_names),
          std::move(edges), std::move(counts), std::move(edges2)};
}

// MonitorState as the Python package passes it: (names, init, prev, requested, has_step, step,
// rank, world_size).
using StateTuple = std::tuple<std::vector<std::string>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                              std::vector<std::string>, bool, int64_t, int64_t, int64_t>;

struct MonitorHolder : torch::CustomClassHolder {
  MonitorHolder(std::vector<std::string> names, std::vector<at::Tensor> params, std::string param_metrics,
                std::string grad_hist, int64_t nbins, double maxval, bool per_tensor, bool weights_matrices_only,
                bool track_init, bool track_prev, int64_t ring_slots, std::string process_group,
                std::vector<std::string> placements, std::vector<int64_t> full_dims, bool sinks_on_all_ranks,
                std::vector<std::string> metric_names, std::vector<std::string> metric_specs)
      : queue(std::make_shared<std::deque<RecordTuple>>()),
        monitor(zip_params(names, params),
                make_config(param_metrics, grad_hist, nbins, maxval, per_tensor, weights_matrices_only, track_init,
                            track_prev, ring_slots, process_group, placements, full_dims, sinks_on_all_ranks,
                            metric_names, metric_specs)) {
    auto q = queue;
    monitor.add_sink([q](const StepRecord& r) { q->push_back(as_tuple(r)); });
  }

  void add_external_quantity(std::string key, std::string spec) {
    monitor.add_external_quantity(key, Schedule::parse(spec, "schedule"));
  }

  void request(std::string key) { monitor.request(key); }

  bool due(std::string key, int64_t step) { return monitor.due(key, step); }

  // hist_edges2[i] is an empty tensor for a 1-D histogram.
  void step(int64_t step, c10::optional<at::Tensor> losses, c10::Dict<std::string, at::Tensor> extra_scalars,
            std::vector<std::string> hist_names, std::vector<at::Tensor> hist_counts,
            std::vector<at::Tensor> hist_edges, std::vector<at::Tensor> hist_edges2,
            std::vector<c10::optional<at::Tensor>> grads) {
    monitor.step(step, losses.has_value() ? *losses : at::Tensor(), {}, scalars_of(extra_scalars),
                 histograms_of("step", hist_names, hist_counts, hist_edges, hist_edges2), grads_of(grads));
  }

  // all_metrics: every metric (metrics is then ignored), else those named in metrics.
  void measure_now(int64_t step, c10::optional<at::Tensor> losses, bool all_metrics, std::vector<std::string> metrics,
                   bool gradients, c10::Dict<std::string, at::Tensor> extra_scalars,
                   std::vector<std::string> hist_names, std::vector<at::Tensor> hist_counts,
                   std::vector<at::Tensor> hist_edges, std::vector<at::Tensor> hist_edges2,
                   std::vector<c10::optional<at::Tensor>> grads) {
    std::optional<std::vector<std::string>> named;
    if (!all_metrics) named = std::move(metrics);
    monitor.measure_now(step, losses.has_value() ? *losses : at::Tensor(), named, gradients, {},
                        scalars_of(extra_scalars),
                        histograms_of("measure_now", hist_names, hist_counts, hist_edges, hist_edges2),
                        grads_of(grads));
  }

  static std::map<std::string, at::Tensor> scalars_of(const c10::Dict<std::string, at::Tensor>& d) {
    std::map<std::string, at::Tensor> out;
    for (const auto& e : d) out.emplace(e.key(), e.value());
    return out;
  }

  static std::map<std::string, HistogramInput> histograms_of(const char* op, const std::vector<std::string>& names,
                                                             const std::vector<at::Tensor>& counts,
                                                             const std::vector<at::Tensor>& edges,
                                                             const std::vector<at::Tensor>& edges2) {
    TORCH_CHECK(names.size() == counts.size() && counts.size() == edges.size() && edges.size() == edges2.size(),
                "trainscope.Monitor.", op, ": hist_names, hist_counts, hist_edges and hist_edges2 must pair up");
    std::map<std::string, HistogramInput> hists;
    for (size_t i = 0; i < names.size(); ++i) {
      const std::string& n = names[i];
      hists[n] = HistogramInput{counts[i], host_values(edges[i], n, "edges"), host_values(edges2[i], n, "edges2")};
    }
    return hists;
  }

  // Empty: the Monitor reads each parameter's .grad().
  static std::vector<at::Tensor> grads_of(const std::vector<c10::optional<at::Tensor>>& grads) {
    std::vector<at::Tensor> given;
    for (const auto& g : grads) given.push_back(g.has_value() ? *g : at::Tensor());
    return given;
  }

  // What the sinks got so far (step() and collect_captured() poll first), without polling again.
  std::vector<RecordTuple> take() {
    std::vector<RecordTuple> out(std::make_move_iterator(queue->begin()), std::make_move_iterator(queue->end()));
    queue->clear();
    return out;
  }

  std::vector<RecordTuple> poll_records() {
    monitor.poll();
    return take();
  }

  std::vector<RecordTuple> flush_records() {
    monitor.flush();
    return take();
  }

  void collect_captured(int64_t step) { monitor.collect_captured(step); }

  std::vector<std::string> names() { return monitor.names(); }

  StateTuple state_dict(bool param_copies) {
    MonitorState st = monitor.state_dict(param_copies);
    return {std::move(st.names), std::move(st.init),     std::move(st.prev),        std::move(st.requested),
            st.step.has_value(), st.step.value_or(0), st.rank, st.world_size};
  }

  void load_state_dict(std::vector<std::string> names, std::vector<at::Tensor> init, std::vector<at::Tensor> prev,
                       std::vector<std::string> requested, bool has_step, int64_t step, int64_t rank,
                       int64_t world_size) {
    MonitorState st;
    st.names = std::move(names);
    st.init = std::move(init);
    st.prev = std::move(prev);
    st.requested = std::move(requested);
    if (has_step) st.step = step;
    st.rank = rank;
    st.world_size = world_size;
    monitor.load_state_dict(st);
  }

  bool writes_records() { return monitor.writes_records(); }

  std::shared_ptr<std::deque<RecordTuple>> queue;  // before monitor: its sink holds a reference
  Monitor monitor;
};

// The C++ file sinks for the Python package, so both write one format from one implementation.
struct FileSinkHolder : torch::CustomClassHolder {
  FileSinkHolder(std::string kind, std::string path) {
    TORCH_CHECK(kind == "jsonl" || kind == "csv", "trainscope.FileSink: kind must be \"jsonl\" or \"csv\", got \"",
                kind, "\"");
    sink = kind == "jsonl" ? JsonlSink(path) : CsvSink(path);
  }

  void write(int64_t step, std::vector<std::string> names, std::vector<double> values,
             std::vector<std::string> hist_names, std::vector<at::Tensor> edges, std::vector<at::Tensor> counts,
             std::vector<at::Tensor> edges2) {
    TORCH_CHECK(names.size() == values.size() && hist_names.size() == edges.size() && edges.size() == counts.size() &&
                    counts.size() == edges2.size(),
                "trainscope.FileSink.write: names/values and hist_names/edges/counts/edges2 must pair up");
    StepRecord r;
    r.step = step;
    for (size_t i = 0; i < names.size(); ++i) r.scalars.emplace_back(names[i], values[i]);
    for (size_t i = 0; i < hist_names.size(); ++i) {
      const at::Tensor e = edges[i].to(at::kCPU, at::kDouble).contiguous();
      const at::Tensor c = counts[i].to(at::kCPU, at::kLong).contiguous();
      r.histograms.push_back({hist_names[i], std::vector<double>(e.data_ptr<double>(), e.data_ptr<double>() + e.numel()),
                              std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel()),
                              host_values(edges2[i], hist_names[i], "edges2")});
    }
    sink(r);
  }

  Sink sink;
};

bool schedule_due(std::string spec, int64_t step) { return Schedule::parse(spec, "spec").due(step); }

// `arg`: the argument the spec came in, named by a parse error.
std::string schedule_describe(std::string spec, std::string arg) {
  return Schedule::parse(spec, arg.c_str()).describe();
}

}  // namespace
}  // namespace trainscope

TORCH_LIBRARY_FRAGMENT(trainscope, m) {
  using trainscope::MonitorHolder;
  m.class_<MonitorHolder>("Monitor")
      .def(torch::init<std::vector<std::string>, std::vector<at::Tensor>, std::string, std::string, int64_t, double,
                       bool, bool, bool, bool, int64_t, std::string, std::vector<std::string>, std::vector<int64_t>,
                       bool, std::vector<std::string>, std::vector<std::string>>())
      .def("add_external_quantity", &MonitorHolder::add_external_quantity)
      .def("request", &MonitorHolder::request)
      .def("due", &MonitorHolder::due)
      .def("step", &MonitorHolder::step)
      .def("measure_now", &MonitorHolder::measure_now)
      .def("take_records", &MonitorHolder::take)
      .def("poll_records", &MonitorHolder::poll_records)
      .def("flush_records", &MonitorHolder::flush_records)
      .def("collect_captured", &MonitorHolder::collect_captured)
      .def("names", &MonitorHolder::names)
      .def("state_dict", &MonitorHolder::state_dict)
      .def("load_state_dict", &MonitorHolder::load_state_dict)
      .def("writes_records", &MonitorHolder::writes_records)
      // The key rules of add_quantity, for checks before a Monitor exists (the Lightning callbacks).
      .def_static("check_quantity_key",
                  [](std::string key, std::string caller) { trainscope::check_quantity_key(key, caller); });
  using trainscope::FileSinkHolder;
  m.class_<FileSinkHolder>("FileSink")
      .def(torch::init<std::string, std::string>())
      .def("write", &FileSinkHolder::write);
  // The one schedule implementation, for the Python Schedule objects.
  m.def("schedule_due(str spec, int step) -> bool", &trainscope::schedule_due);
  m.def("schedule_describe(str spec, str arg=\"spec\") -> str", &trainscope::schedule_describe);
}
