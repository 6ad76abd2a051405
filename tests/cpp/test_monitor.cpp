// The Monitor (include/trainscope/monitor.h): schedules fire on exactly their steps; a short
// training loop's records equal the metrics computed by hand on the same steps; custom
// quantities, requests, sinks, the ring, and on CUDA the same plus a graph-captured step.
#include <ATen/ATen.h>
#include <torch/torch.h>
#if defined(TRAINSCOPE_WITH_CUDA)
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "tests/cpp/torch_test_util.h"
#include "trainscope/alpha.h"
#include "trainscope/curvature.h"
#include "trainscope/grad_variance.h"
#include "trainscope/monitor.h"
#include "trainscope/param_stats.h"

namespace {

using namespace trainscope_test;
using trainscope::Monitor;
using trainscope::MonitorConfig;
using trainscope::Schedule;
using trainscope::StepRecord;

std::vector<int64_t> due_steps(const Schedule& s, int64_t lo, int64_t hi) {
  std::vector<int64_t> out;
  for (int64_t i = lo; i < hi; ++i) {
    if (s.due(i)) out.push_back(i);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Schedules

TEST(MonitorSchedule, EveryFiresFromStartEveryK) {
  EXPECT_EQ(due_steps(Schedule::every(3, 2), -5, 15), (std::vector<int64_t>{2, 5, 8, 11, 14}));
  EXPECT_EQ(due_steps(Schedule::every(1), -2, 4), (std::vector<int64_t>{0, 1, 2, 3}));
  EXPECT_EQ(due_steps(Schedule::every(4, -3), -10, 6), (std::vector<int64_t>{-3, 1, 5}));
  EXPECT_EQ(Schedule::every(10).describe(), "every 10 from 0");
}

TEST(MonitorSchedule, AtFiresOnExactlyTheListedSteps) {
  EXPECT_EQ(due_steps(Schedule::at({7, 3, 3, 10, 0}), -3, 30), (std::vector<int64_t>{0, 3, 7, 10}));
  EXPECT_TRUE(due_steps(Schedule::at({}), -10, 100).empty());
  EXPECT_EQ(Schedule::at({5, 1}).describe(), "at steps 1, 5");
}

TEST(MonitorSchedule, LogSpacedFirstValues) {
  EXPECT_EQ(due_steps(Schedule::log_spaced(), -3, 101),
            (std::vector<int64_t>{1, 2, 3, 5, 6, 7, 10, 12, 15, 19, 25, 31, 39, 50, 63, 79, 100}));
  EXPECT_EQ(due_steps(Schedule::log_spaced(1), 0, 20001), (std::vector<int64_t>{1, 10, 100, 1000, 10000}));
  EXPECT_EQ(due_steps(Schedule::log_spaced(2, 5), 0, 600), (std::vector<int64_t>{5, 15, 50, 158, 500}));
  // Against the definition, far out: the distinct values of floor(3 · 10^(i/7)).
  std::set<int64_t> want;
  for (int64_t i = 0; i < 60; ++i) {
    const long double v = 3.0L * std::pow(10.0L, static_cast<long double>(i) / 7.0L);
    if (v < 2e6L) want.insert(static_cast<int64_t>(std::floor(v + 1e-9L)));
  }
  const std::vector<int64_t> got = due_steps(Schedule::log_spaced(7, 3), 0, 2000000);
  EXPECT_EQ(got, std::vector<int64_t>(want.begin(), want.end()));
  EXPECT_EQ(Schedule::log_spaced(10, 1).describe(), "log-spaced, 10 per decade from 1");
}

TEST(MonitorSchedule, OnDemandNeverFiresByItself) {
  EXPECT_TRUE(due_steps(Schedule::on_demand(), -10, 1000).empty());
  EXPECT_EQ(Schedule::on_demand().describe(), "on demand");
}

TEST(MonitorSchedule, ParseMatchesTheFactories) {
  auto same = [](const Schedule& a, const Schedule& b) {
    EXPECT_EQ(due_steps(a, -20, 3000), due_steps(b, -20, 3000)) << a.describe() << " vs " << b.describe();
    EXPECT_EQ(a.describe(), b.describe());
  };
  same(Schedule::parse("every:5"), Schedule::every(5));
  same(Schedule::parse("every:5:3"), Schedule::every(5, 3));
  same(Schedule::parse("every:2:-4"), Schedule::every(2, -4));
  same(Schedule::parse("at:9,2,4"), Schedule::at({2, 4, 9}));
  same(Schedule::parse("at:"), Schedule::at({}));
  same(Schedule::parse("log:10"), Schedule::log_spaced(10, 1));
  same(Schedule::parse("log:3:20"), Schedule::log_spaced(3, 20));
  same(Schedule::parse("on_demand"), Schedule::on_demand());
}

TEST(MonitorSchedule, BadArgumentsNameTheArgument) {
  expect_error_naming([] { Schedule::every(0); }, "k", "every(0)");
  expect_error_naming([] { Schedule::log_spaced(0); }, "per_decade", "log_spaced(0)");
  expect_error_naming([] { Schedule::log_spaced(10, 0); }, "start", "log_spaced(10, 0)");
  for (const char* spec : {"every:0", "every:x", "every", "every:1:2:3", "at:1,x", "at", "log:0", "log:2:0",
                           "log:", "on_demand:1", "sometimes", "", "every:5 "}) {
    expect_error_naming([&] { Schedule::parse(spec); }, "schedule", spec);
    expect_error_naming([&] { Schedule::parse(spec, "grad_hist"); }, "grad_hist", spec);
  }
}

// ---------------------------------------------------------------------------------------------
// A tiny model trained with SGD; references computed by hand in float64

struct Net : torch::nn::Module {
  explicit Net(at::Device device) {
    fc1 = register_module("fc1", torch::nn::Linear(5, 7));
    fc2 = register_module("fc2", torch::nn::Linear(7, 3));
    to(device);
  }
  at::Tensor forward(const at::Tensor& x) { return fc2(torch::relu(fc1(x))); }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};

// A config with the parameter metrics and the gradient histogram off: the family under test alone.
MonitorConfig families_only() {
  MonitorConfig cfg;
  cfg.param_metrics.enabled = false;
  cfg.grad_hist.enabled = false;
  return cfg;
}

std::vector<at::Tensor> params_of(Net& net) {
  std::vector<at::Tensor> params;
  for (const auto& kv : net.named_parameters().pairs()) params.push_back(kv.second);
  return params;
}

// One training step whose forward pass hands fc1 (used once) and fc2 (used twice: its uses add
// up) to the Monitor's captures; per-sample losses ‖fc2(h) + fc2(h) − y‖², h = relu(fc1(x)).
void captured_step(Monitor& monitor, Net& net, torch::optim::Optimizer& opt, int64_t step, const at::Tensor& x,
                   const at::Tensor& y) {
  opt.zero_grad();
  const at::Tensor h = torch::relu(monitor.capture_linear("fc1", x, net.fc1(x), true));
  const at::Tensor out = monitor.capture_linear("fc2", h, net.fc2(h), true) +
                         monitor.capture_linear("fc2", h, net.fc2(h), true);
  const at::Tensor losses = (out - y).pow(2).sum(1);
  losses.mean().backward();
  opt.step();
  monitor.step(step, losses.detach());
}

struct Batch {
  at::Tensor x, y;
};

Batch make_batch(int64_t step, at::Device device) {
  at::manual_seed(1000 + step);
  // Large targets and inputs so gradients spread over the histogram range.
  return {at::randn({16, 5}).to(device), at::randint(0, 3, {16}).to(device)};
}

// What a record should hold at a step, from the state before and after optimizer.step().
std::map<std::string, double> reference_scalars(const std::vector<std::string>& names,
                                                const std::vector<at::Tensor>& params,
                                                const std::vector<at::Tensor>& before,
                                                const std::vector<at::Tensor>& init, const at::Tensor& losses,
                                                bool track_init = true, bool track_prev = true) {
  std::map<std::string, double> r;
  if (losses.defined()) r["loss"] = as_double_cpu(losses).mean().item<double>();
  double gsq = 0, gabs = 0, wabs = 0, dsq = 0, usq = 0, wsq = 0, numel = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor g = as_double_cpu(params[i].grad());
    const at::Tensor p = as_double_cpu(params[i]);
    const at::Tensor p0 = as_double_cpu(init[i]);
    const at::Tensor pb = as_double_cpu(before[i]);
    const double n = static_cast<double>(p.numel());
    const double tg = g.pow(2).sum().item<double>(), ta = g.abs().sum().item<double>();
    const double tw = p.abs().sum().item<double>(), td = (p - p0).pow(2).sum().item<double>();
    const double tu = (p - pb).pow(2).sum().item<double>(), tn = p.pow(2).sum().item<double>();
    gsq += tg, gabs += ta, wabs += tw, dsq += td, usq += tu, wsq += tn, numel += n;
    r["grad_norm/" + names[i]] = std::sqrt(tg);
    r["grad_magnitude/" + names[i]] = ta / n;
    r["weight_magnitude/" + names[i]] = tw / n;
    if (track_init) r["distance/" + names[i]] = std::sqrt(td);
    if (track_prev) r["update_size/" + names[i]] = std::sqrt(tu);
    r["weight_norm/" + names[i]] = std::sqrt(tn);
    if (track_prev) r["update_ratio/" + names[i]] = std::sqrt(tu) / std::sqrt(tn);
    r["nonfinite_count/" + names[i]] = 0.0;
  }
  r["grad_norm"] = std::sqrt(gsq);
  r["grad_magnitude"] = gabs / numel;
  r["weight_magnitude"] = wabs / numel;
  if (track_init) r["distance"] = std::sqrt(dsq);
  if (track_prev) r["update_size"] = std::sqrt(usq);
  r["weight_norm"] = std::sqrt(wsq);
  if (track_prev) r["update_ratio"] = std::sqrt(usq) / std::sqrt(wsq);
  r["nonfinite_count"] = 0.0;
  return r;
}

std::vector<at::Tensor> clones(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& t : ts) out.push_back(t.detach().clone());
  return out;
}

std::map<std::string, double> as_map(const StepRecord& r) {
  std::map<std::string, double> m;
  for (const auto& [k, v] : r.scalars) {
    EXPECT_TRUE(m.emplace(k, v).second) << "name " << k << " twice in step " << r.step;
  }
  return m;
}

void expect_scalars(const StepRecord& r, const std::map<std::string, double>& want, double rel) {
  const std::map<std::string, double> got = as_map(r);
  std::set<std::string> got_names, want_names;
  for (const auto& kv : got) got_names.insert(kv.first);
  for (const auto& kv : want) want_names.insert(kv.first);
  EXPECT_EQ(got_names, want_names) << "step " << r.step;
  for (const auto& [k, v] : want) {
    auto it = got.find(k);
    if (it == got.end()) continue;
    EXPECT_CLOSE(it->second, v, rel) << k << " at step " << r.step;
  }
}

struct Collector {
  std::vector<StepRecord> records;
  trainscope::Sink sink() {
    return [this](const StepRecord& r) { records.push_back(r); };
  }
  std::vector<int64_t> steps() const {
    std::vector<int64_t> s;
    for (const auto& r : records) s.push_back(r.step);
    return s;
  }
};

class MonitorTraining : public testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    if (GetParam()) {
      SKIP_WITHOUT_CUDA();
    }
  }
  at::Device device() const { return GetParam() ? cuda0() : at::Device(at::kCPU); }
};

