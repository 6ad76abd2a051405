// Kernel-level benchmark of the torch-free launcher trainscope::cuda::param_stats_launch
// (cuda/param_stats.h) on a GPT-style float32 parameter list.
//
//   bench_param_stats [--sizes 25M,125M,1B] [--repeats 50] [--warmup 5]
//                     [--chunk-elems N] [--json OUT.json]
//
// For each size: the parameter list of a GPT-2-style model (token and position embeddings; per
// layer two layer norms, qkv / attention-projection / two MLP matrices and their biases; a final
// layer norm), n_layer and d_model chosen as bench_param_stats.py chooses them, each tensor of
// each of g, θ, θ₀, θ_prev at its own 512-byte aligned offset (the PyTorch caching allocator's
// rounding). Each flag subset is timed with CUDA events around single launches (median of
// --repeats after --warmup), and reported as bytes moved (each array the flags read, once, plus
// θ_prev written once with refresh), GB/s and a fraction of the bandwidth of a large
// device-to-device cudaMemcpy (bytes read + bytes written).
//
// Without a GPU it says so and exits 0.
#include "cuda/param_stats.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace ts = trainscope::cuda;

namespace {

[[noreturn]] void die(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::fputs("bench_param_stats: ", stderr);
  std::vfprintf(stderr, fmt, ap);
  std::fputc('\n', stderr);
  va_end(ap);
  std::exit(1);
}

#define CHECK_CUDA(expr)                                                                     \
  do {                                                                                       \
    const cudaError_t err_ = (expr);                                                         \
    if (err_ != cudaSuccess)                                                                 \
      die("%s:%d: %s: %s", __FILE__, __LINE__, #expr, cudaGetErrorString(err_));             \
  } while (0)

// ---------------------------------------------------------------------------------------------
// The parameter list (kept identical to gpt_config / gpt_shapes in bench_param_stats.py).

struct GptConfig {
  int64_t vocab, ctx, d_model, n_layer, params;
};

GptConfig gpt_config(int64_t target) {
  int64_t vocab = 512, ctx = 64, step = 16;
  if (target >= 20000000) {
    vocab = 50257;
    ctx = 1024;
    step = 64;
  }
  bool have_in = false, have_any = false;
  double in_key[2] = {0, 0}, any_key[2] = {0, 0};
  GptConfig best_in{}, best_any{};
  for (int64_t d = step; d <= 8192; d += step) {
    const int64_t fixed = (vocab + ctx) * d + 2 * d;
    const int64_t per_layer = 12 * d * d + 13 * d;
    for (int64_t L = 1; L <= 128; ++L) {
      const int64_t total = fixed + L * per_layer;
      const double size_err = std::fabs(std::log(static_cast<double>(total) / static_cast<double>(target)));
      const double aspect_err = std::fabs(std::log(static_cast<double>(d) / static_cast<double>(L) / 64.0));
      const GptConfig c{vocab, ctx, d, L, total};
      if (size_err <= std::log(1.05) &&
          (!have_in || aspect_err < in_key[0] || (aspect_err == in_key[0] && size_err < in_key[1]))) {
        have_in = true;
        in_key[0] = aspect_err;
        in_key[1] = size_err;
        best_in = c;
      }
      if (!have_any || size_err < any_key[0] || (size_err == any_key[0] && aspect_err < any_key[1])) {
        have_any = true;
        any_key[0] = size_err;
        any_key[1] = aspect_err;
        best_any = c;
      }
    }
  }
  return have_in ? best_in : best_any;
}

// Element counts of every parameter, in model.parameters() order.
std::vector<int64_t> gpt_numels(const GptConfig& c) {
  const int64_t d = c.d_model;
  std::vector<int64_t> n = {c.vocab * d, c.ctx * d};
  for (int64_t i = 0; i < c.n_layer; ++i) {
    const int64_t layer[] = {d, d, 3 * d * d, 3 * d, d * d, d, d, d, 4 * d * d, 4 * d, 4 * d * d, d};
    n.insert(n.end(), std::begin(layer), std::end(layer));
  }
  n.push_back(d);
  n.push_back(d);
  return n;
}

// "25M" -> 25000000; K, M, B (or G) suffixes, or a plain integer.
int64_t parse_size(const std::string& s) {
  if (s.empty()) die("empty size");
  double scale = 1;
  std::string num = s;
  switch (s.back()) {
    case 'k': case 'K': scale = 1e3; num.pop_back(); break;
    case 'm': case 'M': scale = 1e6; num.pop_back(); break;
    case 'b': case 'B': case 'g': case 'G': scale = 1e9; num.pop_back(); break;
    default: break;
  }
  char* end = nullptr;
  const double v = std::strtod(num.c_str(), &end);
  if (num.empty() || end == nullptr || *end != '\0' || !(v * scale >= 1000))
    die("bad size '%s' (expected e.g. 25M, 125M, 1B; at least 1K)", s.c_str());
  return static_cast<int64_t>(v * scale);
}

// ---------------------------------------------------------------------------------------------
// Inputs.

__device__ uint64_t mix64(uint64_t x) {  // splitmix64 finaliser
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// out[i] = (base ? base[i] : 0) + stddev · N(0, 1), from a counter-based hash (Box-Muller).
__global__ void fill_normal(float* out, const float* base, int64_t n, uint64_t seed, float stddev) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const uint64_t h = mix64(seed ^ mix64(static_cast<uint64_t>(i)));
    const float u1 = (static_cast<float>(h >> 40) + 1.0f) * (1.0f / 16777217.0f);  // (0, 1]
    const float u2 = static_cast<float>((h >> 16) & 0xffffffu) * (1.0f / 16777216.0f);
    const float z = sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
    out[i] = (base != nullptr ? base[i] : 0.0f) + stddev * z;
  }
}

void fill(float* out, const float* base, int64_t n, uint64_t seed, float stddev, cudaStream_t s) {
  fill_normal<<<1024, 256, 0, s>>>(out, base, n, seed, stddev);
  CHECK_CUDA(cudaGetLastError());
}

constexpr float kGradStd = 0.02f;         // gradients spread over ~40 of the 100 bins
constexpr float kNarrowGradStd = 1e-4f;   // real gradients: nearly all in the two central bins

// One input set: each array is one allocation holding every tensor at a 512-byte aligned offset.
struct InputSet {
  float* g = nullptr;
  float* p = nullptr;
  float* p0 = nullptr;
  float* pp = nullptr;
  std::vector<ts::TensorDesc> desc;
};

constexpr int64_t kAlignElems = 512 / sizeof(float);

int64_t arena_elems(const std::vector<int64_t>& numel) {
  int64_t total = 0;
  for (int64_t n : numel) total += (n + kAlignElems - 1) / kAlignElems * kAlignElems;
  return total;
}

InputSet make_set(const std::vector<int64_t>& numel, uint64_t seed, cudaStream_t s) {
  InputSet set;
  const int64_t elems = arena_elems(numel);
  const size_t bytes = sizeof(float) * static_cast<size_t>(elems);
  CHECK_CUDA(cudaMalloc(&set.g, bytes));
  CHECK_CUDA(cudaMalloc(&set.p, bytes));
  CHECK_CUDA(cudaMalloc(&set.p0, bytes));
  CHECK_CUDA(cudaMalloc(&set.pp, bytes));
  // g ~ N(0, 0.02²) (about 1 % beyond ±0.05, so the edge bins fill), θ ~ N(0, 0.02²),
  // θ₀ = θ + N(0, 0.01²), θ_prev = θ + N(0, 0.001²): as bench_param_stats.py.
  fill(set.g, nullptr, elems, seed * 4 + 0, kGradStd, s);
  fill(set.p, nullptr, elems, seed * 4 + 1, 0.02f, s);
  fill(set.p0, set.p, elems, seed * 4 + 2, 0.01f, s);
  fill(set.pp, set.p, elems, seed * 4 + 3, 0.001f, s);
  int64_t off = 0;
  for (int64_t n : numel) {
    set.desc.push_back({set.g + off, set.p + off, set.p0 + off, set.pp + off, n, ts::DType::kFloat32, 1});
    off += (n + kAlignElems - 1) / kAlignElems * kAlignElems;
  }
  return set;
}

void free_set(InputSet& s) {
  CHECK_CUDA(cudaFree(s.g));
  CHECK_CUDA(cudaFree(s.p));
  CHECK_CUDA(cudaFree(s.p0));
  CHECK_CUDA(cudaFree(s.pp));
  s = InputSet{};
}

// ---------------------------------------------------------------------------------------------
// Timing.

struct Timing {
  double median_ms, min_ms;
};

// CUDA-event time of each of `repeats` back-to-back calls of `enqueue(i)` on stream s.
template <typename F>
Timing time_events(F enqueue, int warmup, int repeats, cudaStream_t s) {
  for (int i = 0; i < warmup; ++i) enqueue(i);
  CHECK_CUDA(cudaStreamSynchronize(s));
  std::vector<cudaEvent_t> ev(2 * static_cast<size_t>(repeats));
  for (auto& e : ev) CHECK_CUDA(cudaEventCreate(&e));
  for (int i = 0; i < repeats; ++i) {
    CHECK_CUDA(cudaEventRecord(ev[2 * i], s));
    enqueue(i);
    CHECK_CUDA(cudaEventRecord(ev[2 * i + 1], s));
  }
  CHECK_CUDA(cudaStreamSynchronize(s));
  std::vector<double> ms(repeats);
  for (int i = 0; i < repeats; ++i) {
    float t = 0;
    CHECK_CUDA(cudaEventElapsedTime(&t, ev[2 * i], ev[2 * i + 1]));
    ms[i] = t;
  }
  for (auto& e : ev) CHECK_CUDA(cudaEventDestroy(e));
  std::sort(ms.begin(), ms.end());
  const size_t n = ms.size();
  const double median = n % 2 ? ms[n / 2] : 0.5 * (ms[n / 2 - 1] + ms[n / 2]);
  return {median, ms.front()};
}

struct CopyBandwidth {
  size_t bytes_per_copy;
  double median_ms, gbps;  // gbps counts bytes read + bytes written
};

CopyBandwidth measure_copy(int warmup, int repeats, cudaStream_t s) {
  size_t free_b = 0, total_b = 0;
  CHECK_CUDA(cudaMemGetInfo(&free_b, &total_b));
  const size_t bytes = std::min<size_t>(size_t{1} << 30, free_b / 8) / 256 * 256;
  void *src = nullptr, *dst = nullptr;
  CHECK_CUDA(cudaMalloc(&src, bytes));
  CHECK_CUDA(cudaMalloc(&dst, bytes));
  CHECK_CUDA(cudaMemsetAsync(src, 0x3c, bytes, s));
  const Timing t = time_events(
      [&](int) { CHECK_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, s)); },
      warmup, repeats, s);
  CHECK_CUDA(cudaFree(src));
  CHECK_CUDA(cudaFree(dst));
  return {bytes, t.median_ms, 2.0 * static_cast<double>(bytes) / (t.median_ms * 1e-3) / 1e9};
}

