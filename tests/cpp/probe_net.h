// A fixed two-layer ReLU/tanh network as a probe forward for the representation tests: x [n, 10]
// → ReLU [n, 16] (its first three units dead: zero weights, bias −1) → tanh [n, 12].
//
// Not a test executable (tests/CMakeLists.txt globs test_*).
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/ATen.h>

namespace trainscope_test {

struct TinyNet {
  at::Tensor w1, b1, w2, b2;
  explicit TinyNet(const at::TensorOptions& o, uint64_t seed = 7) {
    at::manual_seed(seed);
    w1 = at::randn({10, 16}, o);
    b1 = at::randn({16}, o);
    w1.narrow(1, 0, 3).zero_();
    b1.narrow(0, 0, 3).fill_(-1.0);
    w2 = at::randn({16, 12}, o) * 0.3;
    b2 = at::randn({12}, o);
  }
  std::vector<at::Tensor> operator()(const at::Tensor& x) const {
    at::Tensor h1 = at::relu(at::addmm(b1, x, w1));
    at::Tensor h2 = at::tanh(at::addmm(b2, h1, w2));
    return {h1, h2};
  }
};

}  // namespace trainscope_test
