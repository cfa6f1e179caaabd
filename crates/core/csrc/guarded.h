// Shared by the shim's C++ files: a C++ exception never crosses the C boundary; it becomes the
// error string Rust reads (shim.cpp's temper_set_error) and the return code -1.
#pragma once
#include <exception>

extern "C" void temper_set_error(const char *message);

namespace temper {
template <typename F> int guarded(F f) {
  try {
    f();
    return 0;
  } catch (const std::exception &e) {
    temper_set_error(e.what());
    return -1;
  }
}
} // namespace temper