// ---------------------------------------------------------------------------------------------

struct FlagSet {
  const char* name;
  uint32_t flags;
  float grad_std;
};

constexpr uint32_t kAll = ts::kGradSq | ts::kGradAbs | ts::kParamAbs | ts::kParamSq | ts::kDistSq |
                          ts::kUpdateSq | ts::kRefreshPrev;

// The last entry redraws the gradients narrow: the histogram's worst case for atomic contention.
const FlagSet kFlagSets[] = {
    {"grad-only", ts::kGradSq | ts::kGradAbs, kGradStd},
    {"grad+hist", ts::kGradSq | ts::kGradAbs | ts::kHistogram, kGradStd},
    {"all-no-hist", kAll, kGradStd},
    {"all+hist", kAll | ts::kHistogram, kGradStd},
    {"all+hist-narrow", kAll | ts::kHistogram, kNarrowGradStd},
};

// Bytes a call with these flags moves per element: each array it reads once, θ_prev written once.
int bytes_per_elem(uint32_t f, int elem_size) {
  const int arrays = int(ts::reads_grad(f)) + int(ts::reads_param(f)) + int(ts::reads_init(f)) +
                     int(ts::reads_prev(f)) + int((f & ts::kRefreshPrev) != 0);
  return arrays * elem_size;
}

