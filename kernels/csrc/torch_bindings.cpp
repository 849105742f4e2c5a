// lumina_kernels._C — the native op library.
//
// Native CPU kernels for the lumina custom ops register here (TORCH_LIBRARY_IMPL) as they land.
// The module itself reports the torch version it was compiled against, so that lumina.ops can
// refuse a stale build (an ABI mismatch would otherwise crash at the first call) with one clear
// message and fall back to the reference implementation.
#include <Python.h>

#include <torch/headeronly/version.h>

namespace {

PyObject* compiled_torch_version(PyObject*, PyObject*) { return PyUnicode_FromString(TORCH_VERSION); }

PyMethodDef kMethods[] = {
    {"compiled_torch_version", compiled_torch_version, METH_NOARGS,
     "Version of torch this library was compiled against, e.g. '2.13.0'."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", "lumina native op library", -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