// Runs `steps` SGD steps, calling monitor.step after each; returns, per step, what a record with
// parameter metrics should hold and the gradient histogram of that step.
struct Expected {
  std::map<std::string, double> scalars;
  std::vector<int64_t> hist;
};

std::vector<Expected> train(Net& net, Monitor& monitor, int64_t steps, at::Device device, bool pass_losses,
                            int64_t nbins, double maxval, bool track_init = true, bool track_prev = true,
                            const std::vector<at::Tensor>* init_override = nullptr) {
  std::vector<std::string> names;
  std::vector<at::Tensor> params;
  for (const auto& kv : net.named_parameters().pairs()) {
    names.push_back(kv.first);
    params.push_back(kv.second);
  }
  const std::vector<at::Tensor> init = init_override ? *init_override : clones(params);
  torch::optim::SGD opt(net.parameters(), torch::optim::SGDOptions(0.5).momentum(0.5));
  std::vector<Expected> out;
  for (int64_t s = 0; s < steps; ++s) {
    const Batch b = make_batch(s, device);
    opt.zero_grad();
    const at::Tensor losses = torch::nn::functional::cross_entropy(
        net.forward(b.x), b.y, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone));
    losses.mean().backward();
    const std::vector<at::Tensor> before = clones(params);
    opt.step();
    monitor.step(s, pass_losses ? losses.detach() : at::Tensor());
    Expected e;
    e.scalars = reference_scalars(names, params, before, init, pass_losses ? losses : at::Tensor(), track_init,
                                  track_prev);
    std::vector<at::Tensor> grads;
    for (const at::Tensor& p : params) grads.push_back(p.grad());
    e.hist = reference_hist(grads, nbins, maxval);
    out.push_back(std::move(e));
  }
  return out;
}

