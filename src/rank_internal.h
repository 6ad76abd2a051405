// Pieces of src/rank.cpp that the tests reach directly: the CPU solves that turn a LAPACK solve
// that did not converge into a mark on its matrix instead of an exception (SPEC.md §5).
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include <ATen/ATen.h>

namespace trainscope {
namespace detail {

// Runs `solve` (a LAPACK-backed ATen call). A solve that did not converge (c10::LinAlgError) gives
// an undefined tensor instead of the exception; every other error propagates.
at::Tensor unless_not_converged(const std::function<at::Tensor()>& solve);

// Eigenvalues [L, K] ascending of a CPU float64 batch of symmetric matrices [L, K, K] (lower
// triangle read) by `eigvalsh` (empty: at::linalg_eigvalsh) in one batched call. When LAPACK
// reports a matrix that did not converge, each matrix is solved alone so that only the ones that
// failed are marked: failed[i] = 1 for those (their row of eigenvalues is 0), else 0.
using BatchEigvalsh = std::function<at::Tensor(const at::Tensor&)>;
at::Tensor eigvalsh_cpu(const at::Tensor& batch, std::vector<uint8_t>* failed, const BatchEigvalsh& eigvalsh = {});

}  // namespace detail
}  // namespace trainscope
