// Private to text/tokenizer/: the parts of a Hugging Face tokenizer.json tokenizer. The class is
// declared here and defined in one file per stage: hf_load.cpp (reading the file), hf_normalize.cpp
// (normalizers and pre-tokenizers), hf_bpe.cpp (added tokens, the BPE model, post-processor) and
// hf_decode.cpp (decoders).
#pragma once

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "core/utf8.h"
#include "text/tokenizer/tokenizer.h"

namespace attnscope {
namespace hf {

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
inline const ByteMap& Bytes() {
  static const ByteMap m;
  return m;
}

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

class HfTokenizer : public Tokenizer {
 public:
  static absl::StatusOr<std::unique_ptr<HfTokenizer>> Parse(const std::string& path);

  std::vector<int64_t> Encode(const std::string& text, bool add_special_tokens) const override {
    return EncodeAtMost(text, add_special_tokens, -1);
  }
  // Stops after the word that passes `max_tokens` (< 0: never).
  std::vector<int64_t> EncodeAtMost(const std::string& text, bool add_special_tokens,
                                    int64_t max_tokens) const override;
  int64_t max_token_bytes() const override { return max_token_bytes_; }
  std::string Decode(const std::vector<int64_t>& ids, bool skip_special_tokens) const override;
  std::string Piece(int64_t id) const override;
  std::optional<int64_t> TokenId(const std::string& token) const override {
    auto it = vocab_.find(token);
    if (it == vocab_.end()) return std::nullopt;
    return it->second;
  }
  int64_t vocab_size() const override { return static_cast<int64_t>(id_to_token_.size()); }

  // Words longer than this are never cached (Hugging Face's BPE cache stops at 256 too).
  static constexpr size_t kMaxCachedWordBytes = 256;
  // Bytes the word cache may hold (keys, ids and their bookkeeping) before it starts again.
  static constexpr int64_t kWordCacheBudgetBytes = int64_t{16} << 20;
  int64_t word_cache_bytes() const;  // what the cache holds now, as counted against the budget

 private:
  static int64_t CacheCost(const std::string& word, const std::vector<int64_t>& ids);
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
  // BPE results of short words (at most kMaxCachedWordBytes), at most kWordCacheBudgetBytes in all
  // (cleared when full).
  mutable std::mutex cache_mu_;
  mutable std::unordered_map<std::string, std::vector<int64_t>> cache_;
  mutable int64_t cache_bytes_ = 0;
  int64_t max_token_bytes_ = 1;  // longest vocabulary entry or added token, in UTF-8 bytes
};

}  // namespace hf
}  // namespace attnscope