TEST_P(MonitorTraining, EveryStepEqualsTheMetricsByHand) {
  Net net(device());
  MonitorConfig cfg;
  cfg.nbins = 20;
  cfg.maxval = 0.02;
  Monitor monitor(net.named_parameters().pairs(), cfg);
  EXPECT_EQ(monitor.names(), (std::vector<std::string>{"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}));
  Collector c;
  monitor.add_sink(c.sink());
  const auto expected = train(net, monitor, 6, device(), true, cfg.nbins, cfg.maxval);
  monitor.flush();
  ASSERT_EQ(c.steps(), (std::vector<int64_t>{0, 1, 2, 3, 4, 5}));
  const at::Tensor edges = at::linspace(-cfg.maxval, cfg.maxval, cfg.nbins + 1, at::kDouble);
  for (size_t i = 0; i < c.records.size(); ++i) {
    const StepRecord& r = c.records[i];
    expect_scalars(r, expected[i].scalars, 1e-5);
    ASSERT_EQ(r.histograms.size(), 1u);
    EXPECT_EQ(r.histograms[0].name, "grad_hist1d");
    EXPECT_EQ(r.histograms[0].counts, expected[i].hist) << "step " << r.step;
    ASSERT_EQ(r.histograms[0].edges.size(), static_cast<size_t>(cfg.nbins + 1));
    for (int64_t j = 0; j <= cfg.nbins; ++j) EXPECT_DOUBLE_EQ(r.histograms[0].edges[j], edges[j].item<double>());
    int64_t total = 0;
    for (int64_t v : r.histograms[0].counts) total += v;
    EXPECT_EQ(total, 5 * 7 + 7 + 7 * 3 + 3);
  }
  // The histogram is not all in the edge bins: the range and the gradients fit.
  EXPECT_LT(c.records[0].histograms[0].counts.front() + c.records[0].histograms[0].counts.back(), 60);
  // The documented order: loss first, then the global metrics, then per tensor.
  const auto& first = c.records[0].scalars;
  ASSERT_GE(first.size(), 10u);
  const std::vector<std::string> head{"loss",        "grad_norm",    "grad_magnitude",  "weight_magnitude",
                                      "distance",    "update_size",  "weight_norm",     "update_ratio",
                                      "nonfinite_count", "grad_norm/fc1.weight"};
  for (size_t i = 0; i < head.size(); ++i) EXPECT_EQ(first[i].first, head[i]);
}

TEST_P(MonitorTraining, SchedulesGiveExactlyTheirRecords) {
  Net net(device());
  MonitorConfig cfg;
  cfg.param_metrics.schedule = Schedule::every(2);
  cfg.grad_hist.schedule = Schedule::at({1, 4});
  cfg.per_tensor = false;
  Monitor monitor(net.named_parameters().pairs(), cfg);
  EXPECT_TRUE(monitor.due("param_metrics", 4));
  EXPECT_FALSE(monitor.due("param_metrics", 3));
  EXPECT_TRUE(monitor.due("grad_hist", 1));
  EXPECT_FALSE(monitor.due("grad_hist", 2));
  Collector c;
  monitor.add_sink(c.sink());
  const auto expected = train(net, monitor, 8, device(), false, cfg.nbins, cfg.maxval);
  monitor.flush();
  ASSERT_EQ(c.steps(), (std::vector<int64_t>{0, 1, 2, 4, 6}));
  for (const StepRecord& r : c.records) {
    const bool pm = r.step % 2 == 0, hist = r.step == 1 || r.step == 4;
    EXPECT_EQ(r.histograms.size(), hist ? 1u : 0u) << "step " << r.step;
    if (hist) EXPECT_EQ(r.histograms[0].counts, expected[r.step].hist);
    if (!pm) {
      EXPECT_TRUE(r.scalars.empty()) << "step " << r.step;
      continue;
    }
    // update_size is the latest step's change even though steps 1, 3, ... were not measured.
    std::map<std::string, double> want;
    for (const auto& [k, v] : expected[r.step].scalars) {
      if (k.find('/') == std::string::npos) want[k] = v;
    }
    expect_scalars(r, want, 1e-5);
  }
}

TEST_P(MonitorTraining, DisabledQuantitiesAndUntrackedStates) {
  Net net(device());
  MonitorConfig cfg;
  cfg.grad_hist.enabled = false;
  cfg.track_init = false;
  cfg.track_prev = false;
  Monitor monitor(net.named_parameters().pairs(), cfg);
  monitor.request("grad_hist");  // a switched-off quantity stays off
  EXPECT_FALSE(monitor.due("grad_hist", 0));
  Collector c;
  monitor.add_sink(c.sink());
  const auto expected = train(net, monitor, 3, device(), true, cfg.nbins, cfg.maxval, false, false);
  monitor.flush();
  ASSERT_EQ(c.steps(), (std::vector<int64_t>{0, 1, 2}));
  for (const StepRecord& r : c.records) {
    EXPECT_TRUE(r.histograms.empty());
    expect_scalars(r, expected[r.step].scalars, 1e-5);  // no distance / update_size names at all
    for (const auto& kv : r.scalars) {
      EXPECT_EQ(kv.first.find("distance"), std::string::npos);
      EXPECT_EQ(kv.first.find("update_size"), std::string::npos);
    }
  }
}

TEST_P(MonitorTraining, EachMetricItsOwnScheduleAndMeasureNow) {
  Net net(device());
  MonitorConfig cfg;
  cfg.param_metrics.schedule = Schedule::every(2);
  cfg.grad_hist.enabled = false;
  cfg.per_tensor = false;
  cfg.metrics["weight_magnitude"].schedule = Schedule::every(3);
  cfg.metrics["distance"].enabled = false;       // no θ₀ kept
  cfg.metrics["update_ratio"].schedule = Schedule::every(1);
  Monitor monitor(net.named_parameters().pairs(), cfg);
  EXPECT_TRUE(monitor.state_dict().init.empty());
  EXPECT_EQ(monitor.state_dict().prev.size(), 4u);
  EXPECT_TRUE(monitor.due("update_ratio", 1));
  EXPECT_FALSE(monitor.due("grad_norm", 1));
  EXPECT_TRUE(monitor.due("param_metrics", 1));  // some built-in metric is due
  Collector c;
  monitor.add_sink(c.sink());
  monitor.measure_now(-1);  // the untrained network: parameter metrics only
  const auto expected = train(net, monitor, 4, device(), true, cfg.nbins, cfg.maxval, false, true);
  monitor.measure_now(3, {}, std::vector<std::string>{"grad_norm", "update_size", "weight_norm"}, true);
  monitor.flush();
  ASSERT_EQ(c.steps(), (std::vector<int64_t>{-1, 0, 1, 2, 3, 3}));
  auto names = [](const StepRecord& r) {
    std::vector<std::string> n;
    for (const auto& kv : r.scalars) n.push_back(kv.first);
    return n;
  };
  using V = std::vector<std::string>;
  EXPECT_EQ(names(c.records[0]), (V{"weight_magnitude", "weight_norm"}));
  EXPECT_EQ(names(c.records[1]), (V{"loss", "grad_norm", "grad_magnitude", "weight_magnitude", "update_size",
                                    "weight_norm", "update_ratio", "nonfinite_count"}));
  EXPECT_EQ(names(c.records[2]), (V{"update_ratio"}));
  EXPECT_EQ(names(c.records[4]), (V{"weight_magnitude", "update_ratio"}));
  // measure_now after the last step, with its gradients: update_size is never measured there.
  EXPECT_EQ(names(c.records[5]), (V{"grad_norm", "weight_norm"}));
  for (size_t i = 1; i < c.records.size(); ++i) {
    const auto& want = expected[static_cast<size_t>(c.records[i].step)].scalars;
    for (const auto& [k, v] : c.records[i].scalars) EXPECT_CLOSE(v, want.at(k), 1e-5) << k << " at " << i;
  }
  // Off, unknown, and the histogram that is off: errors naming them.
  expect_error_naming([&] { monitor.measure_now(9, {}, std::vector<std::string>{"distance"}); }, "distance", "off");
  expect_error_naming([&] { monitor.measure_now(9, {}, std::vector<std::string>{"grad_hist"}); }, "grad_hist",
                      "hist off");
  expect_error_naming([&] { monitor.measure_now(9, {}, std::vector<std::string>{"nope"}); }, "nope", "unknown");
  MonitorConfig bad;
  bad.metrics["grad_nrom"] = {};
  expect_error_naming([&] { Monitor m(net.named_parameters().pairs(), bad); }, "grad_nrom", "unknown metric");
}

TEST_P(MonitorTraining, PerSampleStatisticsFromCapturesOnDueStepsOnly) {
  Net net(device());
  net.to(torch::kDouble);
  MonitorConfig cfg = families_only();
  cfg.per_sample = {true, Schedule::every(2)};
  Monitor monitor(net.named_parameters().pairs(), cfg);
  Collector c;
  monitor.add_sink(c.sink());
  const std::vector<at::Tensor> params = params_of(net);
  std::vector<at::Tensor> want;  // the statistics of the due steps, from per-sample gradients by hand
  torch::optim::SGD opt(net.parameters(), torch::optim::SGDOptions(0.1));
  for (int64_t step = 0; step < 4; ++step) {
    EXPECT_EQ(monitor.per_sample_armed(), step % 2 == 0) << "step " << step;
    EXPECT_EQ(monitor.due("per_sample", step), step % 2 == 0);
    const at::Tensor x = at::randn({6, 5}, at::TensorOptions().dtype(at::kDouble).device(device()));
    const at::Tensor y = at::randn({6, 3}, x.options());
    if (step % 2 == 0) {
      std::vector<std::vector<at::Tensor>> per(params.size());
      for (int64_t i = 0; i < 6; ++i) {
        opt.zero_grad();
        const at::Tensor half = 0.5 * torch::relu(net.fc1(x.narrow(0, i, 1)));  // the model below
        (net.fc2(half) + net.fc2(half) - y.narrow(0, i, 1)).pow(2).sum().backward();
        for (size_t k = 0; k < params.size(); ++k) per[k].push_back(params[k].grad().detach().clone());
      }
      std::vector<at::Tensor> grads;
      for (const auto& gs : per) grads.push_back(at::stack(gs));
      want.push_back(trainscope::per_sample_stats(grads).stats.cpu());
    }
    opt.zero_grad();
    // The forward pass with the captures: fc1 used once, fc2 twice (its uses add up).
    at::Tensor h = torch::relu(monitor.capture_linear("fc1", x, net.fc1(x), true));
    const at::Tensor half = 0.5 * h;
    const at::Tensor out = monitor.capture_linear("fc2", half, net.fc2(half), true) +
                           monitor.capture_linear("fc2", half, net.fc2(half), true);
    const at::Tensor losses = (out - y).pow(2).sum(1);
    losses.mean().backward();
    opt.step();
    monitor.step(step, losses.detach());
  }
  monitor.flush();
  ASSERT_EQ(c.steps(), (std::vector<int64_t>{0, 2}));
  for (size_t r = 0; r < 2; ++r) {
    const auto got = as_map(c.records[r]);
    for (int64_t k = 0; k < trainscope::kNumPerSampleStats; ++k) {
      const std::string name =
          std::string("per_sample/") + trainscope::per_sample_stat_name(static_cast<trainscope::PerSampleStat>(k));
      ASSERT_TRUE(got.count(name)) << name;
      EXPECT_CLOSE(got.at(name), want[r][k].item<double>(), 1e-9) << name << " at step " << c.records[r].step;
    }
  }
  // Off: capturing is an error naming the family; measure_now never measures it.
  MonitorConfig off;
  Monitor plain(net.named_parameters().pairs(), off);
  const at::Tensor x = at::randn({2, 5}, at::TensorOptions().dtype(at::kDouble).device(device()));
  expect_error_naming([&] { plain.capture_linear("fc1", x, net.fc1(x), true); }, "per_sample", "family off");
  expect_error_naming([&] { monitor.measure_now(9, {}, std::vector<std::string>{"per_sample"}); }, "per_sample",
                      "measure_now");
}

TEST_P(MonitorTraining, PerSampleHistogramOnItsOwnSchedule) {
  Net net(device());
  net.to(torch::kDouble);
  MonitorConfig cfg = families_only();
  cfg.maxval = 0.5;
  cfg.nbins = 40;
  cfg.per_sample = {true, Schedule::every(2)};
  cfg.per_sample_hist = {true, Schedule::every(3)};
  Monitor monitor(net.named_parameters().pairs(), cfg);
  Collector c;
  monitor.add_sink(c.sink());
  const std::vector<at::Tensor> params = params_of(net);
  std::map<int64_t, at::Tensor> want;  // the histogram of the due steps, from per-sample gradients by hand
  torch::optim::SGD opt(net.parameters(), torch::optim::SGDOptions(0.1));
  for (int64_t step = 0; step < 6; ++step) {
    if (step == 4) monitor.request("per_sample_hist");  // arms this step's forward pass at once
    const bool hist_due = step % 3 == 0 || step == 4;
    EXPECT_EQ(monitor.per_sample_armed(), step % 2 == 0 || hist_due) << "step " << step;
    EXPECT_EQ(monitor.due("per_sample_hist", step), hist_due) << "step " << step;
    const at::Tensor x = at::randn({5, 5}, at::TensorOptions().dtype(at::kDouble).device(device()));
    const at::Tensor y = at::randn({5, 3}, x.options());
    if (hist_due) {
      std::vector<at::Tensor> per;
      for (int64_t i = 0; i < 5; ++i) {
        opt.zero_grad();
        const at::Tensor h = torch::relu(net.fc1(x.narrow(0, i, 1)));
        (net.fc2(h) + net.fc2(h) - y.narrow(0, i, 1)).pow(2).sum().backward();
        for (const at::Tensor& p : params) per.push_back(p.grad().detach().clone());
      }
      want[step] = trainscope::grad_hist1d(per, cfg.nbins, cfg.maxval).cpu();
    }
    captured_step(monitor, net, opt, step, x, y);
  }
  monitor.flush();
  ASSERT_EQ(c.steps(), (std::vector<int64_t>{0, 2, 3, 4}));
  for (const StepRecord& r : c.records) {
    const bool hist_due = want.count(r.step) > 0;
    ASSERT_EQ(r.histograms.size(), hist_due ? 1u : 0u) << "step " << r.step;
    EXPECT_EQ(as_map(r).count("per_sample/norm_test"), r.step % 2 == 0 ? 1u : 0u) << "step " << r.step;
    if (!hist_due) continue;
    EXPECT_EQ(r.histograms[0].name, "per_sample_grad_hist1d");
    const at::Tensor got = at::tensor(r.histograms[0].counts, at::kLong);  // int64 counts
    EXPECT_TRUE(at::equal(got, want.at(r.step))) << "step " << r.step << ": " << got << " vs " << want.at(r.step);
    EXPECT_EQ(got.sum().item<int64_t>(), 5 * (5 * 7 + 7 + 7 * 3 + 3)) << "every element of every sample binned";
  }
  expect_error_naming([&] { monitor.measure_now(9, {}, std::vector<std::string>{"per_sample_hist"}); },
                      "per_sample_hist", "measure_now");
}

TEST_P(MonitorTraining, GradVarianceFromCapturesEqualsPerSampleGradientsByHand) {
  Net net(device());
  net.to(torch::kDouble);
  MonitorConfig cfg = families_only();
  cfg.grad_variance = {true, Schedule::every(2)};
  double lr = 0.1;
  cfg.grad_variance_lr = [&] { return lr; };
  Monitor monitor(net.named_parameters().pairs(), cfg);
  Collector c;
  monitor.add_sink(c.sink());
  const std::vector<at::Tensor> params = params_of(net);
  std::map<int64_t, at::Tensor> want;  // [1 + T, 3] from per-sample gradients by hand
  torch::optim::SGD opt(net.parameters(), torch::optim::SGDOptions(0.1));
  for (int64_t step = 0; step < 4; ++step) {
    EXPECT_EQ(monitor.due("grad_variance", step), step % 2 == 0);
    EXPECT_EQ(monitor.per_sample_armed(), step % 2 == 0);
    const at::Tensor x = at::randn({6, 5}, at::TensorOptions().dtype(at::kDouble).device(device()));
    const at::Tensor y = at::randn({6, 3}, x.options());
    if (step % 2 == 0) {
      std::vector<at::Tensor> sums(params.size()), sqs(params.size());
      double loss_sum = 0;
      for (int64_t i = 0; i < 6; ++i) {
        opt.zero_grad();
        const at::Tensor h = torch::relu(net.fc1(x.narrow(0, i, 1)));
        const at::Tensor li = (net.fc2(h) + net.fc2(h) - y.narrow(0, i, 1)).pow(2).sum();
        loss_sum += li.item<double>();
        li.backward();
        for (size_t k = 0; k < params.size(); ++k) {
          const at::Tensor g = params[k].grad().detach();
          sums[k] = sums[k].defined() ? sums[k] + g : g.clone();
          sqs[k] = sqs[k].defined() ? sqs[k] + g.square() : g.square();
        }
      }
      lr = 0.1 * (step + 1);  // read at each due step
      want[step] = trainscope::grad_variance_stats(sums, sqs, 6, at::full({}, loss_sum / 6, x.options()), lr).cpu();
    }
    captured_step(monitor, net, opt, step, x, y);
  }
  monitor.flush();
  ASSERT_EQ(c.steps(), (std::vector<int64_t>{0, 2}));
  const std::vector<std::string> tensors{"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"};  // parameter order
  for (const StepRecord& r : c.records) {
    const auto got = as_map(r);
    const at::Tensor& w = want.at(r.step);
    for (int64_t q = 0; q < trainscope::kNumGradVarianceStats; ++q) {
      const std::string name = std::string("grad_variance/") +
                               trainscope::grad_variance_stat_name(static_cast<trainscope::GradVarianceStat>(q));
      ASSERT_TRUE(got.count(name)) << name;
      EXPECT_CLOSE(got.at(name), w[0][q].item<double>(), 1e-9) << name << " at " << r.step;
      for (size_t t = 0; t < tensors.size(); ++t) {
        ASSERT_TRUE(got.count(name + "/" + tensors[t])) << name << "/" << tensors[t];
        EXPECT_CLOSE(got.at(name + "/" + tensors[t]), w[1 + t][q].item<double>(), 1e-9) << name << "/" << tensors[t];
      }
    }
  }
  // Without a learning rate (or losses) there is no cabs; measure_now never measures the family.
  MonitorConfig no_lr = cfg;
  no_lr.grad_variance_lr = nullptr;
  no_lr.per_tensor = false;
  no_lr.grad_variance.schedule = Schedule::every(1);
  Monitor plain(net.named_parameters().pairs(), no_lr);
  Collector c2;
  plain.add_sink(c2.sink());
  const at::Tensor x = at::randn({4, 5}, at::TensorOptions().dtype(at::kDouble).device(device()));
  const at::Tensor h = torch::relu(plain.capture_linear("fc1", x, net.fc1(x), true));
  plain.capture_linear("fc2", h, net.fc2(h), true).pow(2).sum(1).mean().backward();
  plain.step(0);
  plain.flush();
  ASSERT_EQ(c2.records.size(), 1u);
  std::vector<std::string> names;
  for (const auto& kv : c2.records[0].scalars) names.push_back(kv.first);
  EXPECT_EQ(names, (std::vector<std::string>{"grad_variance/mean_gsnr", "grad_variance/early_stopping"}));
  expect_error_naming([&] { monitor.measure_now(9, {}, std::vector<std::string>{"grad_variance"}); },
                      "grad_variance", "measure_now");
}

TEST_P(MonitorTraining, AlphaOfEachDueUpdateRecordedWithTheNextStep) {
  Net net(device());
  net.to(torch::kDouble);
  MonitorConfig cfg = families_only();
  cfg.alpha = {true, Schedule::every(2)};
  Monitor monitor(net.named_parameters().pairs(), cfg);
  Collector c;
  monitor.add_sink(c.sink());
  const std::vector<at::Tensor> params = params_of(net);
  const auto opts = at::TensorOptions().dtype(at::kDouble).device(device());
  std::vector<at::Tensor> xs, ys, thetas;  // every batch and θ before each step
  for (int64_t s = 0; s < 4; ++s) {
    xs.push_back(at::randn({6, 5}, opts));
    ys.push_back(at::randn({6, 3}, opts));
  }
  // Per-sample losses and gradients [B, P] at the current parameters on batch s, by hand.
  auto per_sample = [&](int64_t s) {
    std::vector<at::Tensor> rows, losses;
    for (int64_t i = 0; i < 6; ++i) {
      for (const at::Tensor& p : params) p.mutable_grad() = at::Tensor();
      const at::Tensor li = (net.fc2(torch::relu(net.fc1(xs[s].narrow(0, i, 1)))) - ys[s].narrow(0, i, 1)).pow(2).sum();
      li.backward();
      std::vector<at::Tensor> g;
      for (const at::Tensor& p : params) g.push_back(p.grad().flatten());
      rows.push_back(at::cat(g));
      losses.push_back(li.detach());
    }
    return std::make_pair(at::stack(losses), at::stack(rows));
  };
  std::vector<std::pair<at::Tensor, at::Tensor>> points;
  torch::optim::SGD opt(net.parameters(), torch::optim::SGDOptions(0.2).momentum(0.5));
  for (int64_t s = 0; s < 4; ++s) {
    EXPECT_TRUE(monitor.per_sample_armed()) << "step " << s;  // every step starts or ends one
    std::vector<at::Tensor> flat;
    for (const at::Tensor& p : params) flat.push_back(p.detach().flatten().clone());
    thetas.push_back(at::cat(flat));
    points.push_back(per_sample(s));
    opt.zero_grad();
    const at::Tensor h = torch::relu(monitor.capture_linear("fc1", xs[s], net.fc1(xs[s]), true));
    const at::Tensor losses = (monitor.capture_linear("fc2", h, net.fc2(h), true) - ys[s]).pow(2).sum(1);
    losses.mean().backward();
    opt.step();
    monitor.step(s, losses.detach());
  }
  monitor.flush();
  std::map<int64_t, double> got;
  for (const StepRecord& r : c.records) {
    const auto m = as_map(r);
    if (m.count("alpha")) got[r.step] = m.at("alpha");
  }
  ASSERT_EQ(got.size(), 2u);
  std::vector<at::Tensor> flat;
  for (const at::Tensor& p : params) flat.push_back(p.detach().flatten());
  thetas.push_back(at::cat(flat));
  for (int64_t start : {0, 2}) {
    const at::Tensor d = thetas[start + 1] - thetas[start];
    const at::Tensor t = d.norm();
    const at::Tensor a = trainscope::alpha_from_moments(
        t, trainscope::alpha_point_moments(points[start].first, at::mv(points[start].second, d), t),
        trainscope::alpha_point_moments(points[start + 1].first, at::mv(points[start + 1].second, d), t));
    ASSERT_TRUE(got.count(start + 1)) << "alpha of step " << start << " is recorded with step " << start + 1;
    EXPECT_CLOSE(got.at(start + 1), a.item<double>(), 1e-9) << "start " << start;
  }
  expect_error_naming([&] { monitor.measure_now(9, {}, std::vector<std::string>{"alpha"}); }, "alpha", "measure_now");
}

TEST_P(MonitorTraining, CurvatureCallsItsLossOnDueStepsOnly) {
  Net net(device());
  net.to(torch::kDouble);
  MonitorConfig cfg = families_only();
  cfg.curvature = {true, Schedule::every(2)};
  cfg.curvature_options.method = trainscope::CurvatureMethod::kExact;
  at::Tensor x, y;
  int calls = 0;
  cfg.curvature_loss = [&] {
    ++calls;
    return (net.forward(x) - y).pow(2).sum(1);
  };
  const std::vector<at::Tensor> params = params_of(net);
  Monitor monitor(net.named_parameters().pairs(), cfg);
  Collector c;
  monitor.add_sink(c.sink());
  std::map<int64_t, trainscope::CurvatureStats> want;
  for (int64_t step = 0; step < 4; ++step) {
    x = at::randn({5, 5}, at::TensorOptions().dtype(at::kDouble).device(device()));
    y = at::randn({5, 3}, x.options());
    if (step % 2 == 0) want[step] = trainscope::curvature_stats(cfg.curvature_loss, params, cfg.curvature_options);
    monitor.step(step);
  }
  monitor.flush();
  EXPECT_EQ(calls, 4) << "two by hand, two by the Monitor";
  ASSERT_EQ(c.steps(), (std::vector<int64_t>{0, 2}));
  for (const StepRecord& r : c.records) {
    const auto got = as_map(r);
    const trainscope::CurvatureStats& w = want.at(r.step);
    EXPECT_CLOSE(got.at("curvature/hess_max_ev"), w.hess_max_ev.item<double>(), 1e-12);
    EXPECT_CLOSE(got.at("curvature/hess_trace"), w.hess_trace.item<double>(), 1e-12);
    EXPECT_CLOSE(got.at("curvature/tic_diag"), w.tic_diag.item<double>(), 1e-12);
    EXPECT_CLOSE(got.at("curvature/tic_trace"), w.tic_trace.item<double>(), 1e-12);
    EXPECT_EQ(got.count("curvature/hess_trace_stderr"), 0u) << "exact";
  }
  MonitorConfig no_loss;
  no_loss.curvature.enabled = true;
  expect_error_naming([&] { Monitor m(net.named_parameters().pairs(), no_loss); }, "curvature_loss", "no closure");
}

TEST_P(MonitorTraining, OnDemandRequestFiresAtTheNextStepOnly) {
  Net net(device());
  MonitorConfig cfg;
  cfg.param_metrics.schedule = Schedule::on_demand();
  cfg.grad_hist.schedule = Schedule::on_demand();
  Monitor monitor(net.named_parameters().pairs(), cfg);
  Collector c;
  monitor.add_sink(c.sink());
  const std::vector<at::Tensor> params = [&] {
    std::vector<at::Tensor> p;
    for (const auto& kv : net.named_parameters().pairs()) p.push_back(kv.second);
    return p;
  }();
  for (auto& p : params) p.mutable_grad() = at::ones_like(p);
  const at::Tensor one = at::ones({}, at::TensorOptions().device(device()));
  monitor.step(0);
  EXPECT_FALSE(monitor.due("param_metrics", 1));
  monitor.request("param_metrics");  // e.g. a task boundary
  EXPECT_TRUE(monitor.due("param_metrics", 1));
  EXPECT_TRUE(monitor.due("param_metrics", 77));
  EXPECT_FALSE(monitor.due("grad_hist", 1));
  {
    at::NoGradGuard g;
    for (auto& p : params) p.add_(one);
  }
  monitor.step(1);
  EXPECT_FALSE(monitor.due("param_metrics", 2));
  monitor.step(2);
  monitor.request("grad_hist");
  monitor.step(3);
  monitor.flush();
  ASSERT_EQ(c.steps(), (std::vector<int64_t>{1, 3}));
  const auto m = as_map(c.records[0]);
  // θ_prev followed every step, so update_size is the last change (every element + 1).
  EXPECT_CLOSE(m.at("update_size"), std::sqrt(5.0 * 7 + 7 + 7 * 3 + 3), 1e-6);
  EXPECT_CLOSE(m.at("distance"), std::sqrt(5.0 * 7 + 7 + 7 * 3 + 3), 1e-6);
  EXPECT_TRUE(c.records[0].histograms.empty());
  EXPECT_TRUE(c.records[1].scalars.empty());
  ASSERT_EQ(c.records[1].histograms.size(), 1u);
  EXPECT_EQ(c.records[1].histograms[0].counts.back(), 5 * 7 + 7 + 7 * 3 + 3);  // all grads 1 > maxval
  expect_error_naming([&] { monitor.request("nope"); }, "nope", "request of an unknown key");
  expect_error_naming([&] { monitor.due("nope", 0); }, "nope", "due of an unknown key");
}

// ---------------------------------------------------------------------------------------------
// Custom quantities

struct Probe : trainscope::Quantity {
  std::string key() const override { return "probe"; }
  std::map<std::string, at::Tensor> compute(const trainscope::QuantityContext& ctx) override {
    calls.push_back(ctx.step);
    saw_names = ctx.names ? *ctx.names : std::vector<std::string>{};
    std::map<std::string, at::Tensor> out;
    at::Tensor sq = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(ctx.params->at(0).device()));
    for (const at::Tensor& g : ctx.grads) sq = sq + g.to(at::kDouble).pow(2).sum();
    out[""] = sq;                                           // grad_norm²
    out["loss_max"] = ctx.losses.max();                     // float32
    out["x_sum"] = ctx.extras->at("x").sum();               // from the training loop
    out["count"] = at::full({1}, static_cast<int64_t>(ctx.grads.size()), ctx.losses.options().dtype(at::kLong));
    return out;
  }
  std::vector<int64_t> calls;
  std::vector<std::string> saw_names;
};

TEST_P(MonitorTraining, CustomQuantityRoundTrips) {
  Net net(device());
  MonitorConfig cfg;
  cfg.param_metrics.schedule = Schedule::every(1);
  cfg.grad_hist.enabled = false;
  cfg.per_tensor = false;
  Monitor monitor(net.named_parameters().pairs(), cfg);
  auto probe = std::make_shared<Probe>();
  monitor.add_quantity(probe, Schedule::at({1, 3}));
  monitor.add_external_quantity("from_python", Schedule::every(2));
  EXPECT_TRUE(monitor.due("probe", 3));
  EXPECT_FALSE(monitor.due("probe", 2));
  EXPECT_TRUE(monitor.due("from_python", 2));
  Collector c;
  monitor.add_sink(c.sink());
  torch::optim::SGD opt(net.parameters(), 0.1);
  std::map<int64_t, std::map<std::string, double>> want;
  for (int64_t s = 0; s < 5; ++s) {
    if (s == 4) monitor.request("probe");
    const Batch b = make_batch(s, device());
    opt.zero_grad();
    const at::Tensor losses = torch::nn::functional::cross_entropy(
        net.forward(b.x), b.y, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone));
    losses.mean().backward();
    opt.step();
    const at::Tensor x = at::arange(4, at::TensorOptions().dtype(at::kFloat).device(device())) * (s + 1);
    std::map<std::string, at::Tensor> extra_scalars;
    if (monitor.due("from_python", s)) {
      extra_scalars["from_python"] = at::full({}, 0.25 * s, at::TensorOptions().device(device()));
    }
    monitor.step(s, losses.detach(), {{"x", x}}, extra_scalars);
    double sq = 0;
    for (const at::Tensor& p : net.parameters()) sq += as_double_cpu(p.grad()).pow(2).sum().item<double>();
    want[s] = {{"probe", sq}, {"probe/loss_max", value(losses.max())}, {"probe/x_sum", 6.0 * (s + 1)},
               {"probe/count", 4.0}};
  }
  monitor.flush();
  EXPECT_EQ(probe->calls, (std::vector<int64_t>{1, 3, 4}));
  EXPECT_EQ(probe->saw_names, monitor.names());
  ASSERT_EQ(c.steps(), (std::vector<int64_t>{0, 1, 2, 3, 4}));
  for (const StepRecord& r : c.records) {
    const auto m = as_map(r);
    const bool due = r.step == 1 || r.step == 3 || r.step == 4;
    EXPECT_EQ(m.count("probe"), due ? 1u : 0u) << "step " << r.step;
    EXPECT_EQ(m.count("from_python"), r.step % 2 == 0 ? 1u : 0u) << "step " << r.step;
    if (r.step % 2 == 0) EXPECT_DOUBLE_EQ(m.at("from_python"), 0.25 * r.step);
    if (!due) continue;
    for (const auto& [k, v] : want[r.step]) EXPECT_CLOSE(m.at(k), v, 1e-6) << k << " at step " << r.step;
    EXPECT_CLOSE(m.at("probe"), m.at("grad_norm") * m.at("grad_norm"), 1e-5);
    // Custom values come after the built-ins, in the documented order.
    EXPECT_EQ(r.scalars.back().first.substr(0, 5), r.step % 2 == 0 ? "from_" : "probe");
  }
}

struct Named : trainscope::Quantity {
  explicit Named(std::string k, at::Tensor v = {}) : k_(std::move(k)), v_(std::move(v)) {}
  std::string key() const override { return k_; }
  std::map<std::string, at::Tensor> compute(const trainscope::QuantityContext&) override { return {{"", v_}}; }
  std::string k_;
  at::Tensor v_;
};

TEST(MonitorErrors, KeysAndArguments) {
  const at::Tensor w = at::ones({3, 2}, at::TensorOptions().requires_grad(true));
  Monitor monitor({{"w", w}});
  monitor.add_quantity(std::make_shared<Named>("mine"));
  expect_error_naming([&] { monitor.add_quantity(std::make_shared<Named>("mine")); }, "mine", "duplicate key");
  expect_error_naming([&] { monitor.add_external_quantity("mine"); }, "mine", "duplicate external key");
  expect_error_naming([&] { monitor.add_quantity(std::make_shared<Named>("param_metrics")); }, "param_metrics",
                      "built-in key");
  expect_error_naming([&] { monitor.add_external_quantity("grad_hist"); }, "grad_hist", "built-in key");
  EXPECT_THROW(monitor.add_quantity(std::make_shared<Named>("")), c10::Error);
  EXPECT_THROW(monitor.add_quantity(nullptr), c10::Error);
  expect_error_naming([&] { monitor.collect_captured(0); }, "collect_captured", "nothing captured");

  expect_error_naming([] { Monitor m(std::vector<std::pair<std::string, at::Tensor>>{}); }, "named_params", "no parameters");
  expect_error_naming([&] { Monitor m({{"a", w}, {"a", w}}); }, "named_params", "duplicate names");
  expect_error_naming([&] { Monitor m({{"a", at::ones({2}, at::kLong)}}); }, "named_params", "integer parameter");
  MonitorConfig cfg;
  cfg.ring_slots = 0;
  expect_error_naming([&] { Monitor m({{"w", w}}, cfg); }, "ring_slots", "ring_slots 0");
  cfg = {};
  cfg.nbins = 0;
  expect_error_naming([&] { Monitor m({{"w", w}}, cfg); }, "nbins", "nbins 0");

  // A quantity must give one-element tensors on the parameters' device.
  Monitor m2({{"w", w}});
  m2.add_quantity(std::make_shared<Named>("vec", at::ones({2}, at::kDouble)));
  expect_error_naming([&] { m2.step(0); }, "vec", "non-scalar quantity");
}

// A custom key or extra scalar never takes a built-in record's name (a record would hold a name
// twice, and a dict built from it would lose the built-in value).
TEST(MonitorErrors, KeysNeverTakeBuiltInRecordNames) {
  const at::Tensor w = at::ones({3, 2}, at::TensorOptions().requires_grad(true));
  Monitor monitor({{"w", w}});
  for (const std::string key : {"loss", "grad_norm", "grad_magnitude", "weight_magnitude", "distance", "update_size",
                                "nonfinite_count", "grad_hist1d"}) {
    expect_error_naming([&] { monitor.add_quantity(std::make_shared<Named>(key)); }, key, "built-in record name");
    expect_error_naming([&] { monitor.add_external_quantity(key); }, key, "built-in record name (external)");
    expect_error_naming([&] { trainscope::check_quantity_key(key, "caller"); }, "caller", "check_quantity_key");
  }
  expect_error_naming([&] { monitor.add_quantity(std::make_shared<Named>("grad_norm/w")); }, "grad_norm/w",
                      "key with '/'");
  expect_error_naming([&] { monitor.add_external_quantity("mine/sub"); }, "mine/sub", "key with '/'");
  trainscope::check_quantity_key("norm_of_grads");  // a name near a built-in one is fine

  const at::Tensor one = at::ones({});
  expect_error_naming([&] { monitor.step(0, {}, {}, {{"grad_norm/w", one}}); }, "grad_norm/w",
                      "extra scalar under a built-in name");
  expect_error_naming([&] { monitor.step(0, {}, {}, {{"loss", one}}); }, "loss", "extra scalar 'loss'");
  const at::Tensor counts = at::zeros({2}, at::TensorOptions().dtype(at::kLong));
  expect_error_naming(
      [&] { monitor.step(0, {}, {}, {}, {{"grad_hist1d", trainscope::HistogramInput{counts, {0.0, 1.0, 2.0}, {}}}}); },
      "grad_hist1d", "extra histogram under the built-in name");
  monitor.step(0, {}, {}, {{"lossy", one}});  // names that only start like a built-in are fine
}

// ---------------------------------------------------------------------------------------------
// Checkpoints: state_dict / load_state_dict

// Plain SGD (no optimizer state to restore) from `first` to `last` (exclusive), monitor.step after each.
void sgd_steps(Net& net, Monitor& monitor, int64_t first, int64_t last, at::Device device) {
  torch::optim::SGD opt(net.parameters(), 0.5);
  for (int64_t s = first; s < last; ++s) {
    const Batch b = make_batch(s, device);
    opt.zero_grad();
    torch::nn::functional::cross_entropy(net.forward(b.x), b.y).backward();
    opt.step();
    monitor.step(s);
  }
}

std::vector<at::Tensor> param_list(Net& net) {
  std::vector<at::Tensor> out;
  for (const auto& kv : net.named_parameters().pairs()) out.push_back(kv.second);
  return out;
}

trainscope::MonitorState cloned(trainscope::MonitorState st) {
  st.init = clones(st.init);
  st.prev = clones(st.prev);
  return st;
}

TEST_P(MonitorTraining, StateDictResumesDistanceAndUpdateSize) {
  MonitorConfig cfg;
  cfg.grad_hist.schedule = Schedule::on_demand();
  cfg.per_tensor = false;
  Net a(device());
  Monitor uninterrupted(a.named_parameters().pairs(), cfg);
  Collector ca;
  uninterrupted.add_sink(ca.sink());
  sgd_steps(a, uninterrupted, 0, 3, device());
  uninterrupted.request("grad_hist");  // pending at the checkpoint
  // The checkpoint: the state (its tensors are the Monitor's own: cloned, as a file would) and the weights.
  const trainscope::MonitorState saved = cloned(uninterrupted.state_dict());
  const std::vector<at::Tensor> weights = clones(param_list(a));
  ASSERT_EQ(saved.step, std::optional<int64_t>(2));
  EXPECT_EQ(saved.names, uninterrupted.names());
  EXPECT_EQ(saved.requested, (std::vector<std::string>{"grad_hist"}));
  ASSERT_EQ(saved.init.size(), 4u);
  ASSERT_EQ(saved.prev.size(), 4u);
  sgd_steps(a, uninterrupted, 3, 6, device());
  uninterrupted.flush();

  // Resumed: another initialisation, the checkpoint's weights, a new Monitor, the saved state.
  at::manual_seed(99);
  Net b(device());
  {
    at::NoGradGuard g;
    const std::vector<at::Tensor> pb = param_list(b);
    for (size_t i = 0; i < pb.size(); ++i) pb[i].copy_(weights[i]);
  }
  Monitor resumed(b.named_parameters().pairs(), cfg);
  Collector cb;
  resumed.add_sink(cb.sink());
  resumed.load_state_dict(saved);
  EXPECT_TRUE(resumed.due("grad_hist", 3));
  EXPECT_EQ(resumed.state_dict(false).step, std::optional<int64_t>(2));
  sgd_steps(b, resumed, 3, 6, device());
  resumed.flush();

  ASSERT_EQ(ca.steps(), (std::vector<int64_t>{0, 1, 2, 3, 4, 5}));
  ASSERT_EQ(cb.steps(), (std::vector<int64_t>{3, 4, 5}));
  for (size_t i = 0; i < 3; ++i) {
    const auto want = as_map(ca.records[3 + i]), got = as_map(cb.records[i]);
    for (const char* name : {"distance", "update_size", "grad_norm", "weight_magnitude"}) {
      EXPECT_CLOSE(got.at(name), want.at(name), 1e-6) << name << " at step " << cb.records[i].step;
    }
    EXPECT_EQ(cb.records[i].histograms.size(), i == 0 ? 1u : 0u);  // the pending request, used once
  }

  // Without parameter copies: nothing of θ₀ / θ_prev in the state; the loading Monitor keeps its own.
  const trainscope::MonitorState light = uninterrupted.state_dict(/*param_copies=*/false);
  EXPECT_TRUE(light.init.empty());
  EXPECT_TRUE(light.prev.empty());
  EXPECT_EQ(light.step, std::optional<int64_t>(5));
  Monitor fresh(b.named_parameters().pairs(), cfg);
  Collector cf;
  fresh.add_sink(cf.sink());
  fresh.load_state_dict(light);
  sgd_steps(b, fresh, 6, 7, device());
  fresh.flush();
  ASSERT_EQ(cf.records.size(), 1u);
  const auto m = as_map(cf.records[0]);
  EXPECT_CLOSE(m.at("distance"), m.at("update_size"), 1e-6);  // θ₀ = the parameters at construction
}

TEST(MonitorState, OtherParametersNameWhatDiffers) {
  const auto opt = at::TensorOptions().requires_grad(true);
  const at::Tensor w = at::ones({3, 2}, opt), b = at::ones({2}, opt), v = at::ones({4}, opt);
  Monitor source({{"w", w}, {"b", b}});
  const trainscope::MonitorState st = source.state_dict();
  Monitor other_names({{"w", w}, {"v", v}});
  expect_error_naming([&] { other_names.load_state_dict(st); }, "'v'", "a parameter the state lacks");
  expect_error_naming([&] { other_names.load_state_dict(st); }, "'b'", "a parameter only the state has");
  Monitor other_order({{"b", b}, {"w", w}});
  expect_error_naming([&] { other_order.load_state_dict(st); }, "order", "the same names in another order");
  Monitor other_shape({{"w", at::ones({2, 3}, opt)}, {"b", b}});
  expect_error_naming([&] { other_shape.load_state_dict(st); }, "'w'", "another shape");
  expect_error_naming([&] { other_shape.load_state_dict(st); }, "shape", "another shape");
  trainscope::MonitorState unknown = source.state_dict();
  unknown.requested = {"nope"};
  expect_error_naming([&] { source.load_state_dict(unknown); }, "nope", "an unknown requested key");

  // Sharded parameters: a state holds this rank's shards; another rank's is refused.
  MonitorConfig cfg;
  cfg.group = trainscope::RankGroup(1, 2, [](at::Tensor&) {});
  cfg.layouts = {trainscope::TensorLayout{trainscope::Placement::kSharded, 2},
                 trainscope::TensorLayout{trainscope::Placement::kSharded, 1}};
  Monitor rank1({{"w", w}, {"b", b}}, cfg);
  expect_error_naming([&] { rank1.load_state_dict(st); }, "rank", "another rank's shards");
  rank1.load_state_dict(source.state_dict(/*param_copies=*/false));  // no shards in it: fine
  EXPECT_EQ(rank1.state_dict().rank, 1);
  EXPECT_EQ(rank1.state_dict().world_size, 2);
}

TEST(MonitorGrads, MissingGradientsReadAsZerosOrNaN) {
  const at::Tensor a = at::full({4}, 2.0, at::TensorOptions().requires_grad(true));
  const at::Tensor b = at::full({2}, -1.0, at::TensorOptions().requires_grad(true));
  MonitorConfig cfg;
  cfg.grad_hist.schedule = Schedule::every(1);
  Monitor monitor({{"a", a}, {"b", b}}, cfg);
  Collector c;
  monitor.add_sink(c.sink());
  monitor.step(0);  // no gradients at all
  a.mutable_grad() = at::full({4}, 0.01);
  monitor.step(1);  // only a has one
  monitor.flush();
  ASSERT_EQ(c.records.size(), 2u);
  const auto m0 = as_map(c.records[0]), m1 = as_map(c.records[1]);
  EXPECT_TRUE(std::isnan(m0.at("grad_norm")));
  EXPECT_CLOSE(m0.at("weight_magnitude"), 10.0 / 6.0, 1e-6);  // float32 parameters
  for (int64_t v : c.records[0].histograms[0].counts) EXPECT_EQ(v, 0);
  EXPECT_CLOSE(m1.at("grad_norm"), 0.02, 1e-6);
  EXPECT_DOUBLE_EQ(m1.at("grad_norm/b"), 0.0);
  int64_t total = 0;
  for (int64_t v : c.records[1].histograms[0].counts) total += v;
  EXPECT_EQ(total, 6);
}

// ---------------------------------------------------------------------------------------------
// Delivery: only at poll/step/flush, in step order, with a ring smaller than the steps in flight

TEST_P(MonitorTraining, RingSmallerThanStepsStillDeliversInOrder) {
  const at::Tensor w = at::randn({64, 32}, at::TensorOptions().device(device())).requires_grad_(true);
  MonitorConfig cfg;
  cfg.ring_slots = 2;
  Monitor monitor({{"w", w}}, cfg);
  Collector c;
  monitor.add_sink(c.sink());
  std::vector<double> want;
  for (int64_t s = 0; s < 9; ++s) {
    w.mutable_grad() = at::full_like(w, 0.001 * (s + 1));
    monitor.step(10 * s);
    EXPECT_LE(static_cast<int64_t>(c.records.size()), s);  // never the step just made
    want.push_back(0.001 * (s + 1) * std::sqrt(64.0 * 32));
  }
  monitor.flush();
  ASSERT_EQ(c.records.size(), 9u);
  for (int64_t s = 0; s < 9; ++s) {
    EXPECT_EQ(c.records[s].step, 10 * s);
    EXPECT_CLOSE(as_map(c.records[s]).at("grad_norm"), want[s], 1e-5);
  }
  EXPECT_EQ(monitor.poll(), 0);
}

TEST(MonitorDelivery, CpuRecordsArriveAtTheNextPoll) {
  const at::Tensor w = at::ones({3}, at::TensorOptions().requires_grad(true));
  Monitor monitor({{"w", w}});
  Collector c;
  monitor.add_sink(c.sink());
  monitor.step(0);
  EXPECT_TRUE(c.records.empty());
  EXPECT_EQ(monitor.poll(), 1);
  EXPECT_EQ(c.steps(), (std::vector<int64_t>{0}));
  monitor.step(1);
  monitor.step(2);  // hands over step 1 first
  EXPECT_EQ(c.steps(), (std::vector<int64_t>{0, 1}));
  {
    Monitor scoped({{"w", w}});
    scoped.add_sink(c.sink());
    scoped.step(7);
  }  // the destructor flushes
  EXPECT_EQ(c.steps(), (std::vector<int64_t>{0, 1, 7}));
}

// Histograms computed by the caller travel with the step: 1-D and 2-D, names and edges kept.
TEST(MonitorHistograms, ExtraHistogramsRoundTrip) {
  const at::Tensor w = at::ones({3}, at::TensorOptions().requires_grad(true));
  trainscope::MonitorConfig cfg;
  cfg.grad_hist.enabled = false;
  Monitor monitor({{"w", w}}, cfg);
  Collector c;
  monitor.add_sink(c.sink());
  const at::Tensor h1 = at::tensor({3, 0, 5}, at::TensorOptions().dtype(at::kLong));
  const at::Tensor h2 = at::arange(6, at::TensorOptions().dtype(at::kInt)).reshape({2, 3});  // any integer dtype
  monitor.step(0, {}, {}, {},
               {{"one", trainscope::HistogramInput{h1, {-1.0, 0.0, 1.0, 2.0}, {}}},
                {"two", trainscope::HistogramInput{h2, {0.0, 1.0, 2.0}, {-3.0, -2.0, -1.0, 0.0}}}});
  monitor.step(1);  // no histogram this step
  monitor.flush();
  ASSERT_EQ(c.records.size(), 2u);
  const auto& hs = c.records[0].histograms;
  ASSERT_EQ(hs.size(), 2u);
  EXPECT_EQ(hs[0].name, "one");
  EXPECT_EQ(hs[0].counts, (std::vector<int64_t>{3, 0, 5}));
  EXPECT_EQ(hs[0].edges, (std::vector<double>{-1.0, 0.0, 1.0, 2.0}));
  EXPECT_TRUE(hs[0].edges2.empty());
  EXPECT_EQ(hs[1].name, "two");
  EXPECT_EQ(hs[1].counts, (std::vector<int64_t>{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(hs[1].edges2, (std::vector<double>{-3.0, -2.0, -1.0, 0.0}));
  EXPECT_TRUE(c.records[1].histograms.empty());

  const auto bad = [&](trainscope::HistogramInput h) { monitor.step(2, {}, {}, {}, {{"bad", h}}); };
  expect_error_naming([&] { bad({h1, {0.0, 1.0}, {}}); }, "edges", "counts and edges disagree");
  expect_error_naming([&] { bad({h1.to(at::kFloat), {0.0, 1.0, 2.0, 3.0}, {}}); }, "counts", "float counts");
  expect_error_naming([&] { bad({h2, {0.0, 1.0, 2.0}, {0.0, 1.0}}); }, "counts", "2-D shape");
}

// ---------------------------------------------------------------------------------------------
// File sinks

std::filesystem::path temp_path(const std::string& name) {
  auto dir = std::filesystem::temp_directory_path() / ("trainscope_monitor_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  auto p = dir / name;
  std::filesystem::remove(p);
  return p;
}

std::vector<std::string> read_lines(const std::filesystem::path& p) {
  std::ifstream f(p);
  std::vector<std::string> lines;
  for (std::string l; std::getline(f, l);) lines.push_back(l);
  return lines;
}

// The value after `"key": ` in a JSON line: a number, or NaN for null.
double json_value(const std::string& line, const std::string& key) {
  const std::string pat = "\"" + key + "\": ";
  const size_t pos = line.find(pat);
  EXPECT_NE(pos, std::string::npos) << key << " not in " << line;
  if (pos == std::string::npos) return -12345;
  const char* p = line.c_str() + pos + pat.size();
  if (std::string(p, 4) == "null") return kNaN;
  return std::strtod(p, nullptr);
}

std::vector<int64_t> json_int_array(const std::string& line, const std::string& key) {
  const std::string pat = "\"" + key + "\": [";
  const size_t pos = line.find(pat);
  EXPECT_NE(pos, std::string::npos);
  std::vector<int64_t> out;
  if (pos == std::string::npos) return out;
  std::stringstream ss(line.substr(pos + pat.size(), line.find(']', pos) - pos - pat.size()));
  for (std::string t; std::getline(ss, t, ',');) out.push_back(std::stoll(t));
  return out;
}

TEST(MonitorSinks, JsonlAndCsvParseBackToTheSameNumbers) {
  const at::Tensor w = at::randn({5, 4}, at::TensorOptions().dtype(at::kDouble)).requires_grad_(true);
  MonitorConfig cfg;
  cfg.nbins = 8;
  Monitor monitor({{"w", w}}, cfg);
  monitor.add_quantity(std::make_shared<Named>("odd", at::full({}, kNaN, at::kDouble)));
  const auto jsonl = temp_path("m.jsonl"), csv = temp_path("m.csv");
  Collector c;
  monitor.add_sink(c.sink());
  monitor.add_sink(trainscope::JsonlSink(jsonl.string()));
  monitor.add_sink(trainscope::CsvSink(csv.string()));
  for (int64_t s = 0; s < 3; ++s) {
    w.mutable_grad() = at::randn({5, 4}, at::kDouble) * 0.03;
    monitor.step(s, at::full({2}, 1.0 / 3.0 + s, at::kDouble));
  }
  monitor.flush();
  ASSERT_EQ(c.records.size(), 3u);

  const auto lines = read_lines(jsonl);
  ASSERT_EQ(lines.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    const StepRecord& r = c.records[i];
    EXPECT_EQ(json_value(lines[i], "step"), static_cast<double>(r.step));
    for (const auto& [k, v] : r.scalars) {
      const double got = json_value(lines[i], k);
      if (std::isnan(v)) {
        EXPECT_TRUE(std::isnan(got)) << k;
      } else {
        EXPECT_EQ(got, v) << k;  // 17 digits: exact
      }
    }
    EXPECT_NE(lines[i].find("\"odd\": null"), std::string::npos);
    EXPECT_EQ(json_int_array(lines[i], "counts"), r.histograms[0].counts);
    EXPECT_NE(lines[i].find("\"grad_hist1d\": {\"edges\": [-0.05, "), std::string::npos) << lines[i];
  }

  // A second sink on the same CSV appends without a second header.
  { auto again = trainscope::CsvSink(csv.string()); again(c.records[0]); }
  const auto rows = read_lines(csv);
  ASSERT_FALSE(rows.empty());
  EXPECT_EQ(rows[0], "step,name,value");
  size_t expected_rows = 1;
  for (const auto& r : c.records) expected_rows += r.scalars.size();
  expected_rows += c.records[0].scalars.size();
  ASSERT_EQ(rows.size(), expected_rows);
  size_t k = 1;
  for (int rep = 0; rep < 2; ++rep) {
    for (size_t i = 0; i < (rep == 0 ? c.records.size() : 1); ++i) {
      for (const auto& [name, v] : c.records[i].scalars) {
        const std::string& row = rows[k++];
        const size_t a = row.find(','), b = row.rfind(',');
        EXPECT_EQ(std::stoll(row.substr(0, a)), c.records[i].step);
        EXPECT_EQ(row.substr(a + 1, b - a - 1), name);
        const double got = std::strtod(row.c_str() + b + 1, nullptr);
        if (std::isnan(v)) {
          EXPECT_EQ(row.substr(b + 1), "nan");
        } else {
          EXPECT_EQ(got, v) << row;
        }
      }
    }
  }
}

TEST(MonitorSinks, BadPathNamesThePath) {
  expect_error_naming([] { trainscope::JsonlSink("/nonexistent_dir_trainscope/x.jsonl"); }, "path", "JsonlSink");
  expect_error_naming([] { trainscope::CsvSink("/nonexistent_dir_trainscope/x.csv"); }, "path", "CsvSink");
}

INSTANTIATE_TEST_SUITE_P(Devices, MonitorTraining, testing::Values(false, true),
                         [](const testing::TestParamInfo<bool>& i) { return i.param ? "cuda" : "cpu"; });

// ---------------------------------------------------------------------------------------------
// CUDA graphs: a captured step, collected after each replay, equals the eager one (CUDA builds)

#if defined(TRAINSCOPE_WITH_CUDA)
TEST(MonitorCudaGraph, CapturedStepCollectedAfterReplaysEqualsEager) {
  SKIP_WITHOUT_CUDA();
  const auto opt = at::TensorOptions().device(cuda0());
  const at::Tensor w = at::randn({33, 17}, opt).requires_grad_(true);
  const at::Tensor b = at::randn({17}, opt).requires_grad_(true);
  w.mutable_grad() = at::zeros_like(w);
  b.mutable_grad() = at::zeros_like(b);
  const at::Tensor losses = at::zeros({8}, opt);
  const at::Tensor extra = at::zeros({}, opt);
  MonitorConfig cfg;
  cfg.nbins = 16;
  Monitor graphed({{"w", w}, {"b", b}}, cfg), eager({{"w", w}, {"b", b}}, cfg);
  Collector cg, ce;
  graphed.add_sink(cg.sink());
  eager.add_sink(ce.sink());

  auto set_state = [&](int64_t k) {
    at::NoGradGuard g;
    at::manual_seed(k);
    w.add_(at::randn_like(w) * 0.01);
    b.add_(at::randn_like(b) * 0.01);
    w.grad().copy_(at::randn_like(w) * 0.02);
    b.grad().copy_(at::randn_like(b) * 0.02);
    losses.copy_(at::rand_like(losses));
    extra.fill_(static_cast<double>(k));
  };

  at::cuda::CUDAStream side = c10::cuda::getStreamFromPool();
  at::cuda::CUDAGraph graph;
  set_state(0);
  torch::cuda::synchronize();
  {
    c10::cuda::CUDAStreamGuard guard(side);
    graphed.step(0, losses, {}, {{"extra", extra}});  // warm-up, eager
    eager.step(0, losses, {}, {{"extra", extra}});
    // Schedules are evaluated here, for the step number given (every(1): due).
    graph.capture_begin();
    graphed.step(1, losses, {}, {{"extra", extra}});
    graph.capture_end();
  }
  torch::cuda::synchronize();
  for (int64_t k = 1; k <= 5; ++k) {
    set_state(k);
    graph.replay();
    graphed.collect_captured(k);
    eager.step(k, losses, {}, {{"extra", extra}});
  }
  graphed.flush();
  eager.flush();
  ASSERT_EQ(cg.steps(), (std::vector<int64_t>{0, 1, 2, 3, 4, 5}));
  ASSERT_EQ(ce.steps(), cg.steps());
  for (size_t i = 1; i < cg.records.size(); ++i) {
    const auto g = as_map(cg.records[i]), e = as_map(ce.records[i]);
    ASSERT_EQ(g.size(), e.size());
    for (const auto& [k, v] : e) EXPECT_CLOSE(g.at(k), v, 1e-12) << k << " at step " << i;
    EXPECT_DOUBLE_EQ(g.at("extra"), static_cast<double>(i));
    EXPECT_GT(g.at("update_size"), 0.0);
    EXPECT_EQ(cg.records[i].histograms[0].counts, ce.records[i].histograms[0].counts);
  }
}
#endif

}  // namespace
