// Facts about how the native core was compiled (reported by `alignkit info`).
#pragma once

#include <string>

namespace alignkit {

struct BuildInfo {
  int abi = 0;           // ALIGNKIT_EXT_ABI this binary was built with
  std::string compiler;  // compiler name and version
  long cplusplus = 0;    // value of __cplusplus
  bool debug = false;    // built without NDEBUG
};

BuildInfo build_info();

}  // namespace alignkit
