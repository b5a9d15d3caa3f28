// Makes the shared library importable as fastattnreg._C. Importing it runs the static
// TORCH_LIBRARY registrations; the ops live in torch.ops. The module itself exposes one probe for
// the tests: _kept_scratch_entries(), the number of scratch values the CPU kernels keep between
// calls (kept_cache.h), which a child forked after the parent used the ops starts at 0.
#include <Python.h>

#include "cpu/fork_guard.h"

namespace {

PyObject* kept_scratch_entries(PyObject*, PyObject*) {
  return PyLong_FromLongLong(fastattnreg::cpu::ForkGuard::get().kept_entries());
}

PyMethodDef methods[] = {
    {"_kept_scratch_entries", kept_scratch_entries, METH_NOARGS,
     "Scratch values the CPU kernels keep between calls, over every cache."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}
