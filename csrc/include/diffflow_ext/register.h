// Registration of the kernels with the dispatcher, and the Python module of setup.py builds.
//
// DIFFFLOW_REGISTER(Launcher, DispatchKey, AutogradKey) registers every op's impl for one dispatch key,
// and the C++ autograd of the forward ops (autograd.h) for the matching autograd key, when the library
// is loaded (like TORCH_LIBRARY_IMPL), but catches failures -- e.g. a stale build whose C++
// signatures no longer match the schemas declared in diffflow_ext/ops/_library.py -- instead of
// aborting the process: the registrations are rolled back and the error is kept. In setup.py builds
// (TORCH_EXTENSION_NAME defined) `import diffflow_ext._C` then raises ImportError with that error,
// which diffflow_ext reports as the backend's unavailability reason. CMake builds produce a plain
// shared library for torch.ops.load_library (no Python needed).
#pragma once

#include <memory>
#include <string>

#include <c10/util/Exception.h>
#include <torch/library.h>

#include "diffflow_ext/autograd.h"
#include "diffflow_ext/host.h"

namespace diffflow_ext {

struct Registrar {
  std::unique_ptr<torch::Library> lib, autograd_lib;
  std::string error;

  template <typename L>
  static Registrar make(c10::DispatchKey key, c10::DispatchKey autograd_key, const char* file, uint32_t line) {
    Registrar r;
    try {
      r.lib = std::make_unique<torch::Library>(torch::Library::IMPL, "diffflow_ext", key, file, line);
      register_impls<L>(*r.lib);
      r.autograd_lib =
          std::make_unique<torch::Library>(torch::Library::IMPL, "diffflow_ext", autograd_key, file, line);
      autograd::register_autograd(*r.autograd_lib);
    } catch (const c10::Error& e) {
      r.error = e.what_without_backtrace();
      r.autograd_lib.reset();  // unregisters whatever was registered
      r.lib.reset();
    } catch (const std::exception& e) {
      r.error = e.what();
      r.autograd_lib.reset();
      r.lib.reset();
    }
    return r;
  }
};

}  // namespace diffflow_ext

#ifdef TORCH_EXTENSION_NAME
#include <Python.h>

#define DIFFFLOW_STR2(x) #x
#define DIFFFLOW_STR(x) DIFFFLOW_STR2(x)
#define DIFFFLOW_CAT2(a, b) a##b
#define DIFFFLOW_CAT(a, b) DIFFFLOW_CAT2(a, b)

#define DIFFFLOW_REGISTER(LAUNCHER, KEY, AUTOGRAD_KEY)                                                         \
  static ::diffflow_ext::Registrar diffflow_registrar =                                                        \
      ::diffflow_ext::Registrar::make<LAUNCHER>(KEY, AUTOGRAD_KEY, __FILE__, __LINE__);                       \
  extern "C" PyMODINIT_FUNC DIFFFLOW_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {                               \
    if (!diffflow_registrar.error.empty()) {                                                                   \
      const std::string msg = "kernel registration failed (a stale build? rebuild: pip install "              \
                              "--no-build-isolation .): " +                                                    \
                              diffflow_registrar.error;                                                        \
      PyErr_SetString(PyExc_ImportError, msg.c_str());                                                         \
      return nullptr;                                                                                          \
    }                                                                                                          \
    static PyModuleDef def = {PyModuleDef_HEAD_INIT, DIFFFLOW_STR(TORCH_EXTENSION_NAME),                       \
                              "DiffFlow step kernels (registered with torch.library; use diffflow_ext.ops)", -1, \
                              nullptr};                                                                        \
    return PyModule_Create(&def);                                                                              \
  }
#else
#define DIFFFLOW_REGISTER(LAUNCHER, KEY, AUTOGRAD_KEY)  \
  static ::diffflow_ext::Registrar diffflow_registrar = \
      ::diffflow_ext::Registrar::make<LAUNCHER>(KEY, AUTOGRAD_KEY, __FILE__, __LINE__);
#endif
