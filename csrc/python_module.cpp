// Makes the shared library importable as fastattnreg._C. Importing it runs the static
// TORCH_LIBRARY registrations; the ops live in torch.ops. The module itself exposes three probes:
// _kept_scratch_entries(), the number of scratch values the CPU kernels keep between calls
// (kept_cache.h), which a child forked after the parent used the ops starts at 0;
// _bf16_kernels(), the kernels a bf16 call runs now; and _vector_isa(), the at::vec instruction
// set the kernels were compiled for (setup.py), which the trainer records beside ATen's own.
#include <Python.h>

#include "cpu/fork_guard.h"
#include "cpu/simd_level.h"

namespace {

PyObject* kept_scratch_entries(PyObject*, PyObject*) {
  return PyLong_FromLongLong(fastattnreg::cpu::ForkGuard::get().kept_entries());
}

PyObject* bf16_kernels(PyObject*, PyObject*) {
  try {
    using fastattnreg::cpu::Bf16Kernels;
    const Bf16Kernels k = fastattnreg::cpu::bf16_kernels();
    return PyUnicode_FromString(k == Bf16Kernels::Amx          ? "amx"
                                : k == Bf16Kernels::Avx512Bf16 ? "avx512_bf16"
                                                               : "float32");
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  }
}

// "avx512", "avx2" or "default": the CPU_CAPABILITY setup.py compiled the kernels' vector code
// for. Together with ATen's capability and MKL's and oneDNN's instruction sets it decides the
// rounding of every float op, so two machines give bitwise the same numbers only where all agree.
PyObject* vector_isa(PyObject*, PyObject*) {
#if defined(CPU_CAPABILITY_AVX512)
  return PyUnicode_FromString("avx512");
#elif defined(CPU_CAPABILITY_AVX2)
  return PyUnicode_FromString("avx2");
#else
  return PyUnicode_FromString("default");
#endif
}

PyMethodDef methods[] = {
    {"_kept_scratch_entries", kept_scratch_entries, METH_NOARGS,
     "Scratch values the CPU kernels keep between calls, over every cache."},
    {"_bf16_kernels", bf16_kernels, METH_NOARGS,
     "'amx', 'avx512_bf16' or 'float32': the kernels a bf16 attention call runs now."},
    {"_vector_isa", vector_isa, METH_NOARGS,
     "'avx512', 'avx2' or 'default': the instruction set the kernels' vector code targets."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}
