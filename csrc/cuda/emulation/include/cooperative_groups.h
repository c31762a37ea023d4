// cooperative_groups.h of the CUDA emulation: the grid group of a cooperative launch.
#pragma once

#include <cuda_runtime.h>

namespace cooperative_groups {

class grid_group {
 public:
  // All threads of all CTAs of the launch meet here; the emulator checks that every one does.
  void sync(const char* function = __builtin_FUNCTION(), const char* file = __builtin_FILE(),
            int line = __builtin_LINE()) const {
    ::cuda_emulation::sync_grid({"grid.sync", function, file, line});
  }
};

inline grid_group this_grid() { return grid_group(); }

}  // namespace cooperative_groups
