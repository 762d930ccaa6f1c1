// config.json: every field read with its type and range checked.
#include "engine/checkpoint/config.h"
#include "tests/fuzz/fuzz_target.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string dir = attnscope::fuzz::WriteScratch("config.json", data, size);
  attnscope::fuzz::Record(attnscope::LoadModelConfig(dir).status());
  return 0;
}
