// Text <-> token ids, exactly as the reference tokenizers do it: Hugging Face `tokenizer.json`
// (byte-level BPE as Llama 3 / Qwen2.5 use; BPE with byte fallback and metaspace as Llama 2 /
// Mistral use) or a SentencePiece `tokenizer.model`.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace attnscope {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // `tokenizer.json` when the folder has one, else `tokenizer.model`; NOT_FOUND when neither.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& dir);

  // Ids of `text`; with `add_special_tokens`, what the post-processor adds (e.g. BOS).
  virtual std::vector<int64_t> Encode(const std::string& text, bool add_special_tokens) const = 0;
  // Encode, allowed to stop once it has more than `max_tokens` ids (a prompt past the context is
  // refused; finishing it would only cost the server time): the result is then a prefix longer
  // than `max_tokens`. The default encodes everything.
  virtual std::vector<int64_t> EncodeAtMost(const std::string& text, bool add_special_tokens,
                                            int64_t max_tokens) const {
    (void)max_tokens;
    return Encode(text, add_special_tokens);
  }
  // Bytes of text one token can stand for at most (for bounding text by a token count).
  virtual int64_t max_token_bytes() const = 0;
  virtual std::string Decode(const std::vector<int64_t>& ids, bool skip_special_tokens) const = 0;
  // The text one token stands for, for display (may be part of a UTF-8 character: lossy).
  virtual std::string Piece(int64_t id) const = 0;
  // The id of a token string in the vocabulary (special tokens included), if any.
  virtual std::optional<int64_t> TokenId(const std::string& token) const = 0;
  virtual int64_t vocab_size() const = 0;
};

// Loaders of each kind (Tokenizer::Load picks one).
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadHfTokenizer(const std::string& path);
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadSentencePieceTokenizer(const std::string& path);

}  // namespace attnscope
