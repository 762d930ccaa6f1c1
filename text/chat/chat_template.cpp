#include "text/chat/chat_template.h"

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "core/files.h"

namespace attnscope {
namespace {

constexpr int64_t kMaxConfigBytes = int64_t{16} << 20;
constexpr size_t kMaxKwargsBytes = size_t{1} << 20;
constexpr int kMaxKwargsDepth = 32;

int Depth(const nlohmann::ordered_json& j, int level) {
  if (level > kMaxKwargsDepth) return level;
  int deepest = level;
  if (j.is_structured()) {
    for (const auto& e : j) deepest = std::max(deepest, Depth(e, level + 1));
  }
  return deepest;
}

}  // namespace

absl::StatusOr<std::optional<ChatTemplate>> ChatTemplate::Load(const std::string& dir) {
  ChatTemplate t;
  std::string text;
  bool found = false;
  nlohmann::ordered_json config;
  const std::string config_path = dir + "/tokenizer_config.json";
  if (auto raw = ReadRegularFile(config_path, kMaxConfigBytes); raw.ok()) {
    config = nlohmann::ordered_json::parse(*raw, nullptr, false);
    if (config.is_discarded() || !config.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(config_path, " is not a JSON object"));
    }
    for (const char* name : {"bos_token", "eos_token", "unk_token", "pad_token", "sep_token",
                             "cls_token", "mask_token"}) {
      auto it = config.find(name);
      if (it == config.end()) continue;
      if (it->is_string()) {
        t.special_tokens_[name] = it->get<std::string>();
      } else if (it->is_object() && it->contains("content") && (*it)["content"].is_string()) {
        t.special_tokens_[name] = (*it)["content"].get<std::string>();
      }
    }
    auto ct = config.find("chat_template");
    if (ct != config.end() && ct->is_string()) {
      text = ct->get<std::string>();
      found = true;
    } else if (ct != config.end() && ct->is_array()) {
      for (const auto& named : *ct) {
        if (named.is_object() && named.contains("name") && named["name"].is_string() &&
            named["name"].get<std::string>() == "default" && named.contains("template") &&
            named["template"].is_string()) {
          text = named["template"].get<std::string>();
          found = true;
        }
      }
      if (!found) {
        return absl::InvalidArgumentError(absl::StrCat(
            config_path, ": chat_template lists named templates but none is 'default'"));
      }
    }
    if (found) t.source_ = config_path;
  } else if (!absl::IsNotFound(raw.status())) {
    return raw.status();
  }
  // transformers prefers chat_template.jinja where both exist.
  const std::string jinja_path = dir + "/chat_template.jinja";
  if (auto raw = ReadRegularFile(jinja_path, kMaxConfigBytes); raw.ok()) {
    text = *raw;
    found = true;
    t.source_ = jinja_path;
  } else if (!absl::IsNotFound(raw.status())) {
    return raw.status();
  }
  if (!found) return std::optional<ChatTemplate>();
  auto parsed = jinja::Template::Parse(text);
  if (parsed.ok()) {
    t.template_ = std::make_shared<const jinja::Template>(*std::move(parsed));
  } else {
    t.parse_status_ = absl::Status(parsed.status().code(),
                                   absl::StrCat(t.source_, ": ", parsed.status().message()));
  }
  return std::optional<ChatTemplate>(std::move(t));
}

absl::StatusOr<std::string> ChatTemplate::Render(const std::vector<ChatMessage>& messages,
                                                 const std::string& kwargs_json,
                                                 size_t max_output) const {
  if (template_ == nullptr) return parse_status_;
  if (messages.empty()) return absl::InvalidArgumentError("the chat has no messages");
  auto vars = std::make_shared<jinja::Dict>();
  jinja::ValueList list;
  for (const ChatMessage& m : messages) {
    auto d = std::make_shared<jinja::Dict>();
    d->Set("role", jinja::Value::String(m.role));
    d->Set("content", jinja::Value::String(m.content));
    list.push_back(jinja::Value::MakeDict(d));
  }
  vars->Set("messages", jinja::Value::List(std::move(list)));
  vars->Set("tools", jinja::Value::None());
  vars->Set("documents", jinja::Value::None());
  vars->Set("add_generation_prompt", jinja::Value::Bool(true));
  for (const auto& [name, token] : special_tokens_) vars->Set(name, jinja::Value::String(token));
  if (!kwargs_json.empty()) {
    if (kwargs_json.size() > kMaxKwargsBytes)
      return absl::InvalidArgumentError("chat_template_kwargs: more than 1 MiB of JSON");
    const auto kwargs = nlohmann::ordered_json::parse(kwargs_json, nullptr, false);
    if (kwargs.is_discarded() || !kwargs.is_object())
      return absl::InvalidArgumentError("chat_template_kwargs must be a JSON object");
    if (Depth(kwargs, 0) > kMaxKwargsDepth)
      return absl::InvalidArgumentError("chat_template_kwargs: nested deeper than 32 levels");
    for (const auto& [key, value] : kwargs.items()) {
      if (key == "messages")
        return absl::InvalidArgumentError("chat_template_kwargs may not set 'messages'");
      vars->Set(key, jinja::Value::FromJson(value));
    }
  }
  auto text = template_->Render(jinja::Value::MakeDict(vars), max_output);
  if (text.ok()) return text;
  const absl::Status& s = text.status();
  if (absl::IsFailedPrecondition(s)) {  // raise_exception()
    return absl::InvalidArgumentError(
        absl::StrCat("the model's chat template refused the conversation: ", s.message()));
  }
  if (absl::IsInvalidArgument(s))
    return absl::InvalidArgumentError(
        absl::StrCat("rendering the chat template failed: ", s.message()));
  return s;
}

}  // namespace attnscope
