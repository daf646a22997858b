// Direct C++ entry points of the CPU kernels: diffflow_ext::CpuOps::em_step(...), etc. (same
// arguments as the torch.library schemas in diffflow_ext/ops/_library.py). Python goes through
// the dispatcher (torch.ops.diffflow_ext.*); this is for C++ callers and csrc/tests.
#pragma once

#include "diffflow_ext/host.h"

namespace diffflow_ext {
namespace cpu {
struct CpuLauncher;
}  // namespace cpu
extern template struct Ops<cpu::CpuLauncher>;
using CpuOps = Ops<cpu::CpuLauncher>;
}  // namespace diffflow_ext
