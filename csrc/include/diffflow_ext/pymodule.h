// An empty Python extension module, so `import diffflow_ext._C` (setup.py builds) loads the library and
// runs its TORCH_LIBRARY_IMPL registrations. CMake builds (no TORCH_EXTENSION_NAME) produce a plain
// shared library instead, loaded with torch.ops.load_library (see DIFFFLOW_EXT_LIBRARY).
#pragma once

#ifdef TORCH_EXTENSION_NAME
#include <Python.h>

#define DIFFFLOW_STR2(x) #x
#define DIFFFLOW_STR(x) DIFFFLOW_STR2(x)
#define DIFFFLOW_CAT2(a, b) a##b
#define DIFFFLOW_CAT(a, b) DIFFFLOW_CAT2(a, b)

extern "C" PyMODINIT_FUNC DIFFFLOW_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, DIFFFLOW_STR(TORCH_EXTENSION_NAME),
                            "DiffFlow step kernels (registered with torch.library; use diffflow_ext.ops)", -1,
                            nullptr};
  return PyModule_Create(&def);
}
#endif
