// tokenizer.json: normalizers, pre-tokenizers, the BPE model, added tokens, post-processor and
// decoders, following the Hugging Face `tokenizers` semantics for the files Llama, Mistral and
// Qwen checkpoints ship.
#include <algorithm>
#include <mutex>
#include <queue>
#include <stdexcept>
#include <unordered_map>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "model/files.h"
#include "model/status_macros.h"
#include "model/tokenizer.h"
#include "model/utf8.h"

namespace attnscope {
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

using json = nlohmann::json;

// GPT-2's reversible byte <-> printable character map used by byte-level BPE.
struct ByteMap {
  std::string to_char[256];                   // byte -> UTF-8 of its stand-in character
  std::unordered_map<int32_t, uint8_t> from;  // stand-in code point -> byte
  ByteMap() {
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable =
          (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      const uint32_t cp = printable ? b : 256 + extra++;
      utf8::Append(cp, &to_char[b]);
      from[cp] = static_cast<uint8_t>(b);
    }
  }
};
const ByteMap& Bytes() {
  static const ByteMap m;
  return m;
}

// GPT-2's pre-tokenization regex (ByteLevel with use_regex).
constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

class Regex {
 public:
  static absl::StatusOr<std::shared_ptr<Regex>> Compile(const std::string& pattern) {
    int err = 0;
    PCRE2_SIZE offset = 0;
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                     PCRE2_UTF | PCRE2_UCP, &err, &offset, nullptr);
    if (code == nullptr) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof(msg));
      return absl::InvalidArgumentError(absl::StrCat("tokenizer regex '", pattern,
                                                     "' does not compile at ", offset, ": ",
                                                     reinterpret_cast<char*>(msg)));
    }
    pcre2_jit_compile(code,
                      PCRE2_JIT_COMPLETE);  // falls back to the interpreter when JIT is absent
    auto r = std::make_shared<Regex>();
    r->code_ = code;
    return r;
  }
  ~Regex() {
    if (code_ != nullptr) pcre2_code_free(code_);
  }
  // [begin, end) byte ranges of successive non-overlapping matches.
  std::vector<std::pair<size_t, size_t>> FindAll(std::string_view s) const {
    std::vector<std::pair<size_t, size_t>> out;
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(code_, nullptr);
    size_t pos = 0;
    while (pos <= s.size()) {
      int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), pos,
                           PCRE2_NO_UTF_CHECK, md, nullptr);
      if (rc < 0) break;
      PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      if (ov[1] == ov[0]) {  // empty match: step over one character
        pos =
            ov[0] + (ov[0] < s.size() ? utf8::CharLength(static_cast<unsigned char>(s[ov[0]])) : 1);
        continue;
      }
      out.emplace_back(ov[0], ov[1]);
      pos = ov[1];
    }
    pcre2_match_data_free(md);
    return out;
  }

 private:
  pcre2_code* code_ = nullptr;
};

struct Normalizer {
  enum Kind { kNfc, kNfkc, kNfd, kNfkd, kPrepend, kReplace, kLowercase } kind;
  std::string a, b;
};

struct PreTokenizer {
  enum Kind { kSplit, kByteLevel, kMetaspace, kDigits } kind;
  std::shared_ptr<Regex> regex;    // kSplit, kByteLevel with use_regex
  bool add_prefix_space = false;   // kByteLevel
  std::string replacement;         // kMetaspace
  std::string prepend_scheme;      // kMetaspace: always, first, never
  bool split = true;               // kMetaspace
  bool individual_digits = false;  // kDigits
};

struct Decoder {
  enum Kind { kByteLevel, kReplace, kByteFallback, kFuse, kStrip, kMetaspace } kind;
  std::string a, b;  // kReplace: pattern, content; kStrip: content; kMetaspace: replacement
  int start = 0, stop = 0;
  bool prepend = true;
};

struct AddedToken {
  std::string content;
  int64_t id;
  bool special, lstrip, rstrip, single_word;
};

absl::StatusOr<std::string> PatternString(const json& pattern, const std::string& where) {
  if (pattern.contains("String")) return pattern.at("String").get<std::string>();
  if (pattern.contains("Regex")) return pattern.at("Regex").get<std::string>();
  return absl::InvalidArgumentError(absl::StrCat(where, ": pattern is neither String nor Regex"));
}

std::string RegexQuote(const std::string& s) { return absl::StrCat("\\Q", s, "\\E"); }

std::string Utf8Normalize(const std::string& s, utf8proc_option_t options) {
  utf8proc_uint8_t* out = nullptr;
  utf8proc_ssize_t n =
      utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()), s.size(), &out,
                   static_cast<utf8proc_option_t>(options | UTF8PROC_STABLE));
  if (n < 0) return s;  // not valid UTF-8: leave it as is
  std::string r(reinterpret_cast<char*>(out), n);
  free(out);
  return r;
}

