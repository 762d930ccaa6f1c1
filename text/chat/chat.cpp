#include "text/chat/chat.h"

#include "absl/strings/str_cat.h"
#include "text/tokenizer/tokenizer.h"

namespace attnscope {
namespace {

absl::Status CheckRoles(const std::vector<ChatMessage>& messages) {
  if (messages.empty()) return absl::InvalidArgumentError("the chat has no messages");
  for (size_t i = 0; i < messages.size(); ++i) {
    const auto& r = messages[i].role;
    if (r != "system" && r != "user" && r != "assistant") {
      return absl::InvalidArgumentError(
          absl::StrCat("message ", i, " has role '", r, "'; roles are system, user and assistant"));
    }
    if (r == "system" && i != 0)
      return absl::InvalidArgumentError("only the first message may be a system message");
  }
  return absl::OkStatus();
}

// Llama 2 and Mistral: [INST] blocks; the system prompt goes into the first user turn.
std::string RenderInst(const std::vector<ChatMessage>& messages, bool llama2) {
  std::string system, out;
  size_t i = 0;
  if (messages[0].role == "system") system = messages[i++].content;
  bool first_user = true;
  for (; i < messages.size(); ++i) {
    const auto& m = messages[i];
    if (m.role == "user") {
      std::string content = m.content;
      if (first_user && !system.empty()) {
        content = llama2 ? absl::StrCat("<<SYS>>\n", system, "\n<</SYS>>\n\n", content)
                         : absl::StrCat(system, "\n\n", content);
      }
      if (llama2 || first_user) out += "<s>";
      absl::StrAppend(&out, "[INST] ", content, " [/INST]");
      first_user = false;
    } else {
      absl::StrAppend(&out, llama2 ? " " : "", m.content, llama2 ? " </s>" : "</s>");
    }
  }
  return out;
}

}  // namespace

ChatFormat DetectChatFormat(ChatFormat architecture, const Tokenizer* tokenizer) {
  if (tokenizer == nullptr) return ChatFormat::kNone;
  if (tokenizer->TokenId("<|start_header_id|>")) return ChatFormat::kLlama3;
  if (tokenizer->TokenId("<|im_start|>")) return ChatFormat::kChatML;
  if (architecture == ChatFormat::kMistral) return ChatFormat::kMistral;
  if (architecture == ChatFormat::kLlama2 && tokenizer->TokenId("<s>")) return ChatFormat::kLlama2;
  return ChatFormat::kNone;
}

const char* ChatFormatName(ChatFormat format) {
  switch (format) {
    case ChatFormat::kNone:
      return "";
    case ChatFormat::kLlama2:
      return "llama2";
    case ChatFormat::kLlama3:
      return "llama3";
    case ChatFormat::kMistral:
      return "mistral";
    case ChatFormat::kChatML:
      return "chatml";
  }
  return "";
}

absl::StatusOr<std::string> RenderChat(ChatFormat format,
                                       const std::vector<ChatMessage>& messages) {
  if (format == ChatFormat::kNone) {
    return absl::FailedPreconditionError("this model has no chat format; send text or token ids");
  }
  if (absl::Status s = CheckRoles(messages); !s.ok()) return s;
  std::string out;
  switch (format) {
    case ChatFormat::kLlama2:
      return RenderInst(messages, /*llama2=*/true);
    case ChatFormat::kMistral:
      return RenderInst(messages, /*llama2=*/false);
    case ChatFormat::kLlama3:
      out = "<|begin_of_text|>";
      for (const auto& m : messages) {
        absl::StrAppend(&out, "<|start_header_id|>", m.role, "<|end_header_id|>\n\n", m.content,
                        "<|eot_id|>");
      }
      return absl::StrCat(out, "<|start_header_id|>assistant<|end_header_id|>\n\n");
    case ChatFormat::kChatML:
      if (messages[0].role != "system") {
        out =
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
            "assistant.<|im_end|>\n";
      }
      for (const auto& m : messages)
        absl::StrAppend(&out, "<|im_start|>", m.role, "\n", m.content, "<|im_end|>\n");
      return absl::StrCat(out, "<|im_start|>assistant\n");
    case ChatFormat::kNone:
      break;
  }
  return out;
}

}  // namespace attnscope
