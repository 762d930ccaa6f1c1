// tokenizer.json -> HfTokenizer: every section read with checked access, ids bounded.
#include <stdexcept>

#include "core/files.h"
#include "core/status_macros.h"
#include "text/tokenizer/hf_tokenizer.h"

namespace attnscope {
namespace hf {
namespace {

// Real tokenizer.json files are under 20 MB.
constexpr int64_t kMaxTokenizerJsonBytes = int64_t{256} << 20;
// Ids past the number of entries that a tokenizer may use (holes in the id space).
constexpr int64_t kIdSlack = 4096;

// An integer field: a float there (1e106) would be converted with undefined behaviour, so it is
// refused like any other wrong type (json::exception is caught where the file is parsed).
int64_t JsonInt(const nlohmann::json& v) {
  if (!v.is_number_integer())
    throw std::invalid_argument("an integer was expected, found " + v.dump().substr(0, 40));
  return v.get<int64_t>();
}

int64_t JsonIntOr(const nlohmann::json& object, const char* key, int64_t fallback) {
  auto it = object.find(key);
  return it == object.end() ? fallback : JsonInt(*it);
}

// GPT-2's pre-tokenization regex (ByteLevel with use_regex).
constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

absl::StatusOr<std::string> PatternString(const json& pattern, const std::string& where) {
  if (pattern.contains("String")) return pattern.at("String").get<std::string>();
  if (pattern.contains("Regex")) return pattern.at("Regex").get<std::string>();
  return absl::InvalidArgumentError(absl::StrCat(where, ": pattern is neither String nor Regex"));
}

std::string RegexQuote(const std::string& s) { return absl::StrCat("\\Q", s, "\\E"); }

}  // namespace

absl::Status HfTokenizer::ParseModel(const json& m, int64_t max_id_limit, const std::string& path) {
  if (!m.is_object() || m.value("type", "BPE") != "BPE") {
    return absl::UnimplementedError(absl::StrCat(path,
                                                 ": only BPE tokenizer models are supported, not '",
                                                 m.is_object() ? m.value("type", "?") : "?", "'"));
  }
  if (!m.contains("vocab") || !m.at("vocab").is_object())
    return absl::InvalidArgumentError(absl::StrCat(path, ": model.vocab missing"));
  // Ids are dense in real tokenizers: one past the largest is bounded by the entries (plus slack
  // for holes), so a crafted id cannot make the id table huge.
  const json& vocab = m.at("vocab");
  int64_t max_id = -1;
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    const int64_t id = JsonInt(it.value());
    if (id < 0 || id >= max_id_limit) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": vocabulary id ", id,
                                                     " is outside [0, ", max_id_limit, ") for ",
                                                     vocab.size(), " entries"));
    }
    vocab_[it.key()] = id;
    max_id = std::max(max_id, id);
  }
  id_to_token_.resize(max_id + 1);
  for (const auto& [token, id] : vocab_) id_to_token_[id] = token;
  byte_fallback_ = m.value("byte_fallback", false) == true;
  fuse_unk_ = m.value("fuse_unk", false) == true;
  ignore_merges_ = m.value("ignore_merges", false) == true;
  if (m.contains("unk_token") && m.at("unk_token").is_string()) {
    auto it = vocab_.find(m.at("unk_token").get<std::string>());
    if (it != vocab_.end()) unk_id_ = it->second;
  }
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    auto it = vocab_.find(name);
    byte_ids_[b] = it == vocab_.end() ? -1 : it->second;
  }
  int32_t rank = 0;
  for (const json& merge : m.value("merges", json::array())) {
    std::string a, b;
    if (merge.is_string()) {
      const std::string s = merge.get<std::string>();
      const auto space = s.find(' ', 1);
      if (space == std::string::npos)
        return absl::InvalidArgumentError(absl::StrCat(path, ": merge '", s, "' has no space"));
      a = s.substr(0, space);
      b = s.substr(space + 1);
    } else if (merge.is_array() && merge.size() == 2) {
      a = merge.at(0).get<std::string>();
      b = merge.at(1).get<std::string>();
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": merge ", rank, " is neither \"a b\" nor [a, b]"));
    }
    auto ia = vocab_.find(a), ib = vocab_.find(b), im = vocab_.find(a + b);
    if (ia == vocab_.end() || ib == vocab_.end() || im == vocab_.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": merge '", a, " ", b, "' uses tokens not in the vocabulary"));
    }
    const uint64_t key =
        (static_cast<uint64_t>(ia->second) << 32) | static_cast<uint64_t>(ib->second);
    merges_.emplace(key, std::make_pair(rank, static_cast<int32_t>(im->second)));
    ++rank;
  }
  return absl::OkStatus();
}

