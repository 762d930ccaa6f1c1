// The capture client's check of an existing sample before a rerun skips it (CheckStoredSample):
// arbitrary files as safetensors samples and as prototype pickles (header length, JSON, offsets).
#include "samples/sample_writer.h"
#include "tests/fuzz/fuzz_target.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string dir = attnscope::fuzz::WriteScratch("attention_sample_0", data, size);
  for (auto format : {attnscope::SampleFormat::kSafetensors, attnscope::SampleFormat::kPickle})
    attnscope::fuzz::Record(attnscope::CheckStoredSample(dir + "/attention_sample_0", format));
  return 0;
}
