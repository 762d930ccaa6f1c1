// Chat formats of the model families the prototype served, rendered to text that the model's
// tokenizer encodes (special tokens written in the text become their ids).
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace attnscope {

class Tokenizer;

// The built-in chat formats, for checkpoints without a chat template of their own.
enum class ChatFormat { kNone, kLlama2, kLlama3, kMistral, kChatML };

struct ChatMessage {
  std::string role;  // "system", "user", "assistant"
  std::string content;
};

// From the tokenizer's special tokens (Llama 3's header tokens, ChatML's <|im_start|>), else the
// architecture's own format (engine/checkpoint/arch.h ArchTraits::chat_format: Mistral's, or Llama
// 2's where the tokenizer has <s>); kNone when nothing fits.
ChatFormat DetectChatFormat(ChatFormat architecture, const Tokenizer* tokenizer);
const char* ChatFormatName(ChatFormat format);

// The prompt text for `messages`, ending where the assistant's reply begins.
// INVALID_ARGUMENT for unknown roles or an empty list; FAILED_PRECONDITION for kNone.
absl::StatusOr<std::string> RenderChat(ChatFormat format, const std::vector<ChatMessage>& messages);

}  // namespace attnscope
