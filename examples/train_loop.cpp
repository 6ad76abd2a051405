// A small training loop monitored on every step: an MLP fitting synthetic regression data with
// SGD, every parameter metric written to a JSONL file by trainscope::Monitor.
//
//   example_train_loop OUT.jsonl [STEPS=100]
//
// Runs on the GPU when there is one, else on the CPU. OUT.jsonl gets one line per step (the
// JsonlSink appends, so remove an old file first).
#include <cstdint>
#include <iostream>
#include <string>

#include <torch/torch.h>
#include <trainscope/monitor.h>

int main(int argc, char** argv) {
  if (argc < 2 || argc > 3) {
    std::cerr << "usage: " << argv[0] << " OUT.jsonl [STEPS]\n";
    return 2;
  }
  const std::string out_path = argv[1];
  const int64_t steps = argc == 3 ? std::stoll(argv[2]) : 100;
  // A GPU when there is one and trainscope has its CUDA kernels (a CPU-only build refuses CUDA tensors).
  const torch::Device device =
      trainscope::built_with_cuda() && torch::cuda::is_available() ? torch::kCUDA : torch::kCPU;
  torch::manual_seed(0);

  // Synthetic data: y = x·w + noise, 4,096 examples of 16 features.
  const int64_t n = 4096, features = 16, batch = 64;
  const auto opts = torch::TensorOptions().device(device);
  torch::Tensor x = torch::randn({n, features}, opts);
  torch::Tensor y = x.matmul(torch::randn({features, 1}, opts)) + 0.1 * torch::randn({n, 1}, opts);

  torch::nn::Sequential model(torch::nn::Linear(features, 64), torch::nn::ReLU(),
                              torch::nn::Linear(64, 64), torch::nn::ReLU(), torch::nn::Linear(64, 1));
  model->to(device);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9));

  // Parameter metrics (global and per tensor) every step, the gradient histogram every 10 steps.
  // θ₀ (for distance) and θ_prev (for update_size) are copied here.
  trainscope::MonitorConfig config;
  config.grad_hist.schedule = trainscope::Schedule::every(10);
  trainscope::Monitor monitor(model->named_parameters().pairs(), config);
  monitor.add_sink(trainscope::JsonlSink(out_path));

  for (int64_t step = 0; step < steps; ++step) {
    torch::Tensor idx = torch::randint(n, {batch}, opts.dtype(torch::kLong));
    torch::Tensor per_sample = (model->forward(x.index_select(0, idx)) - y.index_select(0, idx)).pow(2).mean(1);
    optimizer.zero_grad();
    per_sample.mean().backward();
    optimizer.step();
    monitor.step(step, per_sample.detach());  // queues the kernels; never waits for the GPU
  }
  monitor.flush();  // waits for the last steps and writes them
  std::cout << "wrote " << steps << " steps to " << out_path << " (" << device << ")\n";
  return 0;
}
