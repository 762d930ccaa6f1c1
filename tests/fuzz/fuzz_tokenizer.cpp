// tokenizer.json: parsing (checked access to every key), then encoding and decoding a fixed text
// with whatever was parsed.
#include "tests/fuzz/fuzz_target.h"
#include "text/tokenizer/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string dir = attnscope::fuzz::WriteScratch("tokenizer.json", data, size);
  auto tokenizer = attnscope::LoadHfTokenizer(dir + "/tokenizer.json");
  attnscope::fuzz::Record(tokenizer.status());
  if (tokenizer.ok()) {
    const auto ids = (*tokenizer)->Encode("Hello wörld <s>  123 \xF0\x9F\x98\x80\n\ttab", true);
    (*tokenizer)->Decode(ids, false);
    (*tokenizer)->Decode({0, 1, 2, 3, 1 << 20, -1}, true);
  }
  return 0;
}
