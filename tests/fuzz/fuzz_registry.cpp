// The model registry (--models): typed lookups with clear errors.
#include <string>

#include "server/registry.h"
#include "tests/fuzz/fuzz_target.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  attnscope::fuzz::Record(attnscope::LookupModel(text, "llama3.1-8b-128k", "fuzz.json").status());
  return 0;
}
