// A checkpoint's tokenizer_config.json as the chat template loader reads it (chat_template as a
// string or named templates, special tokens as strings or AddedToken objects), then a conversation
// rendered with it and with template variables. Every outcome must be a status.
#include "tests/fuzz/fuzz_target.h"
#include "text/chat/chat_template.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string dir = attnscope::fuzz::WriteScratch("tokenizer_config.json", data, size);
  auto loaded = attnscope::ChatTemplate::Load(dir);
  if (!loaded.ok() || !loaded->has_value()) {
    attnscope::fuzz::Record(loaded.status());
    return 0;
  }
  const std::vector<attnscope::ChatMessage> messages = {
      {"system", "Be brief."}, {"user", "Hi"}, {"assistant", "Hello"}, {"user", "Bye"}};
  attnscope::fuzz::Record(
      (*loaded)->Render(messages, "{\"date_string\": \"26 Nov 2026\"}").status());
  return 0;
}
