// tokenizer.model through the sentencepiece library, reached only through the dlopen'ed shim
// (see sentencepiece_shim.cpp for why).
#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "core/utf8.h"
#include "text/tokenizer/tokenizer.h"

#ifndef ATTNSCOPE_SPM_SHIM_PATH
#define ATTNSCOPE_SPM_SHIM_PATH ""
#endif

namespace attnscope {
namespace {

struct ShimApi {
  void* (*load)(const char*, char**);
  void (*free_handle)(void*);
  void (*free_buf)(void*);
  int (*encode)(void*, const char*, size_t, int**);
  char* (*decode)(void*, const int*, int);
  char* (*id_to_piece)(void*, int);
  int (*piece_to_id)(void*, const char*);
  int (*kind)(void*, int);
  int (*vocab_size)(void*);
  int (*bos_id)(void*);
  int (*eos_id)(void*);
};

// Candidates: $ATTNSCOPE_SPM_SHIM, the build tree's copy, beside the running executable.
absl::StatusOr<const ShimApi*> Shim() {
  static std::once_flag once;
  static ShimApi api;
  static absl::Status status;
  std::call_once(once, [] {
    std::vector<std::string> candidates;
    if (const char* env = std::getenv("ATTNSCOPE_SPM_SHIM")) candidates.push_back(env);
    if (*ATTNSCOPE_SPM_SHIM_PATH) candidates.push_back(ATTNSCOPE_SPM_SHIM_PATH);
    char exe[4096];
    const ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (n > 0) {
      std::string dir(exe, n);
      dir = dir.substr(0, dir.find_last_of('/'));
      candidates.push_back(dir + "/libattnscope_spm_shim.so");
      candidates.push_back(dir + "/../lib/libattnscope_spm_shim.so");
    }
    void* lib = nullptr;
    std::string errors;
    for (const auto& path : candidates) {
      lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
      if (lib != nullptr) break;
      absl::StrAppend(&errors, " ", path, ": ", dlerror(), ";");
    }
    if (lib == nullptr) {
      status = absl::FailedPreconditionError(absl::StrCat(
          "the sentencepiece shim library could not be loaded (set ATTNSCOPE_SPM_SHIM):", errors));
      return;
    }
    auto sym = [&](const char* name) { return dlsym(lib, name); };
    api.load = reinterpret_cast<decltype(api.load)>(sym("attnscope_spm_load"));
    api.free_handle = reinterpret_cast<decltype(api.free_handle)>(sym("attnscope_spm_free"));
    api.free_buf = reinterpret_cast<decltype(api.free_buf)>(sym("attnscope_spm_free_buf"));
    api.encode = reinterpret_cast<decltype(api.encode)>(sym("attnscope_spm_encode"));
    api.decode = reinterpret_cast<decltype(api.decode)>(sym("attnscope_spm_decode"));
    api.id_to_piece = reinterpret_cast<decltype(api.id_to_piece)>(sym("attnscope_spm_id_to_piece"));
    api.piece_to_id = reinterpret_cast<decltype(api.piece_to_id)>(sym("attnscope_spm_piece_to_id"));
    api.kind = reinterpret_cast<decltype(api.kind)>(sym("attnscope_spm_kind"));
    api.vocab_size = reinterpret_cast<decltype(api.vocab_size)>(sym("attnscope_spm_vocab_size"));
    api.bos_id = reinterpret_cast<decltype(api.bos_id)>(sym("attnscope_spm_bos_id"));
    api.eos_id = reinterpret_cast<decltype(api.eos_id)>(sym("attnscope_spm_eos_id"));
    if (!api.load || !api.encode || !api.decode || !api.kind || !api.eos_id) {
      status = absl::FailedPreconditionError("the sentencepiece shim library lacks its functions");
    }
  });
  if (!status.ok()) return status;
  return &api;
}

std::string TakeString(const ShimApi* api, char* s) {
  std::string out = s != nullptr ? s : "";
  api->free_buf(s);
  return out;
}

class SentencePieceTokenizer : public Tokenizer {
 public:
  SentencePieceTokenizer(const ShimApi* api, void* handle) : api_(api), handle_(handle) {
    const int n = api_->vocab_size(handle_);
    for (int id = 0; id < n; ++id) {
      const int kind = api_->kind(handle_, id);
      special_.push_back(kind == 1 || kind == 2);
      max_token_bytes_ = std::max<int64_t>(
          max_token_bytes_,
          static_cast<int64_t>(TakeString(api_, api_->id_to_piece(handle_, id)).size()));
      // Control and unknown pieces written in the text stand for themselves, as in the
      // Hugging Face tokenizers of the same models.
      if (kind == 1 || kind == 2)
        specials_.emplace_back(TakeString(api_, api_->id_to_piece(handle_, id)), id);
    }
  }
  ~SentencePieceTokenizer() override { api_->free_handle(handle_); }