absl::Status HfTokenizer::ParseNormalizer(const json& n, const std::string& path) {
  if (n.is_null()) return absl::OkStatus();
  const std::string type = n.value("type", "");
  if (type == "Sequence") {
    for (const json& s : n.at("normalizers")) RETURN_IF_ERROR(ParseNormalizer(s, path));
  } else if (type == "NFC") {
    normalizers_.push_back({Normalizer::kNfc, "", ""});
  } else if (type == "NFKC") {
    normalizers_.push_back({Normalizer::kNfkc, "", ""});
  } else if (type == "NFD") {
    normalizers_.push_back({Normalizer::kNfd, "", ""});
  } else if (type == "NFKD") {
    normalizers_.push_back({Normalizer::kNfkd, "", ""});
  } else if (type == "Lowercase") {
    normalizers_.push_back({Normalizer::kLowercase, "", ""});
  } else if (type == "Prepend") {
    normalizers_.push_back({Normalizer::kPrepend, n.at("prepend").get<std::string>(), ""});
  } else if (type == "Replace") {
    if (!n.at("pattern").contains("String")) {
      return absl::UnimplementedError(
          absl::StrCat(path, ": Replace normalizer with a regex pattern is not supported"));
    }
    normalizers_.push_back({Normalizer::kReplace, n.at("pattern").at("String").get<std::string>(),
                            n.at("content").get<std::string>()});
  } else {
    return absl::UnimplementedError(
        absl::StrCat(path, ": normalizer '", type, "' is not supported"));
  }
  return absl::OkStatus();
}

absl::Status HfTokenizer::ParsePreTokenizer(const json& p, const std::string& path) {
  if (p.is_null()) return absl::OkStatus();
  const std::string type = p.value("type", "");
  PreTokenizer t{};
  if (type == "Sequence") {
    for (const json& s : p.at("pretokenizers")) RETURN_IF_ERROR(ParsePreTokenizer(s, path));
    return absl::OkStatus();
  } else if (type == "Split") {
    if (p.value("behavior", "") != "Isolated" || p.value("invert", false)) {
      return absl::UnimplementedError(
          absl::StrCat(path, ": Split pre-tokenizer supports behavior Isolated only"));
    }
    ASSIGN_OR_RETURN(std::string pattern, PatternString(p.at("pattern"), path));
    if (p.at("pattern").contains("String")) pattern = RegexQuote(pattern);
    t.kind = PreTokenizer::kSplit;
    ASSIGN_OR_RETURN(t.regex, Regex::Compile(pattern));
  } else if (type == "ByteLevel") {
    t.kind = PreTokenizer::kByteLevel;
    t.add_prefix_space = p.value("add_prefix_space", false);
    if (p.value("use_regex", true)) {
      ASSIGN_OR_RETURN(t.regex, Regex::Compile(kGpt2Pattern));
    }
  } else if (type == "Metaspace") {
    t.kind = PreTokenizer::kMetaspace;
    t.replacement = p.value("replacement", "\u2581");
    t.prepend_scheme =
        p.value("prepend_scheme", p.value("add_prefix_space", true) ? "always" : "never");
    t.split = p.value("split", true);
  } else if (type == "Digits") {
    t.kind = PreTokenizer::kDigits;
    t.individual_digits = p.value("individual_digits", false);
    ASSIGN_OR_RETURN(t.regex, Regex::Compile(t.individual_digits ? R"(\p{N})" : R"(\p{N}+)"));
  } else {
    return absl::UnimplementedError(
        absl::StrCat(path, ": pre-tokenizer '", type, "' is not supported"));
  }
  pre_tokenizers_.push_back(std::move(t));
  return absl::OkStatus();
}

absl::Status HfTokenizer::ParseDecoder(const json& d, const std::string& path) {
  if (d.is_null()) return absl::OkStatus();
  const std::string type = d.value("type", "");
  Decoder t{};
  if (type == "Sequence") {
    for (const json& s : d.at("decoders")) RETURN_IF_ERROR(ParseDecoder(s, path));
    return absl::OkStatus();
  } else if (type == "ByteLevel") {
    t.kind = Decoder::kByteLevel;
  } else if (type == "Replace") {
    t.kind = Decoder::kReplace;
    ASSIGN_OR_RETURN(t.a, PatternString(d.at("pattern"), path));
    t.b = d.at("content").get<std::string>();
  } else if (type == "ByteFallback") {
    t.kind = Decoder::kByteFallback;
  } else if (type == "Fuse") {
    t.kind = Decoder::kFuse;
  } else if (type == "Strip") {
    t.kind = Decoder::kStrip;
    t.a = d.at("content").get<std::string>();
    const int64_t start = JsonIntOr(d, "start", 0), stop = JsonIntOr(d, "stop", 0);
    if (t.a.empty() || start < 0 || stop < 0 || start > 1024 || stop > 1024) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": Strip decoder needs a content and start/stop in [0, 1024]"));
    }
    t.start = static_cast<int>(start);
    t.stop = static_cast<int>(stop);
  } else if (type == "Metaspace") {
    t.kind = Decoder::kMetaspace;
    t.a = d.value("replacement", "\u2581");
    t.prepend = d.value("prepend_scheme", d.value("add_prefix_space", true) ? "always" : "never") !=
                "never";
  } else {
    return absl::UnimplementedError(absl::StrCat(path, ": decoder '", type, "' is not supported"));
  }
  decoders_.push_back(std::move(t));
  return absl::OkStatus();
}

