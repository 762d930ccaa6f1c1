#include "client/cpp/sample_writer.h"

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace attnscope {
namespace {

const char* PhaseName(v1::Phase p) { return p == v1::PHASE_PREFILL ? "prefill" : "decode"; }

const char* DType(v1::ElementType t) {
  switch (t) {
    case v1::ELEMENT_FLOAT16:
      return "F16";
    case v1::ELEMENT_BFLOAT16:
      return "BF16";
    default:
      return "F32";
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

// Largest dimension and element count a block may claim; real ones are far smaller.
constexpr int64_t kMaxDim = int64_t{1} << 31;
constexpr int64_t kMaxElements = int64_t{1} << 40;
constexpr int kMaxModelLayers = 4096;
constexpr int kMaxModelHeads = 4096;
constexpr int64_t kMaxPositions = int64_t{1} << 26;

absl::Status Malformed(const std::string& what) {
  return absl::DataLossError(absl::StrCat("malformed stream from the server: ", what));
}

// Product of `shape`, checked: every dimension in [0, kMaxDim], the product at most kMaxElements.
absl::StatusOr<int64_t> CheckedElements(const google::protobuf::RepeatedField<int64_t>& shape,
                                        int rank, const std::string& what) {
  if (shape.size() != rank)
    return Malformed(absl::StrCat(what, " has ", shape.size(), " dimensions, not ", rank));
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0 || d > kMaxDim) return Malformed(absl::StrCat(what, " has a dimension of ", d));
    if (d != 0 && n > kMaxElements / d) return Malformed(absl::StrCat(what, " is too large"));
    n *= d;
  }
  return n;
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

absl::Status WriteAll(std::FILE* f, const void* data, size_t n, const std::string& what) {
  if (n > 0 && std::fwrite(data, 1, n, f) != n)
    return absl::DataLossError(absl::StrCat("cannot write ", what));
  return absl::OkStatus();
}

absl::Status CopyRange(std::FILE* from, int64_t offset, int64_t n, std::FILE* to,
                       const std::string& what) {
  std::vector<char> buf(1 << 20);
  while (n > 0) {
    const size_t k = static_cast<size_t>(std::min<int64_t>(n, buf.size()));
    if (pread(fileno(from), buf.data(), k, offset) != static_cast<ssize_t>(k)) {
      return absl::DataLossError(absl::StrCat("cannot read back ", what));
    }
    if (std::fwrite(buf.data(), 1, k, to) != k)
      return absl::DataLossError(absl::StrCat("cannot write ", what));
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
  void Global(const std::string& module, const std::string& name) {
    Raw("c" + module + "\n" + name + "\n");
  }
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
    Raw(
        std::string("C\x01"
                    "b",
                    3));  // SHORT_BINBYTES b'b'
    Byte('\x87');         // TUPLE3
    Byte('R');            // REDUCE
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

SampleWriter::SampleWriter(std::string path, SampleFormat format)
    : path_(std::move(path)), format_(format) {}

SampleWriter::~SampleWriter() {
  if (data_ != nullptr) std::fclose(data_);
  if (full_ != nullptr) std::fclose(full_);
  std::remove((path_ + ".data.partial").c_str());
  std::remove((path_ + ".full.partial").c_str());
  if (!finished_) std::remove((path_ + ".partial").c_str());
}

absl::Status SampleWriter::OnHeader(const v1::StreamHeader& header, int64_t max_new_tokens) {
  if (have_header_) return Malformed("a second stream header");
  const auto& c = header.capture();
  const int num_layers = header.model().num_layers(), num_heads = header.model().num_heads();
  if (num_layers < 1 || num_layers > kMaxModelLayers || num_heads < 1 ||
      num_heads > kMaxModelHeads) {
    return Malformed(absl::StrCat("the header describes a model of ", num_layers, " layers and ",
                                  num_heads, " heads"));
  }
  std::set<int> seen;
  for (int l : c.layers()) {
    if (l < 0 || l >= num_layers || !seen.insert(l).second)
      return Malformed(absl::StrCat("header layer ", l));
  }
  seen.clear();
  for (int h : c.heads()) {
    if (h < 0 || h >= num_heads || !seen.insert(h).second)
      return Malformed(absl::StrCat("header head ", h));
  }
  if (header.max_new_tokens() > 0)
    max_new_tokens = header.max_new_tokens();  // as the server resolved it
  if (header.prompt_token_ids_size() < 1 || header.prompt_token_ids_size() > kMaxPositions ||
      max_new_tokens < 0 || max_new_tokens > kMaxPositions) {
    return Malformed(absl::StrCat("a prompt of ", header.prompt_token_ids_size(), " tokens and ",
                                  max_new_tokens, " new tokens"));
  }
  if (c.element_type() != v1::ELEMENT_FLOAT32 && c.element_type() != v1::ELEMENT_FLOAT16 &&
      c.element_type() != v1::ELEMENT_BFLOAT16) {
    return Malformed(absl::StrCat("element type ", c.element_type()));
  }
  have_header_ = true;
  header_ = header;
  max_new_tokens_ = max_new_tokens;
  for (int l : c.layers()) header_layers_.insert(l);
  prompt_len_ = header.prompt_token_ids_size();
  heads_ = c.heads_size();
  bool prefill = false, decode = false;
  for (int p : c.phases()) prefill |= p == v1::PHASE_PREFILL, decode |= p == v1::PHASE_DECODE;
  // Full matrices are assembled only for the pickle layout; safetensors readers assemble them
  // from the blocks (attnscope.load does), which saves writing every value twice.
  assemble_ = format_ == SampleFormat::kPickle && c.form() == v1::FORM_DENSE &&
              c.last_queries() == 0 && c.query_ranges_size() == 0 && prefill;
  max_rows_ = prompt_len_ + (decode ? std::max<int64_t>(0, max_new_tokens_ - 1) : 0);
  if (format_ == SampleFormat::kPickle &&
      !assemble_) {  // the prototype's layout needs full matrices
    return absl::InvalidArgumentError(
        "--format pickle stores full matrices: it needs --form dense over every query row with the "
        "prefill phase");
  }
  data_ = std::fopen((path_ + ".data.partial").c_str(), "w+b");
  if (data_ == nullptr)
    return absl::PermissionDeniedError(absl::StrCat("cannot write beside ", path_));
  if (assemble_) {
    full_ = std::fopen((path_ + ".full.partial").c_str(), "w+b");
    if (full_ == nullptr)
      return absl::PermissionDeniedError(absl::StrCat("cannot write beside ", path_));
    for (int i = 0; i < c.layers_size(); ++i) layer_slot_[c.layers(i)] = i;
    // A sparse file: only the rows written take space.
    const int64_t size =
        static_cast<int64_t>(layer_slot_.size()) * heads_ * max_rows_ * max_rows_ * 4;
    if (ftruncate(fileno(full_), size) != 0)
      return absl::ResourceExhaustedError("cannot size the work file");
  }
  return absl::OkStatus();
}

absl::Status SampleWriter::Append(const std::string& name, const std::string& dtype,
                                  const std::vector<int64_t>& shape, const std::string& data,
                                  int64_t byte_offset, int64_t total_bytes) {
  auto it = entries_.find(name);
  if (it == entries_.end()) {
    if (byte_offset != 0) return Malformed(absl::StrCat("block ", name, " starts mid-way"));
    it = entries_.emplace(name, Entry{dtype, shape, data_size_, total_bytes}).first;
  }
  Entry& e = it->second;
  if (e.dtype != dtype || e.shape != shape || e.bytes != total_bytes) {
    return Malformed(
        absl::StrCat("chunks of block ", name, " disagree on its type, shape or size"));
  }
  if (e.offset + byte_offset != data_size_ || byte_offset != e.written) {
    return Malformed(absl::StrCat("chunks of block ", name, " arrived out of order or twice"));
  }
  if (static_cast<int64_t>(data.size()) > e.bytes - e.written) {
    return Malformed(absl::StrCat("block ", name, " has more data than its ", e.bytes, " bytes"));
  }
  e.written += static_cast<int64_t>(data.size());
  if (format_ == SampleFormat::kSafetensors && !data.empty() &&
      std::fwrite(data.data(), 1, data.size(), data_) != data.size()) {
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
    for (int64_t i = 0; i < len; ++i)
      run[i] = ToFloat(c.data().data() + (e - first + i) * elem, c.element_type());
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

absl::Status SampleWriter::CheckAttention(const v1::AttentionChunk& c) const {
  if (!have_header_) return Malformed("an attention chunk before the stream header");
  const auto& spec = header_.capture();
  if (!header_layers_.count(c.layer()))
    return Malformed(absl::StrCat("attention for layer ", c.layer(), ", not captured"));
  if (c.phase() != v1::PHASE_PREFILL && c.phase() != v1::PHASE_DECODE)
    return Malformed("an unknown phase");
  if (c.form() != spec.form() || c.element_type() != spec.element_type()) {
    return Malformed("a chunk whose form or element type differs from the header's");
  }
  const int64_t elem = ElementSize(c.element_type());
  ASSIGN_OR_RETURN(const int64_t elements, CheckedElements(c.shape(), 3, "an attention block"));
  const int64_t max_positions = prompt_len_ + max_new_tokens_;
  const int64_t rows = c.query_end() - c.query_begin();
  if (c.query_begin() < 0 || rows < 1 || c.query_end() > max_positions || c.key_length() < 1 ||
      c.key_length() > max_positions || c.step() < 0 || c.step() > max_new_tokens_) {
    return Malformed(absl::StrCat("rows [", c.query_begin(), ", ", c.query_end(), ") over ",
                                  c.key_length(), " keys at step ", c.step()));
  }
  // The shape each form gives a block of `rows` rows over `key_length` keys.
  const int64_t heads = heads_, keys = c.key_length();
  std::vector<int64_t> expected;
  switch (c.form()) {
    case v1::FORM_DENSE:
      expected = {heads, rows, keys};
      break;
    case v1::FORM_HEAD_MEAN:
    case v1::FORM_HEAD_MAX:
      expected = {1, rows, keys};
      break;
    case v1::FORM_POOLED:
      if (c.pool() < 1) return Malformed(absl::StrCat("pool ", c.pool()));
      expected = {heads, CeilDiv(rows, c.pool()), CeilDiv(keys, c.pool())};
      break;
    case v1::FORM_TOP_K:
      if (spec.top_k() < 1) return Malformed("a top_k block without k in the header");
      expected = {heads, rows, std::min<int64_t>(spec.top_k(), keys)};
      break;
    default:
      return Malformed(absl::StrCat("form ", c.form()));
  }
  if (!std::equal(expected.begin(), expected.end(), c.shape().begin())) {
    return Malformed(absl::StrCat("a ", v1::Form_Name(c.form()), " block of shape [",
                                  absl::StrJoin(c.shape(), ", "), "], expected [",
                                  absl::StrJoin(expected, ", "), "]"));
  }
  if (c.block_bytes() != elements * elem) {
    return Malformed(absl::StrCat("block_bytes ", c.block_bytes(), " for ", elements, " elements"));
  }
  const int64_t n = static_cast<int64_t>(c.data().size());
  if (c.byte_offset() < 0 || c.byte_offset() % elem != 0 || n % elem != 0 ||
      n > c.block_bytes() - c.byte_offset()) {
    return Malformed(absl::StrCat("a chunk of ", n, " bytes at offset ", c.byte_offset(), " of a ",
                                  c.block_bytes(), "-byte block"));
  }
  if (c.form() == v1::FORM_TOP_K) {
    if (static_cast<int64_t>(c.indices().size()) != n / elem * 4)
      return Malformed("top_k indices do not match values");
    for (size_t i = 0; i < c.indices().size(); i += 4) {
      int32_t index;
      std::memcpy(&index, c.indices().data() + i, 4);
      if (index < 0 || index >= keys)
        return Malformed(absl::StrCat("top_k index ", index, " outside the keys"));
    }
  } else if (!c.indices().empty()) {
    return Malformed("indices in a block that is not top_k");
  }
  return absl::OkStatus();
}

absl::Status SampleWriter::OnAttention(const v1::AttentionChunk& c) {
  RETURN_IF_ERROR(CheckAttention(c));
  bytes_received_ += static_cast<int64_t>(c.data().size() + c.indices().size());
  const std::string name = absl::StrCat("attention.", PhaseName(c.phase()), ".", c.layer(), ".",
                                        c.step(), ".", c.query_begin());
  std::vector<int64_t> shape(c.shape().begin(), c.shape().end());
  const int elem = ElementSize(c.element_type());
  // Every block is tracked (whole, in order) in both formats; only safetensors stores its bytes.
  RETURN_IF_ERROR(
      Append(name, DType(c.element_type()), shape, c.data(), c.byte_offset(), c.block_bytes()));
  if (!c.indices().empty()) {
    RETURN_IF_ERROR(Append(name + ".indices", "I32", shape, c.indices(), c.byte_offset() / elem * 4,
                           c.block_bytes() / elem * 4));
  }
  if (assemble_ && c.form() == v1::FORM_DENSE) return WriteFull(c);
  return absl::OkStatus();
}

absl::Status SampleWriter::OnStatistic(const v1::StatisticChunk& s) {
  if (!have_header_) return Malformed("a statistic chunk before the stream header");
  if (!header_layers_.count(s.layer()))
    return Malformed(absl::StrCat("a statistic for layer ", s.layer(), ", not captured"));
  if (s.phase() != v1::PHASE_PREFILL && s.phase() != v1::PHASE_DECODE)
    return Malformed("an unknown phase");
  if (s.kind().empty() || s.kind().size() > 64 ||
      !std::all_of(s.kind().begin(), s.kind().end(), [](char ch) {
        return std::isalnum(static_cast<unsigned char>(ch)) || ch == '_';
      })) {
    return Malformed("a statistic kind that is not a plain name");
  }
  if (s.step() < 0 || s.step() > max_new_tokens_ || s.query_begin() < 0 ||
      s.query_begin() > prompt_len_ + max_new_tokens_) {
    return Malformed(absl::StrCat("a statistic at step ", s.step(), " row ", s.query_begin()));
  }
  ASSIGN_OR_RETURN(const int64_t elements,
                   CheckedElements(s.shape(), s.shape_size() == 1 ? 1 : 2, "a statistic"));
  const int64_t n = static_cast<int64_t>(s.data().size());
  const int64_t total = s.block_bytes() > 0 ? s.block_bytes() : n;
  if (total != elements * 4 || s.byte_offset() < 0 || s.byte_offset() % 4 != 0 || n % 4 != 0 ||
      n > total - s.byte_offset()) {
    return Malformed(absl::StrCat("a statistic chunk of ", n, " bytes at offset ", s.byte_offset(),
                                  " of a ", total, "-byte block of ", elements, " values"));
  }
  bytes_received_ += n;
  if (format_ != SampleFormat::kSafetensors) return absl::OkStatus();
  const std::string name = absl::StrCat("statistic.", s.kind(), ".", PhaseName(s.phase()), ".",
                                        s.layer(), ".", s.step(), ".", s.query_begin());
  return Append(name, "F32", {s.shape().begin(), s.shape().end()}, s.data(), s.byte_offset(),
                total);
}

absl::Status SampleWriter::OnToken(const v1::TokenEvent& token) {
  if (!have_header_) return Malformed("a token before the stream header");
  if (static_cast<int64_t>(tokens_.size()) >= max_new_tokens_) {
    return Malformed(absl::StrCat("more than the ", max_new_tokens_, " tokens asked for"));
  }
  tokens_.push_back(token);
  return absl::OkStatus();
}

absl::Status SampleWriter::WriteSafetensors(const std::string& tmp, const std::string& metadata) {
  const int64_t T = std::min<int64_t>(max_rows_, prompt_len_ + std::max<int64_t>(0, tokens() - 1));
  std::vector<int64_t> prompt_ids(header_.prompt_token_ids().begin(),
                                  header_.prompt_token_ids().end());
  std::vector<int64_t> token_ids;
  for (const auto& t : tokens_) token_ids.push_back(t.id());
  // Layout: blocks (already in the data work file), then full matrices, then the id lists.
  nlohmann::ordered_json header;
  header["__metadata__"] = {{"attnscope", metadata}, {"format", "pt"}};
  for (const auto& [name, e] : entries_) {
    header[name] = {
        {"dtype", e.dtype}, {"shape", e.shape}, {"data_offsets", {e.offset, e.offset + e.bytes}}};
  }
  int64_t offset = data_size_;
  if (assemble_) {
    for (const auto& [layer, slot] : layer_slot_) {
      const int64_t n = heads_ * T * T * 4;
      header[absl::StrCat("layer.", layer)] = {
          {"dtype", "F32"}, {"shape", {heads_, T, T}}, {"data_offsets", {offset, offset + n}}};
      offset += n;
    }
  }
  header["prompt_token_ids"] = {{"dtype", "I64"},
                                {"shape", {prompt_ids.size()}},
                                {"data_offsets", {offset, offset + 8 * prompt_ids.size()}}};
  offset += 8 * prompt_ids.size();
  header["token_ids"] = {{"dtype", "I64"},
                         {"shape", {token_ids.size()}},
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
          s = CopyRange(full_, ((slot * heads_ + h) * max_rows_ + r) * max_rows_ * 4, T * 4, out,
                        tmp);
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
  for (const auto& [layer, layer_slot] : layer_slot_) {
    const int64_t slot = layer_slot;  // (C++17 lambdas cannot capture structured bindings)
    p.Int(layer);
    p.Byte('}');
    p.Byte('(');
    p.Str("shape");
    p.IntList({1, heads_, T, T});
    p.Str("tensor");
    p.Float32Array({1, heads_, T, T}, static_cast<uint64_t>(heads_ * T * T * 4), [&] {
      for (int64_t h = 0; h < heads_ && s.ok(); ++h) {
        for (int64_t r = 0; r < T && s.ok(); ++r) {
          s = CopyRange(full_, ((slot * heads_ + h) * max_rows_ + r) * max_rows_ * 4, T * 4, out,
                        tmp);
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

absl::Status SampleWriter::Finish(const v1::StreamTrailer& trailer,
                                  const std::string& prompt_text) {
  if (!have_header_) return Malformed("the stream ended without a header");
  for (const auto& [name, e] : entries_) {
    if (e.written != e.bytes) {
      return Malformed(
          absl::StrCat("block ", name, " is incomplete: ", e.written, " of ", e.bytes, " bytes"));
    }
  }
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
      {"timings",
       {{"prefill_ms", trailer.timings().prefill_ms()},
        {"decode_ms", trailer.timings().decode_ms()}}},
      {"num_layers", header_.model().num_layers()},
      {"num_heads", header_.model().num_heads()},
      {"capture",
       {{"layers", header_.capture().layers()},
        {"heads", header_.capture().heads()},
        {"form", v1::Form_Name(header_.capture().form())},
        {"element_type", v1::ElementType_Name(header_.capture().element_type())},
        {"pool", header_.capture().pool()},
        {"top_k", header_.capture().top_k()},
        {"last_queries", header_.capture().last_queries()}}},
  };
  std::vector<std::string> pieces;
  for (const auto& t : tokens_) pieces.push_back(t.piece());
  meta["token_pieces"] = pieces;
  const std::string tmp = path_ + ".partial";
  absl::Status s = format_ == SampleFormat::kPickle
                       ? WritePickle(tmp)
                       : WriteSafetensors(tmp, meta.dump(-1, ' ', false,
                                                         nlohmann::json::error_handler_t::replace));
  if (!s.ok()) return s;
  if (std::rename(tmp.c_str(), path_.c_str()) != 0) {
    return absl::PermissionDeniedError(absl::StrCat("cannot rename ", tmp, " to ", path_));
  }
  finished_ = true;
  return absl::OkStatus();
}

}  // namespace attnscope