class HfTokenizer : public Tokenizer {
 public:
  static absl::StatusOr<std::unique_ptr<HfTokenizer>> Parse(const std::string& path);

  std::vector<int64_t> Encode(const std::string& text, bool add_special_tokens) const override;
  std::string Decode(const std::vector<int64_t>& ids, bool skip_special_tokens) const override;
  std::string Piece(int64_t id) const override;
  std::optional<int64_t> TokenId(const std::string& token) const override {
    auto it = vocab_.find(token);
    if (it == vocab_.end()) return std::nullopt;
    return it->second;
  }
  int64_t vocab_size() const override { return static_cast<int64_t>(id_to_token_.size()); }
  std::string kind() const override { return "tokenizer.json"; }

 private:
  absl::Status ParseModel(const json& model, int64_t max_id_limit, const std::string& path);
  absl::Status ParseNormalizer(const json& n, const std::string& path);
  absl::Status ParsePreTokenizer(const json& p, const std::string& path);
  absl::Status ParseDecoder(const json& d, const std::string& path);
  absl::Status ParsePostProcessor(const json& p, const std::string& path);

  std::string Normalize(std::string s) const;
  std::vector<std::string> PreTokenize(const std::string& s, bool first_segment) const;
  void Bpe(const std::string& word, std::vector<int64_t>* out) const;
  std::vector<std::string> DecodeTokens(std::vector<std::string> tokens, bool strip) const;

  std::unordered_map<std::string, int64_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>>
      merges_;  // (left, right) -> (rank, merged id)
  bool byte_fallback_ = false;
  bool fuse_unk_ = false;
  bool ignore_merges_ = false;
  int64_t unk_id_ = -1;
  int64_t byte_ids_[256];
  std::vector<Normalizer> normalizers_;
  std::vector<PreTokenizer> pre_tokenizers_;
  std::vector<Decoder> decoders_;
  std::vector<AddedToken> added_;
  std::vector<const AddedToken*> added_by_byte_[256];  // by first byte, longest first
  std::vector<bool> special_;                          // per id: an added token marked special
  std::vector<int64_t> prefix_ids_, suffix_ids_;
  mutable std::mutex cache_mu_;
  mutable std::unordered_map<std::string, std::vector<int64_t>> cache_;
};

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

std::string HfTokenizer::Normalize(std::string s) const {
  for (const Normalizer& n : normalizers_) {
    switch (n.kind) {
      case Normalizer::kNfc:
        s = Utf8Normalize(s, UTF8PROC_COMPOSE);
        break;
      case Normalizer::kNfkc:
        s = Utf8Normalize(s, static_cast<utf8proc_option_t>(UTF8PROC_COMPOSE | UTF8PROC_COMPAT));
        break;
      case Normalizer::kNfd:
        s = Utf8Normalize(s, UTF8PROC_DECOMPOSE);
        break;
      case Normalizer::kNfkd:
        s = Utf8Normalize(s, static_cast<utf8proc_option_t>(UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT));
        break;
      case Normalizer::kLowercase:
        s = Utf8Normalize(s, UTF8PROC_CASEFOLD);
        break;
      case Normalizer::kPrepend:
        if (!s.empty()) s = n.a + s;
        break;
      case Normalizer::kReplace:
        s = absl::StrReplaceAll(s, {{n.a, n.b}});
        break;
    }
  }
  return s;
}

// Splits `s` into the matches of `re` and the text between them (behavior "Isolated").
std::vector<std::string> SplitIsolated(const Regex& re, const std::string& s) {
  std::vector<std::string> out;
  size_t last = 0;
  for (auto [b, e] : re.FindAll(s)) {
    if (b > last) out.push_back(s.substr(last, b - last));
    out.push_back(s.substr(b, e - b));
    last = e;
  }
  if (last < s.size()) out.push_back(s.substr(last));
  return out;
}

std::vector<std::string> HfTokenizer::PreTokenize(const std::string& s, bool first_segment) const {
  std::vector<std::string> pieces = {s};
  for (const PreTokenizer& p : pre_tokenizers_) {
    std::vector<std::string> next;
    for (std::string& piece : pieces) {
      switch (p.kind) {
        case PreTokenizer::kSplit:
        case PreTokenizer::kDigits:
          for (auto& x : SplitIsolated(*p.regex, piece)) next.push_back(std::move(x));
          break;
        case PreTokenizer::kByteLevel: {
          if (p.add_prefix_space && !piece.empty() && piece[0] != ' ') piece = " " + piece;
          std::vector<std::string> parts =
              p.regex ? SplitIsolated(*p.regex, piece) : std::vector<std::string>{piece};
          for (const std::string& part : parts) {
            std::string mapped;
            for (unsigned char c : part) mapped += Bytes().to_char[c];
            next.push_back(std::move(mapped));
          }
          break;
        }
        case PreTokenizer::kMetaspace: {
          std::string r = absl::StrReplaceAll(piece, {{" ", p.replacement}});
          const bool prepend =
              p.prepend_scheme == "always" || (p.prepend_scheme == "first" && first_segment);
          if (prepend && r.compare(0, p.replacement.size(), p.replacement) != 0)
            r = p.replacement + r;
          if (!p.split) {
            next.push_back(std::move(r));
            break;
          }
          // Each piece starts at a replacement character (merged with the word after it).
          size_t start = 0;
          for (size_t pos = r.find(p.replacement, 1); pos != std::string::npos;
               pos = r.find(p.replacement, pos + 1)) {
            next.push_back(r.substr(start, pos - start));
            start = pos;
          }
          next.push_back(r.substr(start));
          break;
        }
      }
    }
    pieces = std::move(next);
  }
  return pieces;
}

