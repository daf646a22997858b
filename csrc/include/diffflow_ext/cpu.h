// Direct C++ entry points of the CPU kernels: diffflow_ext::cpu::<op> for every op of ops.h, with the
// signature given there (the arguments and results of the torch.library schemas in
// diffflow_ext/ops/_library.py; dt, g, ... are (B,) tensors in the accumulation dtype; output_mask: which
// elementwise gradients to write, the others come back as empty (0,) tensors). Python goes through the
// dispatcher (torch.ops.diffflow_ext.*); these are for C++ callers and csrc/tests, and are exported by
// the CPU library (as references to the kernels, generated from the op list).
#pragma once

#include "diffflow_ext/ops.h"

namespace diffflow_ext {
namespace cpu {

#define DIFFFLOW_DECLARE_CPU_OP(NAME, ...) extern sig::NAME& NAME;
DIFFFLOW_OPS(DIFFFLOW_DECLARE_CPU_OP)
#undef DIFFFLOW_DECLARE_CPU_OP

}  // namespace cpu
}  // namespace diffflow_ext