  std::vector<int64_t> Encode(const std::string& text, bool add_special_tokens) const override {
    std::vector<int64_t> ids;
    if (add_special_tokens && api_->bos_id(handle_) >= 0) ids.push_back(api_->bos_id(handle_));
    size_t start = 0;
    auto flush = [&](size_t end) {
      if (end <= start) return;
      int* out = nullptr;
      const int n = api_->encode(handle_, text.data() + start, end - start, &out);
      ids.insert(ids.end(), out, out + n);
      api_->free_buf(out);
    };
    for (size_t pos = 0; pos < text.size();) {
      bool hit = false;
      for (const auto& [piece, id] : specials_) {
        if (!piece.empty() && text.compare(pos, piece.size(), piece) == 0) {
          flush(pos);
          ids.push_back(id);
          start = pos = pos + piece.size();
          hit = true;
          break;
        }
      }
      if (!hit) pos += utf8::CharLength(static_cast<unsigned char>(text[pos]));
    }
    flush(text.size());
    return ids;
  }

  // Runs of ordinary pieces are decoded by sentencepiece; control pieces are written as their text
  // (unless skipped). As in the Hugging Face decoders, only the output's first space is dropped.
  std::string Decode(const std::vector<int64_t>& ids, bool skip_special_tokens) const override {
    std::string out;
    std::vector<int> run;
    auto flush = [&] {
      if (run.empty()) return;
      std::string text =
          TakeString(api_, api_->decode(handle_, run.data(), static_cast<int>(run.size())));
      if (!out.empty() &&
          TakeString(api_, api_->id_to_piece(handle_, run[0])).rfind("\u2581", 0) == 0)
        out += ' ';
      out += text;
      run.clear();
    };
    for (int64_t id : ids) {
      if (id < 0 || id >= static_cast<int64_t>(special_.size())) continue;
      if (!special_[id]) {
        run.push_back(static_cast<int>(id));
        continue;
      }
      flush();
      if (!skip_special_tokens)
        out += TakeString(api_, api_->id_to_piece(handle_, static_cast<int>(id)));
    }
    flush();
    return out;
  }

  std::string Piece(int64_t id) const override {
    if (id < 0 || id >= static_cast<int64_t>(special_.size())) return "";
    std::string piece = TakeString(api_, api_->id_to_piece(handle_, static_cast<int>(id)));
    std::string out;
    for (size_t i = 0; i < piece.size();) {
      if (piece.compare(i, 3, "\u2581") == 0) {
        out += ' ';
        i += 3;
      } else {
        out += piece[i++];
      }
    }
    unsigned int b;
    if (piece.size() == 6 && piece.compare(0, 3, "<0x") == 0 &&
        std::sscanf(piece.c_str() + 3, "%2X", &b) == 1) {
      return utf8::Lossy(std::string(1, static_cast<char>(b)));
    }
    return out;
  }

  std::optional<int64_t> TokenId(const std::string& token) const override {
    const int id = api_->piece_to_id(handle_, token.c_str());
    if (id < 0 || (id == 0 && TakeString(api_, api_->id_to_piece(handle_, 0)) != token))
      return std::nullopt;
    return id;
  }
  int64_t vocab_size() const override { return static_cast<int64_t>(special_.size()); }
  int64_t max_token_bytes() const override { return max_token_bytes_; }

 private:
  const ShimApi* api_;
  void* handle_;
  std::vector<bool> special_;
  int64_t max_token_bytes_ = 1;  // longest piece, in UTF-8 bytes
  std::vector<std::pair<std::string, int64_t>> specials_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadSentencePieceTokenizer(const std::string& path) {
  ASSIGN_OR_RETURN(const ShimApi* api, Shim());
  char* err = nullptr;
  void* handle = api->load(path.c_str(), &err);
  if (handle == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, " is not a SentencePiece model: ", TakeString(api, err)));
  }
  return std::unique_ptr<Tokenizer>(new SentencePieceTokenizer(api, handle));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::string& dir) {
  if (access((dir + "/tokenizer.json").c_str(), F_OK) == 0)
    return LoadHfTokenizer(dir + "/tokenizer.json");
  if (access((dir + "/tokenizer.model").c_str(), F_OK) == 0)
    return LoadSentencePieceTokenizer(dir + "/tokenizer.model");
  return absl::NotFoundError(absl::StrCat(dir, " has neither tokenizer.json nor tokenizer.model"));
}

}  // namespace attnscope