void HfTokenizer::Bpe(const std::string& word, std::vector<int64_t>* out) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    auto it = vocab_.find(word);
    if (it != vocab_.end()) {
      out->push_back(it->second);
      return;
    }
  }
  {
    std::lock_guard<std::mutex> lock(cache_mu_);
    auto it = cache_.find(word);
    if (it != cache_.end()) {
      out->insert(out->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  // Initial symbols: characters in the vocabulary, else their bytes (byte fallback), else unk.
  std::vector<int64_t> sym;
  for (std::string_view ch : utf8::Chars(word)) {
    auto it = vocab_.find(std::string(ch));
    if (it != vocab_.end()) {
      sym.push_back(it->second);
      continue;
    }
    bool bytes_ok = byte_fallback_;
    for (unsigned char c : ch) bytes_ok = bytes_ok && byte_ids_[c] >= 0;
    if (bytes_ok) {
      for (unsigned char c : ch) sym.push_back(byte_ids_[c]);
    } else if (unk_id_ >= 0) {
      if (!(fuse_unk_ && !sym.empty() && sym.back() == unk_id_)) sym.push_back(unk_id_);
    }
  }
  // Merges by rank, leftmost first among equal ranks, over a linked list of symbols.
  const int n = static_cast<int>(sym.size());
  std::vector<int> prev(n), next(n);
  for (int i = 0; i < n; ++i) prev[i] = i - 1, next[i] = i + 1 < n ? i + 1 : -1;
  struct Cand {
    int32_t rank;
    int pos;
    int64_t left, right;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto push = [&](int i) {
    if (i < 0 || next[i] < 0) return;
    const int j = next[i];
    auto it = merges_.find((static_cast<uint64_t>(sym[i]) << 32) | static_cast<uint64_t>(sym[j]));
    if (it != merges_.end()) heap.push({it->second.first, i, sym[i], sym[j]});
  };
  for (int i = 0; i + 1 < n; ++i) push(i);
  std::vector<bool> gone(n, false);
  while (!heap.empty()) {
    Cand c = heap.top();
    heap.pop();
    const int i = c.pos;
    if (gone[i] || next[i] < 0 || sym[i] != c.left || sym[next[i]] != c.right) continue;  // stale
    const int j = next[i];
    sym[i] =
        merges_.at((static_cast<uint64_t>(c.left) << 32) | static_cast<uint64_t>(c.right)).second;
    gone[j] = true;
    next[i] = next[j];
    if (next[j] >= 0) prev[next[j]] = i;
    push(prev[i]);
    push(i);
  }
  std::vector<int64_t> ids;
  for (int i = n > 0 ? 0 : -1; i >= 0; i = next[i]) ids.push_back(sym[i]);
  out->insert(out->end(), ids.begin(), ids.end());
  std::lock_guard<std::mutex> lock(cache_mu_);
  if (cache_.size() > 100000) cache_.clear();
  cache_.emplace(word, std::move(ids));
}

std::vector<int64_t> HfTokenizer::Encode(const std::string& text, bool add_special_tokens) const {
  std::vector<int64_t> ids;
  if (add_special_tokens) ids = prefix_ids_;
  // Added tokens are found in the raw text first; the text between them is normalized,
  // pre-tokenized and run through BPE.
  size_t segment_start = 0;
  bool first_segment = true;
  auto flush = [&](size_t end) {
    if (end > segment_start) {
      for (const std::string& piece :
           PreTokenize(Normalize(text.substr(segment_start, end - segment_start)), first_segment)) {
        Bpe(piece, &ids);
      }
    }
    first_segment = false;
  };
  auto is_word = [&](size_t pos) {
    return pos < text.size() && (std::isalnum(static_cast<unsigned char>(text[pos])) ||
                                 text[pos] == '_' || static_cast<unsigned char>(text[pos]) >= 0x80);
  };
  for (size_t pos = 0; pos < text.size();) {
    const AddedToken* hit = nullptr;
    for (const AddedToken* a : added_by_byte_[static_cast<unsigned char>(text[pos])]) {
      if (text.compare(pos, a->content.size(), a->content) != 0) continue;
      if (a->single_word && ((pos > 0 && is_word(pos - 1)) || is_word(pos + a->content.size())))
        continue;
      hit = a;
      break;
    }
    if (hit == nullptr) {
      pos += utf8::CharLength(static_cast<unsigned char>(text[pos]));
      continue;
    }
    size_t begin = pos, end = pos + hit->content.size();
    if (hit->lstrip) {
      while (begin > segment_start && std::isspace(static_cast<unsigned char>(text[begin - 1])))
        --begin;
    }
    if (hit->rstrip) {
      while (end < text.size() && std::isspace(static_cast<unsigned char>(text[end]))) ++end;
    }
    flush(begin);
    ids.push_back(hit->id);
    segment_start = pos = end;
  }
  flush(text.size());
  if (add_special_tokens) ids.insert(ids.end(), suffix_ids_.begin(), suffix_ids_.end());
  return ids;
}

std::vector<std::string> HfTokenizer::DecodeTokens(std::vector<std::string> tokens,
                                                   bool strip) const {
  for (const Decoder& d : decoders_) {
    switch (d.kind) {
      case Decoder::kReplace:
        for (auto& t : tokens) t = absl::StrReplaceAll(t, {{d.a, d.b}});
        break;
      case Decoder::kByteFallback: {
        std::vector<std::string> out;
        std::string bytes;
        int pending = 0;
        auto flush = [&] {
          if (pending == 0) return;
          if (utf8::IsValid(bytes)) {
            out.push_back(bytes);
          } else {
            for (int k = 0; k < pending; ++k) out.push_back("\xEF\xBF\xBD");
          }
          bytes.clear();
          pending = 0;
        };
        for (auto& t : tokens) {
          unsigned int b = 0;
          if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>' &&
              std::sscanf(t.c_str() + 3, "%2X", &b) == 1) {
            bytes.push_back(static_cast<char>(b));
            ++pending;
          } else {
            flush();
            out.push_back(std::move(t));
          }
        }
        flush();
        tokens = std::move(out);
        break;
      }
      case Decoder::kFuse: {
        std::string all;
        for (auto& t : tokens) all += t;
        tokens = {all};
        break;
      }
      case Decoder::kStrip:
        if (!strip) break;
        for (auto& t : tokens) {
          int s = 0;
          while (s < d.start && t.compare(0, d.a.size(), d.a) == 0) t.erase(0, d.a.size()), ++s;
          s = 0;
          while (s < d.stop && t.size() >= d.a.size() &&
                 t.compare(t.size() - d.a.size(), d.a.size(), d.a) == 0) {
            t.erase(t.size() - d.a.size()), ++s;
          }
        }
        break;
      case Decoder::kMetaspace:
        for (size_t i = 0; i < tokens.size(); ++i) {
          tokens[i] = absl::StrReplaceAll(tokens[i], {{d.a, " "}});
          if (i == 0 && strip && d.prepend && !tokens[i].empty() && tokens[i][0] == ' ')
            tokens[i].erase(0, 1);
        }
        break;
      case Decoder::kByteLevel: {
        std::string bytes;
        for (const auto& t : tokens) {
          for (size_t i = 0; i < t.size();) {
            const size_t start = i;
            const int32_t cp = utf8::Next(t, &i);
            auto it = Bytes().from.find(cp);
            if (it != Bytes().from.end())
              bytes.push_back(static_cast<char>(it->second));
            else
              bytes.append(t, start, i - start);
          }
        }
        tokens = {utf8::Lossy(bytes)};
        break;
      }
    }
  }
  return tokens;
}

std::string HfTokenizer::Decode(const std::vector<int64_t>& ids, bool skip_special_tokens) const {
  std::vector<std::string> tokens;
  for (int64_t id : ids) {
    if (id < 0 || id >= static_cast<int64_t>(id_to_token_.size())) continue;
    if (skip_special_tokens && special_[id]) continue;
    tokens.push_back(id_to_token_[id]);
  }
  std::string out;
  for (const auto& t : DecodeTokens(std::move(tokens), /*strip=*/true)) out += t;
  return out;
}

std::string HfTokenizer::Piece(int64_t id) const {
  if (id < 0 || id >= static_cast<int64_t>(id_to_token_.size())) return "";
  std::string out;
  for (const auto& t : DecodeTokens({id_to_token_[id]}, /*strip=*/false)) out += t;
  return out;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadHfTokenizer(const std::string& path) {
  ASSIGN_OR_RETURN(auto t, HfTokenizer::Parse(path));
  return std::unique_ptr<Tokenizer>(std::move(t));
}

}  // namespace attnscope