struct Row {
  std::string size;
  GptConfig cfg;
  int64_t tensors = 0;
  int sets = 0;
  std::string skipped;
  struct Entry {
    const char* name;
    uint32_t flags;
    int64_t bytes;
    Timing t;
    double gbps;
  };
  std::vector<Entry> entries;
};

struct Options {
  std::vector<std::string> sizes = {"25M", "125M", "1B"};
  int repeats = 50;
  int warmup = 5;
  int64_t chunk_elems = ts::kDefaultChunkElems;
  std::string json;
};

void usage(FILE* f) {
  std::fprintf(f,
               "usage: bench_param_stats [--sizes 25M,125M,1B] [--repeats N (50)] [--warmup N (5)]\n"
               "                         [--chunk-elems N (%" PRId64 ")] [--json OUT.json]\n",
               ts::kDefaultChunkElems);
}

Options parse_args(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) die("%s needs a value", a.c_str());
      return argv[++i];
    };
    if (a == "--sizes") {
      o.sizes.clear();
      std::string list = value(), item;
      for (size_t pos = 0; pos <= list.size(); ++pos) {
        if (pos == list.size() || list[pos] == ',') {
          if (!item.empty()) o.sizes.push_back(item);
          item.clear();
        } else {
          item += list[pos];
        }
      }
      if (o.sizes.empty()) die("--sizes is empty");
    } else if (a == "--repeats") {
      o.repeats = std::atoi(value().c_str());
    } else if (a == "--warmup") {
      o.warmup = std::atoi(value().c_str());
    } else if (a == "--chunk-elems") {
      o.chunk_elems = std::atoll(value().c_str());
    } else if (a == "--json") {
      o.json = value();
    } else if (a == "-h" || a == "--help") {
      usage(stdout);
      std::exit(0);
    } else {
      usage(stderr);
      die("unknown argument '%s'", a.c_str());
    }
  }
  if (o.repeats < 1 || o.warmup < 0) die("--repeats must be >= 1 and --warmup >= 0");
  if (o.chunk_elems <= 0 || o.chunk_elems % 1024 != 0) die("--chunk-elems must be a positive multiple of 1024");
  for (const auto& s : o.sizes) parse_size(s);
  return o;
}