absl::Status HfTokenizer::ParsePostProcessor(const json& p, const std::string& path) {
  if (p.is_null()) return absl::OkStatus();
  const std::string type = p.value("type", "");
  if (type == "Sequence") {
    for (const json& s : p.at("processors")) RETURN_IF_ERROR(ParsePostProcessor(s, path));
  } else if (type == "TemplateProcessing") {
    bool seen_sequence = false;
    for (const json& piece : p.at("single")) {
      if (piece.contains("Sequence")) {
        seen_sequence = true;
        continue;
      }
      const std::string name = piece.at("SpecialToken").at("id").get<std::string>();
      const json& special = p.at("special_tokens").at(name);
      for (const json& id : special.at("ids"))
        (seen_sequence ? suffix_ids_ : prefix_ids_).push_back(JsonInt(id));
    }
  } else if (type == "ByteLevel") {
    // Offsets only; ids are unchanged.
  } else if (type == "BertProcessing" || type == "RobertaProcessing") {
    return absl::UnimplementedError(
        absl::StrCat(path, ": post-processor '", type, "' is not supported"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<HfTokenizer>> HfTokenizer::Parse(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadRegularFile(path, kMaxTokenizerJsonBytes));
  const json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object())
    return absl::InvalidArgumentError(absl::StrCat(path, " is not valid JSON"));
  auto t = std::unique_ptr<HfTokenizer>(new HfTokenizer());
  try {
    const json& vocab = j.at("model").at("vocab");
    const json& added = j.contains("added_tokens") ? j.at("added_tokens") : json::array();
    const int64_t max_id_limit = static_cast<int64_t>(vocab.size() + added.size()) + kIdSlack;
    RETURN_IF_ERROR(t->ParseModel(j.at("model"), max_id_limit, path));
    RETURN_IF_ERROR(t->ParseNormalizer(j.value("normalizer", json()), path));
    RETURN_IF_ERROR(t->ParsePreTokenizer(j.value("pre_tokenizer", json()), path));
    RETURN_IF_ERROR(t->ParseDecoder(j.value("decoder", json()), path));
    RETURN_IF_ERROR(t->ParsePostProcessor(j.value("post_processor", json()), path));
    for (const json& a : j.value("added_tokens", json::array())) {
      AddedToken tok{a.at("content").get<std::string>(), JsonInt(a.at("id")),
                     a.value("special", false),          a.value("lstrip", false),
                     a.value("rstrip", false),           a.value("single_word", false)};
      if (tok.id < 0 || tok.id >= max_id_limit) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": added token id ", tok.id, " is outside [0, ", max_id_limit, ")"));
      }
      if (static_cast<int64_t>(t->id_to_token_.size()) <= tok.id)
        t->id_to_token_.resize(tok.id + 1);
      t->id_to_token_[tok.id] = tok.content;
      t->vocab_[tok.content] = tok.id;
      t->added_.push_back(std::move(tok));
    }
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": unexpected structure: ", e.what()));
  } catch (const std::invalid_argument& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": unexpected structure: ", e.what()));
  }
  for (const auto& [token, id] : t->vocab_)
    t->max_token_bytes_ =
        std::max<int64_t>(t->max_token_bytes_, static_cast<int64_t>(token.size()));
  // Longest first, so that matching at a position prefers the longest added token.
  std::sort(t->added_.begin(), t->added_.end(), [](const AddedToken& a, const AddedToken& b) {
    return a.content.size() > b.content.size();
  });
  for (const auto& a : t->added_) {
    if (!a.content.empty())
      t->added_by_byte_[static_cast<unsigned char>(a.content[0])].push_back(&a);
  }
  t->special_.assign(t->id_to_token_.size(), false);
  for (const auto& a : t->added_) t->special_[a.id] = a.special;
  return t;
}

}  // namespace hf

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadHfTokenizer(const std::string& path) {
  ASSIGN_OR_RETURN(auto t, hf::HfTokenizer::Parse(path));
  return std::unique_ptr<Tokenizer>(std::move(t));
}

}  // namespace attnscope
