#include <unistd.h>

#include <cstdio>
#include <cstdlib>

#include "tests/fuzz/fuzz_target.h"

namespace attnscope::fuzz {

std::string WriteScratch(const std::string& name, const uint8_t* data, size_t size) {
  static const std::string dir = [] {
    char tmpl[] = "/tmp/attnscope-fuzz-XXXXXX";
    const char* made = mkdtemp(tmpl);
    if (made == nullptr) std::abort();
    return std::string(made);
  }();
  const std::string path = dir + "/" + name;
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) std::abort();
  if (size > 0 && std::fwrite(data, 1, size, f) != size) std::abort();
  std::fclose(f);
  return dir;
}

}  // namespace attnscope::fuzz
