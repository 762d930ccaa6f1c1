// The capture client's check of an existing sample before a rerun skips it (CheckStoredSample):
// arbitrary files as safetensors samples and as prototype pickles (header length, JSON, offsets),
// and, for a file that passes, the comparison of its stored settings (StoredSampleDifferences).
#include "samples/sample_writer.h"
#include "tests/fuzz/fuzz_target.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string dir = attnscope::fuzz::WriteScratch("attention_sample_0", data, size);
  const std::string path = dir + "/attention_sample_0";
  for (auto format : {attnscope::SampleFormat::kSafetensors, attnscope::SampleFormat::kPickle})
    attnscope::fuzz::Record(attnscope::CheckStoredSample(path, format));
  // What a rerun does with a whole file: its stored settings compared with what is asked.
  if (attnscope::CheckStoredSample(path, attnscope::SampleFormat::kSafetensors).ok()) {
    attnscope::SampleSettings asked;
    asked.prompt_text = "The capital of France is";
    asked.max_new_tokens = 8;
    asked.capture.add_layers(0);
    auto differences =
        attnscope::StoredSampleDifferences(path, attnscope::SampleFormat::kSafetensors, asked);
    attnscope::fuzz::Record(differences.status());
  }
  return 0;
}
