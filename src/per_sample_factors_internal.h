// Shared between src/per_sample_factors.cpp and its tests: the tile budget, small in tests so
// that modest problems take every tiling path (tiles of samples, blocks of rows).
#pragma once

#include <cstdint>

namespace trainscope {

// Elements of the largest temporary one tile may create; default 2^26 (256 MB in float32).
int64_t factor_tile_elems();
// Sets it (values < 1 restore the default); returns the previous value. Not for concurrent use.
int64_t set_factor_tile_elems(int64_t elems);

}  // namespace trainscope
