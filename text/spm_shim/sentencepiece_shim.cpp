// A C interface around the sentencepiece library, built as its own shared object and opened with
// dlopen(RTLD_LOCAL | RTLD_DEEPBIND): Debian's libsentencepiece carries its own protobuf, which
// must not meet the libprotobuf that gRPC and libtorch load (both would abort at start-up).
// This is the only file that includes sentencepiece_processor.h (it defines absl::string_view).
#include <sentencepiece_processor.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

extern "C" {

// Returns a processor, or null with a message in `err` (malloc'ed; free with
// attnscope_spm_free_buf).
void* attnscope_spm_load(const char* path, char** err) {
  auto* sp = new sentencepiece::SentencePieceProcessor();
  const auto status = sp->Load(path);
  if (!status.ok()) {
    *err = strdup(status.ToString().c_str());
    delete sp;
    return nullptr;
  }
  return sp;
}

void attnscope_spm_free(void* handle) {
  delete static_cast<sentencepiece::SentencePieceProcessor*>(handle);
}
void attnscope_spm_free_buf(void* buf) { std::free(buf); }

// Ids of `text` into a malloc'ed array; returns the count.
int attnscope_spm_encode(void* handle, const char* text, size_t len, int** ids) {
  std::vector<int> out;
  static_cast<sentencepiece::SentencePieceProcessor*>(handle)
      ->Encode(std::string(text, len), &out)
      .IgnoreError();
  *ids = static_cast<int*>(std::malloc(sizeof(int) * (out.empty() ? 1 : out.size())));
  std::memcpy(*ids, out.data(), sizeof(int) * out.size());
  return static_cast<int>(out.size());
}

// Text of `ids` (malloc'ed, NUL-terminated).
char* attnscope_spm_decode(void* handle, const int* ids, int n) {
  std::string text;
  static_cast<sentencepiece::SentencePieceProcessor*>(handle)
      ->Decode(std::vector<int>(ids, ids + n), &text)
      .IgnoreError();
  return strdup(text.c_str());
}

char* attnscope_spm_id_to_piece(void* handle, int id) {
  return strdup(static_cast<sentencepiece::SentencePieceProcessor*>(handle)->IdToPiece(id).c_str());
}

int attnscope_spm_piece_to_id(void* handle, const char* piece) {
  return static_cast<sentencepiece::SentencePieceProcessor*>(handle)->PieceToId(piece);
}

// 0 normal, 1 control, 2 unknown, 3 byte.
int attnscope_spm_kind(void* handle, int id) {
  auto* sp = static_cast<sentencepiece::SentencePieceProcessor*>(handle);
  if (sp->IsControl(id)) return 1;
  if (sp->IsUnknown(id)) return 2;
  if (sp->IsByte(id)) return 3;
  return 0;
}

int attnscope_spm_vocab_size(void* handle) {
  return static_cast<sentencepiece::SentencePieceProcessor*>(handle)->GetPieceSize();
}

int attnscope_spm_bos_id(void* handle) {
  return static_cast<sentencepiece::SentencePieceProcessor*>(handle)->bos_id();
}
int attnscope_spm_eos_id(void* handle) {
  return static_cast<sentencepiece::SentencePieceProcessor*>(handle)->eos_id();
}

}  // extern "C"