Row bench_size(const std::string& label, const Options& o, int64_t l2_bytes, cudaStream_t stream) {
  Row row;
  row.size = label;
  row.cfg = gpt_config(parse_size(label));
  const std::vector<int64_t> numel = gpt_numels(row.cfg);
  row.tensors = static_cast<int64_t>(numel.size());
  const int64_t n = row.cfg.params;
  const int64_t T = row.tensors;

  // Rotate among input sets while one set would sit in L2.
  const int64_t per_set = 4 * static_cast<int64_t>(sizeof(float)) * arena_elems(numel);
  row.sets = per_set >= 4 * l2_bytes
                 ? 1
                 : static_cast<int>(std::min<int64_t>(64, std::max<int64_t>(2, ts::ceil_div(4 * l2_bytes, per_set))));

  const ts::HistSpec hist = ts::make_hist_spec(100, 0.05);  // SPEC.md §4 defaults
  ts::ParamStatsArgs args{};
  args.num_tensors = T;
  args.hist_spec = hist;
  args.chunk_elems = o.chunk_elems;
  args.out_dtype = ts::DType::kFloat32;

  // Workspace: the same for every flag subset (it depends on element counts and chunking only).
  std::vector<ts::TensorDesc> sizing(static_cast<size_t>(T));
  for (int64_t i = 0; i < T; ++i) sizing[i].numel = numel[i];
  args.tensors = sizing.data();
  const size_t ws_bytes = ts::param_stats_workspace_bytes(args);

  size_t free_b = 0, total_b = 0;
  CHECK_CUDA(cudaMemGetInfo(&free_b, &total_b));
  const size_t out_bytes = sizeof(float) * (ts::kNumSlots * (T + 1)) + sizeof(int64_t) * (T + 1) +
                           sizeof(int64_t) * static_cast<size_t>(hist.nbins * (T + 1));
  const double need = static_cast<double>(row.sets) * static_cast<double>(per_set) +
                      static_cast<double>(ws_bytes + out_bytes) + (64 << 20);
  if (need > 0.95 * static_cast<double>(free_b)) {
    char msg[160];
    std::snprintf(msg, sizeof msg, "needs about %.1f GiB of device memory, %.1f GiB free",
                  need / 1073741824.0, static_cast<double>(free_b) / 1073741824.0);
    row.skipped = msg;
    return row;
  }

  std::vector<InputSet> sets;
  for (int k = 0; k < row.sets; ++k) sets.push_back(make_set(numel, 1234 + k, stream));

  void* ws = nullptr;
  float *global = nullptr, *per_tensor = nullptr;
  int64_t *nonfinite = nullptr, *nonfinite_pt = nullptr, *hist_out = nullptr, *hist_pt = nullptr;
  CHECK_CUDA(cudaMalloc(&ws, ws_bytes));
  CHECK_CUDA(cudaMalloc(&global, sizeof(float) * ts::kNumSlots));
  CHECK_CUDA(cudaMalloc(&per_tensor, sizeof(float) * ts::kNumSlots * T));
  CHECK_CUDA(cudaMalloc(&nonfinite, sizeof(int64_t)));
  CHECK_CUDA(cudaMalloc(&nonfinite_pt, sizeof(int64_t) * T));
  CHECK_CUDA(cudaMalloc(&hist_out, sizeof(int64_t) * hist.nbins));
  CHECK_CUDA(cudaMalloc(&hist_pt, sizeof(int64_t) * hist.nbins * T));
  args.global = global;
  args.per_tensor = per_tensor;
  args.nonfinite = nonfinite;
  args.nonfinite_per_tensor = nonfinite_pt;
  args.hist = hist_out;
  args.hist_per_tensor = hist_pt;

  float grad_std = kGradStd;
  for (const FlagSet& fs : kFlagSets) {
    if (fs.grad_std != grad_std) {
      grad_std = fs.grad_std;
      for (size_t k = 0; k < sets.size(); ++k)
        fill(sets[k].g, nullptr, arena_elems(numel), (1234 + k) * 4, grad_std, stream);
    }
    args.flags = fs.flags;
    auto launch = [&](int i) {
      args.tensors = sets[static_cast<size_t>(i) % sets.size()].desc.data();
      CHECK_CUDA(ts::param_stats_launch(args, ws, ws_bytes, stream));
    };
    const Timing t = time_events(launch, o.warmup, o.repeats, stream);
    const int64_t bytes = n * bytes_per_elem(fs.flags, sizeof(float));
    row.entries.push_back({fs.name, fs.flags, bytes, t, static_cast<double>(bytes) / (t.median_ms * 1e-3) / 1e9});

    // Sanity on the last call: every gradient element is finite, so the histogram holds them all.
    int64_t nf = -1;
    CHECK_CUDA(cudaMemcpyAsync(&nf, nonfinite, sizeof nf, cudaMemcpyDeviceToHost, stream));
    std::vector<int64_t> h(static_cast<size_t>(hist.nbins));
    if (fs.flags & ts::kHistogram)
      CHECK_CUDA(cudaMemcpyAsync(h.data(), hist_out, sizeof(int64_t) * h.size(), cudaMemcpyDeviceToHost, stream));
    CHECK_CUDA(cudaStreamSynchronize(stream));
    int64_t hsum = 0;
    for (int64_t c : h) hsum += c;
    if (nf != 0 || ((fs.flags & ts::kHistogram) && hsum != n))
      die("%s, %s: non-finite count %" PRId64 ", histogram total %" PRId64 " of %" PRId64 " elements",
          label.c_str(), fs.name, nf, hsum, n);
  }

  CHECK_CUDA(cudaFree(ws));
  CHECK_CUDA(cudaFree(global));
  CHECK_CUDA(cudaFree(per_tensor));
  CHECK_CUDA(cudaFree(nonfinite));
  CHECK_CUDA(cudaFree(nonfinite_pt));
  CHECK_CUDA(cudaFree(hist_out));
  CHECK_CUDA(cudaFree(hist_pt));
  for (auto& s : sets) free_set(s);
  return row;
}

