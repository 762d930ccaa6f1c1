// Chat templates (a checkpoint's tokenizer_config.json or chat_template.jinja): parsed, then
// rendered with a conversation; every outcome must be a status, within the step and size limits.
#include "tests/fuzz/fuzz_target.h"
#include "text/jinja/jinja.h"

namespace {

attnscope::jinja::Value Variables() {
  using attnscope::jinja::Value;
  auto messages = Value::List({});
  for (const char* role : {"system", "user", "assistant", "user"}) {
    auto m = Value::MakeDict();
    m.mutable_dict().Set("role", Value::String(role));
    m.mutable_dict().Set("content", Value::String(std::string(" content of ") + role + " \n"));
    messages.mutable_list().push_back(m);
  }
  auto v = Value::MakeDict();
  v.mutable_dict().Set("messages", messages);
  v.mutable_dict().Set("tools", Value::None());
  v.mutable_dict().Set("add_generation_prompt", Value::Bool(true));
  v.mutable_dict().Set("bos_token", Value::String("<s>"));
  v.mutable_dict().Set("eos_token", Value::String("</s>"));
  return v;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const attnscope::jinja::Value kVariables = Variables();
  auto t = attnscope::jinja::Template::Parse(
      absl::string_view(reinterpret_cast<const char*>(data), size));
  if (!t.ok()) {
    attnscope::fuzz::Record(t.status());
    return 0;
  }
  attnscope::fuzz::Record(t->Render(kVariables, size_t{1} << 20).status());
  return 0;
}
