// NVTX ranges: every public entry point opens one named after it ("trainscope::<name>"), so that
// its work shows on an Nsight Systems timeline. NVTX comes with the CUDA Toolkit; a CPU-only
// build has neither, and its ranges compile to nothing.
#pragma once

#if defined(TRAINSCOPE_WITH_CUDA)
#include <nvtx3/nvtx3.hpp>

namespace trainscope {
using NvtxRange = nvtx3::scoped_range;
}  // namespace trainscope
#else
namespace trainscope {
struct NvtxRange {
  explicit NvtxRange(const char*) noexcept {}
};
}  // namespace trainscope
#endif