void print_row(const Row& r, const CopyBandwidth& copy) {
  std::printf("\n%s: GPT d_model=%" PRId64 " n_layer=%" PRId64 " vocab=%" PRId64 " ctx=%" PRId64
              ", %" PRId64 " float32 params in %" PRId64 " tensors",
              r.size.c_str(), r.cfg.d_model, r.cfg.n_layer, r.cfg.vocab, r.cfg.ctx, r.cfg.params, r.tensors);
  if (!r.skipped.empty()) {
    std::printf("\n  skipped: %s\n", r.skipped.c_str());
    return;
  }
  std::printf(", %d input set(s)\n", r.sets);
  std::printf("  %-12s %6s %14s %10s %10s %9s %10s\n", "flags", "B/elem", "bytes moved", "median ms",
              "min ms", "GB/s", "% copy BW");
  for (const auto& e : r.entries) {
    std::printf("  %-12s %6d %14" PRId64 " %10.4f %10.4f %9.1f %9.1f%%\n", e.name,
                static_cast<int>(e.bytes / r.cfg.params), e.bytes, e.t.median_ms, e.t.min_ms, e.gbps,
                100.0 * e.gbps / copy.gbps);
  }
}

// The goal of the fused pass: at 125M parameters and more, every flag subset at >= 85 % of the
// measured copy bandwidth.
constexpr int64_t kGoalMinParams = 120000000;  // "125M" builds GPT-2 small's 124.4M parameters
constexpr double kGoalFractionOfCopy = 0.85;

