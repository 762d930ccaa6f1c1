// The checkpoint's own chat template: `chat_template.jinja`, else tokenizer_config.json's
// `chat_template` (a string, or named templates of which "default" is used), rendered as
// transformers' apply_chat_template(add_generation_prompt=True) renders it
// (text/jinja/jinja.h): messages, tools and documents (None unless the caller gives them), the
// tokenizer config's special tokens (bos_token, eos_token, ...) and the caller's template
// variables.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "text/chat/chat.h"
#include "text/jinja/jinja.h"

namespace attnscope {

class ChatTemplate {
 public:
  // nullopt when the folder has no template. A template that does not parse still loads: its
  // error is what rendering returns (chat requests fail, text and token requests work).
  static absl::StatusOr<std::optional<ChatTemplate>> Load(const std::string& dir);

  // The prompt text. `kwargs_json`: a JSON object of template variables (may be empty).
  // INVALID_ARGUMENT for a conversation the template refuses (raise_exception, with its message)
  // or that fails in it, or for malformed kwargs; the parse error for a template that did not
  // parse (UNIMPLEMENTED naming the construct, or INVALID_ARGUMENT).
  // Rendering stops past `max_output` bytes (RESOURCE_EXHAUSTED).
  absl::StatusOr<std::string> Render(const std::vector<ChatMessage>& messages,
                                     const std::string& kwargs_json,
                                     size_t max_output = kMaxRenderedBytes) const;
  static constexpr size_t kMaxRenderedBytes = size_t{16} << 20;

  const std::string& source() const { return source_; }  // file it came from
  const absl::Status& parse_status() const { return parse_status_; }

 private:
  std::string source_;
  std::shared_ptr<const jinja::Template> template_;
  absl::Status parse_status_;
  std::map<std::string, std::string> special_tokens_;
};

}  // namespace attnscope
