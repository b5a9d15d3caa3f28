// Makes the shared library importable as fastattnreg._C. Importing it runs the static
// TORCH_LIBRARY registrations; the ops live in torch.ops. The module itself exposes one probe for
// the tests: _kept_scratch_entries(), the number of scratch values the CPU kernels keep between
// calls (kept_cache.h), which a child forked after the parent used the ops starts at 0.
#include <Python.h>

#include "cpu/fork_guard.h"
#include "cpu/simd_level.h"

namespace {

PyObject* kept_scratch_entries(PyObject*, PyObject*) {
  return PyLong_FromLongLong(fastattnreg::cpu::ForkGuard::get().kept_entries());
}

PyObject* bf16_kernels(PyObject*, PyObject*) {
  try {
    const auto k = fastattnreg::cpu::bf16_kernels();
    return PyUnicode_FromString(k == fastattnreg::cpu::Bf16Kernels::Avx512Bf16 ? "avx512_bf16"
                                                                              : "float32");
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"_kept_scratch_entries", kept_scratch_entries, METH_NOARGS,
     "Scratch values the CPU kernels keep between calls, over every cache."},
    {"_bf16_kernels", bf16_kernels, METH_NOARGS,
     "'avx512_bf16' or 'float32': the kernels a bf16 attention call runs now."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}
