#include "client/cpp/sample_writer.h"

#include <unistd.h>

#include <cstring>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"

namespace attnscope {
namespace {

const char* PhaseName(v1::Phase p) { return p == v1::PHASE_PREFILL ? "prefill" : "decode"; }

const char* DType(v1::ElementType t) {
  switch (t) {
    case v1::ELEMENT_FLOAT16: return "F16";
    case v1::ELEMENT_BFLOAT16: return "BF16";
    default: return "F32";
  }
}

int ElementSize(v1::ElementType t) { return t == v1::ELEMENT_FLOAT32 ? 4 : 2; }

float HalfToFloat(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      exp = 127 - 15 + 1;
      while ((mant & 0x400) == 0) mant <<= 1, --exp;
      bits = sign | (exp << 23) | ((mant & 0x3FF) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float ToFloat(const char* p, v1::ElementType t) {
  if (t == v1::ELEMENT_FLOAT32) {
    float f;
    std::memcpy(&f, p, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, p, 2);
  if (t == v1::ELEMENT_FLOAT16) return HalfToFloat(h);
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

absl::Status WriteAll(std::FILE* f, const void* data, size_t n, const std::string& what) {
  if (n > 0 && std::fwrite(data, 1, n, f) != n) return absl::DataLossError(absl::StrCat("cannot write ", what));
  return absl::OkStatus();
}

absl::Status CopyRange(std::FILE* from, int64_t offset, int64_t n, std::FILE* to, const std::string& what) {
  std::vector<char> buf(1 << 20);
  while (n > 0) {
    const size_t k = static_cast<size_t>(std::min<int64_t>(n, buf.size()));
    if (pread(fileno(from), buf.data(), k, offset) != static_cast<ssize_t>(k)) {
      return absl::DataLossError(absl::StrCat("cannot read back ", what));
    }
    if (std::fwrite(buf.data(), 1, k, to) != k) return absl::DataLossError(absl::StrCat("cannot write ", what));
    offset += k;
    n -= k;
  }
  return absl::OkStatus();
}

// Pickle (protocol 4) opcodes for the prototype's layout.
struct Pickler {
  std::FILE* f;
  void Raw(const std::string& s) { std::fwrite(s.data(), 1, s.size(), f); }
  void Byte(char c) { std::fputc(c, f); }
  void Int(int64_t v) {
    Byte('J');  // BININT: 4-byte signed
    int32_t x = static_cast<int32_t>(v);
    std::fwrite(&x, 4, 1, f);
  }
  void Str(const std::string& s) {
    Byte('X');  // BINUNICODE
    uint32_t n = static_cast<uint32_t>(s.size());
    std::fwrite(&n, 4, 1, f);
    Raw(s);
  }
  void Global(const std::string& module, const std::string& name) { Raw("c" + module + "\n" + name + "\n"); }
  void IntTuple(const std::vector<int64_t>& v) {
    Byte('(');
    for (int64_t x : v) Int(x);
    Byte('t');
  }
  void IntList(const std::vector<int64_t>& v) {
    Byte(']');
    Byte('(');
    for (int64_t x : v) Int(x);
    Byte('e');
  }
  // numpy float32 array of `shape`; its bytes are written by `write_data` right after the opcode.
  template <typename WriteData>
  void Float32Array(const std::vector<int64_t>& shape, uint64_t nbytes, WriteData write_data) {
    Global("numpy.core.multiarray", "_reconstruct");
    Global("numpy", "ndarray");
    Byte('(');
    Int(0);
    Byte('t');
    Raw(std::string("C\x01" "b", 3));  // SHORT_BINBYTES b'b'
    Byte('\x87');                        // TUPLE3
    Byte('R');                           // REDUCE
    Byte('(');
    Int(1);
    IntTuple(shape);
    Global("numpy", "dtype");
    Str("f4");
    Byte('\x89');  // False
    Byte('\x88');  // True
    Byte('\x87');
    Byte('R');
    Byte('(');
    Int(3);
    Str("<");
    Byte('N');
    Byte('N');
    Byte('N');
    Int(-1);
    Int(-1);
    Int(0);
    Byte('t');
    Byte('b');     // BUILD dtype
    Byte('\x89');  // not Fortran order
    Byte('\x8e');  // BINBYTES8
    std::fwrite(&nbytes, 8, 1, f);
    write_data();
    Byte('t');
    Byte('b');  // BUILD array
  }
};

}  // namespace

SampleWriter::SampleWriter(std::string path, SampleFormat format) : path_(std::move(path)), format_(format) {}

SampleWriter::~SampleWriter() {
  if (data_ != nullptr) std::fclose(data_);
  if (full_ != nullptr) std::fclose(full_);
  std::remove((path_ + ".data.partial").c_str());
  std::remove((path_ + ".full.partial").c_str());
  if (!finished_) std::remove((path_ + ".partial").c_str());
}

absl::Status SampleWriter::OnHeader(const v1::StreamHeader& header, int64_t max_new_tokens) {
  header_ = header;
  const auto& c = header.capture();
  prompt_len_ = header.prompt_token_ids_size();
  heads_ = c.heads_size();
  bool prefill = false, decode = false;
  for (int p : c.phases()) prefill |= p == v1::PHASE_PREFILL, decode |= p == v1::PHASE_DECODE;
  // Full matrices are assembled only for the pickle layout; safetensors readers assemble them
  // from the blocks (attnscope.load does), which saves writing every value twice.
  assemble_ = format_ == SampleFormat::kPickle && c.form() == v1::FORM_DENSE && c.last_queries() == 0 &&
              c.query_ranges_size() == 0 && prefill;
  max_rows_ = prompt_len_ + (decode ? std::max<int64_t>(0, max_new_tokens - 1) : 0);
  if (format_ == SampleFormat::kPickle && !assemble_) {  // the prototype's layout needs full matrices
    return absl::InvalidArgumentError(
        "--format pickle stores full matrices: it needs --form dense over every query row with the prefill phase");
  }
  data_ = std::fopen((path_ + ".data.partial").c_str(), "w+b");
  if (data_ == nullptr) return absl::PermissionDeniedError(absl::StrCat("cannot write beside ", path_));
  if (assemble_) {
    full_ = std::fopen((path_ + ".full.partial").c_str(), "w+b");
    if (full_ == nullptr) return absl::PermissionDeniedError(absl::StrCat("cannot write beside ", path_));
    for (int i = 0; i < c.layers_size(); ++i) layer_slot_[c.layers(i)] = i;
    // A sparse file: only the rows written take space.
    const int64_t size = static_cast<int64_t>(layer_slot_.size()) * heads_ * max_rows_ * max_rows_ * 4;
    if (ftruncate(fileno(full_), size) != 0) return absl::ResourceExhaustedError("cannot size the work file");
  }
  return absl::OkStatus();
}

absl::Status SampleWriter::Append(const std::string& name, const std::string& dtype, const std::vector<int64_t>& shape,
                                  const std::string& data, int64_t byte_offset, int64_t total_bytes) {
  auto it = entries_.find(name);
  if (it == entries_.end()) {
    if (byte_offset != 0) return absl::DataLossError(absl::StrCat("block ", name, " starts mid-way"));
    it = entries_.emplace(name, Entry{dtype, shape, data_size_, total_bytes}).first;
  }
  if (it->second.offset + byte_offset != data_size_) {
    return absl::DataLossError(absl::StrCat("chunks of block ", name, " arrived out of order"));
  }
  if (!data.empty() && std::fwrite(data.data(), 1, data.size(), data_) != data.size()) {
    return absl::DataLossError(absl::StrCat("cannot write ", path_, ".data.partial (disk full?)"));
  }
  data_size_ += static_cast<int64_t>(data.size());
  return absl::OkStatus();
}

absl::Status SampleWriter::WriteFull(const v1::AttentionChunk& c) {
  // Block values are [heads, rows, keys] row-major; this chunk holds elements [first, first + n).
  const int elem = ElementSize(c.element_type());
  const int64_t rows = c.shape(1), keys = c.shape(2);
  const int64_t first = c.byte_offset() / elem;
  const int64_t n = static_cast<int64_t>(c.data().size()) / elem;
  const int64_t slot = layer_slot_.at(c.layer());
  std::vector<float> run;
  for (int64_t e = first; e < first + n;) {
    const int64_t h = e / (rows * keys), r = (e / keys) % rows, k = e % keys;
    const int64_t len = std::min(keys - k, first + n - e);
    run.resize(len);
    for (int64_t i = 0; i < len; ++i) run[i] = ToFloat(c.data().data() + (e - first + i) * elem, c.element_type());
    const int64_t row = c.query_begin() + r;
    const int64_t offset = (((slot * heads_ + h) * max_rows_ + row) * max_rows_ + k) * 4;
    if (row >= max_rows_ || k + len > max_rows_ ||
        pwrite(fileno(full_), run.data(), len * 4, offset) != static_cast<ssize_t>(len * 4)) {
      return absl::DataLossError("cannot write the full-matrix work file");
    }
    e += len;
  }
  return absl::OkStatus();
}

absl::Status SampleWriter::OnAttention(const v1::AttentionChunk& c) {
  bytes_received_ += static_cast<int64_t>(c.data().size() + c.indices().size());
  const std::string name = absl::StrCat("attention.", PhaseName(c.phase()), ".", c.layer(), ".", c.step(), ".",
                                        c.query_begin());
  std::vector<int64_t> shape(c.shape().begin(), c.shape().end());
  const int elem = ElementSize(c.element_type());
  if (format_ == SampleFormat::kSafetensors) {
    absl::Status s = Append(name, DType(c.element_type()), shape, c.data(), c.byte_offset(), c.block_bytes());
    if (!s.ok()) return s;
    if (!c.indices().empty()) {
      s = Append(name + ".indices", "I32", shape, c.indices(), c.byte_offset() / elem * 4, c.block_bytes() / elem * 4);
      if (!s.ok()) return s;
    }
  }
  if (assemble_ && c.form() == v1::FORM_DENSE) return WriteFull(c);
  return absl::OkStatus();
}

absl::Status SampleWriter::OnStatistic(const v1::StatisticChunk& s) {
  bytes_received_ += static_cast<int64_t>(s.data().size());
  if (format_ != SampleFormat::kSafetensors) return absl::OkStatus();
  const std::string name = absl::StrCat("statistic.", s.kind(), ".", PhaseName(s.phase()), ".", s.layer(), ".",
                                        s.step(), ".", s.query_begin());
  const int64_t total = s.block_bytes() > 0 ? s.block_bytes() : static_cast<int64_t>(s.data().size());
  return Append(name, "F32", {s.shape().begin(), s.shape().end()}, s.data(), s.byte_offset(), total);
}

void SampleWriter::OnToken(const v1::TokenEvent& token) { tokens_.push_back(token); }

absl::Status SampleWriter::WriteSafetensors(const std::string& tmp, const std::string& metadata) {
  const int64_t T = std::min<int64_t>(max_rows_, prompt_len_ + std::max<int64_t>(0, tokens() - 1));
  std::vector<int64_t> prompt_ids(header_.prompt_token_ids().begin(), header_.prompt_token_ids().end());
  std::vector<int64_t> token_ids;
  for (const auto& t : tokens_) token_ids.push_back(t.id());
  // Layout: blocks (already in the data work file), then full matrices, then the id lists.
  nlohmann::ordered_json header;
  header["__metadata__"] = {{"attnscope", metadata}, {"format", "pt"}};
  for (const auto& [name, e] : entries_) {
    header[name] = {{"dtype", e.dtype}, {"shape", e.shape}, {"data_offsets", {e.offset, e.offset + e.bytes}}};
  }
  int64_t offset = data_size_;
  if (assemble_) {
    for (const auto& [layer, slot] : layer_slot_) {
      const int64_t n = heads_ * T * T * 4;
      header[absl::StrCat("layer.", layer)] = {{"dtype", "F32"}, {"shape", {heads_, T, T}}, {"data_offsets", {offset, offset + n}}};
      offset += n;
    }
  }
  header["prompt_token_ids"] = {{"dtype", "I64"}, {"shape", {prompt_ids.size()}},
                                {"data_offsets", {offset, offset + 8 * prompt_ids.size()}}};
  offset += 8 * prompt_ids.size();
  header["token_ids"] = {{"dtype", "I64"}, {"shape", {token_ids.size()}},
                         {"data_offsets", {offset, offset + 8 * token_ids.size()}}};
  std::string text = header.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  text.append((8 - text.size() % 8) % 8, ' ');
  std::FILE* out = std::fopen(tmp.c_str(), "wb");
  if (out == nullptr) return absl::PermissionDeniedError(absl::StrCat("cannot write ", tmp));
  uint64_t len = text.size();
  absl::Status s = WriteAll(out, &len, 8, tmp);
  if (s.ok()) s = WriteAll(out, text.data(), text.size(), tmp);
  std::fflush(data_);
  if (s.ok()) s = CopyRange(data_, 0, data_size_, out, tmp);
  if (s.ok() && assemble_) {
    for (const auto& [layer, slot] : layer_slot_) {
      for (int64_t h = 0; h < heads_ && s.ok(); ++h) {
        for (int64_t r = 0; r < T && s.ok(); ++r) {
          s = CopyRange(full_, ((slot * heads_ + h) * max_rows_ + r) * max_rows_ * 4, T * 4, out, tmp);
        }
      }
    }
  }
  if (s.ok()) s = WriteAll(out, prompt_ids.data(), 8 * prompt_ids.size(), tmp);
  if (s.ok()) s = WriteAll(out, token_ids.data(), 8 * token_ids.size(), tmp);
  if (std::fclose(out) != 0 && s.ok()) s = absl::DataLossError(absl::StrCat("cannot close ", tmp));
  return s;
}

absl::Status SampleWriter::WritePickle(const std::string& tmp) {
  const int64_t T = std::min<int64_t>(max_rows_, prompt_len_ + std::max<int64_t>(0, tokens() - 1));
  std::FILE* out = std::fopen(tmp.c_str(), "wb");
  if (out == nullptr) return absl::PermissionDeniedError(absl::StrCat("cannot write ", tmp));
  Pickler p{out};
  p.Raw(std::string("\x80\x04", 2));
  p.Byte('}');
  p.Byte('(');
  absl::Status s;
  for (const auto& [layer, slot] : layer_slot_) {
    p.Int(layer);
    p.Byte('}');
    p.Byte('(');
    p.Str("shape");
    p.IntList({1, heads_, T, T});
    p.Str("tensor");
    p.Float32Array({1, heads_, T, T}, static_cast<uint64_t>(heads_ * T * T * 4), [&] {
      for (int64_t h = 0; h < heads_ && s.ok(); ++h) {
        for (int64_t r = 0; r < T && s.ok(); ++r) {
          s = CopyRange(full_, ((slot * heads_ + h) * max_rows_ + r) * max_rows_ * 4, T * 4, out, tmp);
        }
      }
    });
    p.Byte('u');
  }
  p.Byte('u');
  p.Byte('.');
  if (std::fclose(out) != 0 && s.ok()) s = absl::DataLossError(absl::StrCat("cannot close ", tmp));
  return s;
}

absl::Status SampleWriter::Finish(const v1::StreamTrailer& trailer, const std::string& prompt_text) {
  nlohmann::json meta = {
      {"format_version", 1},
      {"model", header_.model().name()},
      {"architecture", header_.model().architecture()},
      {"prompt", prompt_text},
      {"prompt_token_ids", header_.prompt_token_ids()},
      {"prompt_pieces", header_.prompt_pieces()},
      {"token_ids", trailer.token_ids()},
      {"generated_text", trailer.text()},
      {"finish_reason", v1::FinishReason_Name(trailer.finish_reason())},
      {"timings", {{"prefill_ms", trailer.timings().prefill_ms()}, {"decode_ms", trailer.timings().decode_ms()}}},
      {"num_layers", header_.model().num_layers()},
      {"num_heads", header_.model().num_heads()},
      {"capture", {{"layers", header_.capture().layers()}, {"heads", header_.capture().heads()},
                   {"form", v1::Form_Name(header_.capture().form())},
                   {"element_type", v1::ElementType_Name(header_.capture().element_type())},
                   {"pool", header_.capture().pool()}, {"top_k", header_.capture().top_k()},
                   {"last_queries", header_.capture().last_queries()}}},
  };
  std::vector<std::string> pieces;
  for (const auto& t : tokens_) pieces.push_back(t.piece());
  meta["token_pieces"] = pieces;
  const std::string tmp = path_ + ".partial";
  absl::Status s = format_ == SampleFormat::kPickle
                       ? WritePickle(tmp)
                       : WriteSafetensors(tmp, meta.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
  if (!s.ok()) return s;
  if (std::rename(tmp.c_str(), path_.c_str()) != 0) {
    return absl::PermissionDeniedError(absl::StrCat("cannot rename ", tmp, " to ", path_));
  }
  finished_ = true;
  return absl::OkStatus();
}

}  // namespace attnscope
