#include "core/build_info.h"

#include "core/version.h"

namespace alignkit {

BuildInfo build_info() {
  BuildInfo info;
  info.abi = ALIGNKIT_EXT_ABI;
#if defined(__clang__)
  info.compiler = "clang " __clang_version__;
#elif defined(__GNUC__)
  info.compiler = "gcc " __VERSION__;
#else
  info.compiler = "unknown";
#endif
  info.cplusplus = static_cast<long>(__cplusplus);
#ifdef NDEBUG
  info.debug = false;
#else
  info.debug = true;
#endif
  return info;
}

}  // namespace alignkit
