// Makes the shared library importable as fastattnreg._C. Importing it runs the static
// TORCH_LIBRARY registrations; the module itself exposes nothing (ops live in torch.ops).
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