void print_goals(const std::vector<Row>& rows, const CopyBandwidth& copy) {
  for (const Row& r : rows) {
    if (!r.skipped.empty() || r.cfg.params < kGoalMinParams) continue;
    std::string missed;
    double worst = 1e300;
    for (const auto& e : r.entries) {
      const double f = e.gbps / copy.gbps;
      worst = std::min(worst, f);
      if (f < kGoalFractionOfCopy) missed += std::string(missed.empty() ? "" : ", ") + e.name;
    }
    std::printf("goal at %s: >= %.0f%% of copy BW for every flag subset %s (worst %.1f%%%s%s)\n", r.size.c_str(),
                100.0 * kGoalFractionOfCopy, missed.empty() ? "met" : "NOT met", 100.0 * worst,
                missed.empty() ? "" : "; below: ", missed.c_str());
  }
}

void write_json(const std::string& path, const cudaDeviceProp& prop, int driver, int runtime,
                const Options& o, const CopyBandwidth& copy, const std::vector<Row>& rows,
                const std::string& command) {
  FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) die("cannot write %s: %s", path.c_str(), std::strerror(errno));
  std::string cmd;
  for (char c : command) {
    if (c == '"' || c == '\\') cmd += '\\';
    cmd += c;
  }
  std::fprintf(f, "{\n  \"benchmark\": \"param_stats (launcher)\",\n");
  std::fprintf(f, "  \"command\": \"%s\",\n", cmd.c_str());
  std::fprintf(f, "  \"gpu\": \"%s\",\n  \"compute_capability\": \"%d.%d\",\n", prop.name, prop.major, prop.minor);
  std::fprintf(f, "  \"cuda_driver_api\": %d,\n  \"cuda_runtime\": %d,\n", driver, runtime);
  std::fprintf(f, "  \"repeats\": %d,\n  \"warmup\": %d,\n  \"chunk_elems\": %" PRId64 ",\n", o.repeats,
               o.warmup, o.chunk_elems);
  std::fprintf(f, "  \"copy_bandwidth\": {\"bytes_per_copy\": %zu, \"median_ms\": %.6f, \"GBps\": %.3f},\n",
               copy.bytes_per_copy, copy.median_ms, copy.gbps);
  std::fprintf(f, "  \"results\": [");
  for (size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    std::fprintf(f, "%s\n    {\"size\": \"%s\", \"params\": %" PRId64 ", \"tensors\": %" PRId64
                    ", \"d_model\": %" PRId64 ", \"n_layer\": %" PRId64 ", \"vocab\": %" PRId64
                    ", \"ctx\": %" PRId64,
                 i ? "," : "", r.size.c_str(), r.cfg.params, r.tensors, r.cfg.d_model, r.cfg.n_layer,
                 r.cfg.vocab, r.cfg.ctx);
    if (!r.skipped.empty()) {
      std::fprintf(f, ", \"skipped\": \"%s\"}", r.skipped.c_str());
      continue;
    }
    std::fprintf(f, ", \"input_sets\": %d, \"flag_sets\": [", r.sets);
    for (size_t j = 0; j < r.entries.size(); ++j) {
      const auto& e = r.entries[j];
      std::fprintf(f, "%s\n      {\"name\": \"%s\", \"flags\": %u, \"bytes_moved\": %" PRId64
                      ", \"median_ms\": %.6f, \"min_ms\": %.6f, \"GBps\": %.3f, \"fraction_of_copy\": %.4f}",
                   j ? "," : "", e.name, e.flags, e.bytes, e.t.median_ms, e.t.min_ms, e.gbps, e.gbps / copy.gbps);
    }
    std::fprintf(f, "]}");
  }
  std::fprintf(f, "\n  ]\n}\n");
  if (std::fclose(f) != 0) die("cannot write %s", path.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse_args(argc, argv);
  std::string command;
  for (int i = 0; i < argc; ++i) command += (i ? " " : "") + std::string(argv[i]);

  int count = 0;
  const cudaError_t probe = cudaGetDeviceCount(&count);
  if (probe == cudaErrorNoDevice || probe == cudaErrorInsufficientDriver || (probe == cudaSuccess && count == 0)) {
    std::printf("bench_param_stats: no CUDA device (%s); nothing to measure\n",
                probe == cudaSuccess ? "device count is 0" : cudaGetErrorString(probe));
    return 0;
  }
  CHECK_CUDA(probe);

  int dev = 0, driver = 0, runtime = 0, l2 = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, dev));
  CHECK_CUDA(cudaDriverGetVersion(&driver));
  CHECK_CUDA(cudaRuntimeGetVersion(&runtime));
  CHECK_CUDA(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
  std::printf("%s (sm_%d%d, %d SMs, %.1f GiB, L2 %d MiB), CUDA driver %d, runtime %d\n", prop.name,
              prop.major, prop.minor, prop.multiProcessorCount,
              static_cast<double>(prop.totalGlobalMem) / 1073741824.0, l2 >> 20, driver, runtime);

  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const CopyBandwidth copy = measure_copy(o.warmup + 2, std::max(o.repeats, 20), stream);
  std::printf("device-to-device copy: %.1f GB/s (read + write, %.2f GiB per copy, median %.4f ms)\n",
              copy.gbps, static_cast<double>(copy.bytes_per_copy) / 1073741824.0, copy.median_ms);

  std::vector<Row> rows;
  for (const auto& s : o.sizes) {
    rows.push_back(bench_size(s, o, l2, stream));
    print_row(rows.back(), copy);
    std::fflush(stdout);
  }
  CHECK_CUDA(cudaStreamDestroy(stream));
  if (!o.json.empty()) write_json(o.json, prop, driver, runtime, o, copy, rows, command);
  print_goals(rows, copy);
  return 0;
}
