// The safetensors reader on arbitrary files: header length, JSON, dtypes, shapes, offsets.
#include "core/safetensors.h"
#include "tests/fuzz/fuzz_target.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string dir = attnscope::fuzz::WriteScratch("model.safetensors", data, size);
  auto file = attnscope::SafetensorsFile::Open(dir + "/model.safetensors");
  attnscope::fuzz::Record(file.status());
  if (file.ok()) {
    // Touch every byte each view claims: a view past the mapping would fault here.
    for (const auto& [name, view] : (*file)->tensors()) {
      volatile unsigned char sum = 0;
      const auto* bytes = static_cast<const unsigned char*>(view.data);
      for (int64_t i = 0; i < view.nbytes; ++i) sum ^= bytes[i];
    }
  }
  return 0;
}
