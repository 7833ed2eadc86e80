// pybind11 bindings: translation only, no logic. The core lives in csrc/core/.
#include <pybind11/pybind11.h>

#include "core/build_info.h"
#include "core/version.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "alignkit native core (private; use the alignkit package)";
  m.attr("ABI_VERSION") = ALIGNKIT_EXT_ABI;
  m.attr("__version__") = ALIGNKIT_VERSION;

  m.def(
      "build_info",
      []() {
        const alignkit::BuildInfo info = alignkit::build_info();
        py::dict out;
        out["abi"] = info.abi;
        out["compiler"] = info.compiler;
        out["cplusplus"] = info.cplusplus;
        out["debug"] = info.debug;
        return out;
      },
      "How the native core was compiled: abi, compiler, cplusplus, debug.");
}
