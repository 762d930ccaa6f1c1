#include "samples/sample_writer.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <functional>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/atomic_file.h"
#include "core/files.h"
#include "core/half.h"
#include "core/safetensors_writer.h"
#include "core/status_macros.h"
#include "google/protobuf/util/json_util.h"
#include "proto/contract.h"
#include "samples/pickle_writer.h"

namespace attnscope {
namespace {

// The resolved capture spec as the file stores it, once: the proto's JSON mapping with its field
// names and every field (defaults too), so that a reader needs no knowledge of proto defaults.
// Python's StreamResult.metadata() writes the same (json_format, same options).
nlohmann::json CaptureJson(const v1::CaptureSpec& capture) {
  google::protobuf::util::JsonPrintOptions options;
  options.always_print_primitive_fields = true;
  options.preserve_proto_field_names = true;
  std::string text;
  if (!google::protobuf::util::MessageToJsonString(capture, &text, options).ok()) return nullptr;
  return nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
}

float ToFloat(const char* p, ElementType t) {
  if (t == ElementType::kFloat32) {
    float f;
    std::memcpy(&f, p, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, p, 2);
  return t == ElementType::kFloat16 ? HalfToFloat(h) : BFloat16ToFloat(h);
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
absl::StatusOr<int64_t> CheckedElements(const std::vector<int64_t>& shape, size_t rank,
                                        const std::string& what) {
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

absl::Status CopyRange(std::FILE* from, int64_t offset, int64_t n, std::FILE* to,
                       std::vector<char>* buf) {
  buf->resize(1 << 20);
  while (n > 0) {
    const size_t k = static_cast<size_t>(std::min<int64_t>(n, buf->size()));
    if (pread(fileno(from), buf->data(), k, offset) != static_cast<ssize_t>(k))
      return absl::DataLossError("cannot read back a work file");
    if (std::fwrite(buf->data(), 1, k, to) != k)
      return absl::DataLossError("short write (disk full?)");
    offset += k;
    n -= k;
  }
  return absl::OkStatus();
}

}  // namespace

SampleWriter::SampleWriter(std::string path, SampleFormat format, bool replace)
    : path_(std::move(path)), format_(format), replace_(replace) {}

SampleWriter::~SampleWriter() {
  if (data_ != nullptr) std::fclose(data_);
  // pickle_file_ removes its work file unless it was published.
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
  auto spec = ToCaptureSpec(c);
  if (!spec.ok()) return Malformed(absl::StrCat("the header's capture: ", spec.status().message()));
  spec_ = *spec;
  std::set<int64_t> seen;
  for (int64_t l : spec_.layers) {
    if (l < 0 || l >= num_layers || !seen.insert(l).second)
      return Malformed(absl::StrCat("header layer ", l));
  }
  seen.clear();
  for (int64_t h : spec_.heads) {
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
  have_header_ = true;
  header_ = header;
  max_new_tokens_ = max_new_tokens;
  header_layers_.insert(spec_.layers.begin(), spec_.layers.end());
  prompt_len_ = header.prompt_token_ids_size();
  heads_ = static_cast<int64_t>(spec_.heads.size());
  // Full matrices are assembled only for the pickle layout; safetensors readers assemble them
  // from the blocks (attnscope.load does), which saves writing every value twice.
  assemble_ = format_ == SampleFormat::kPickle && spec_.form == Form::kDense &&
              spec_.last_queries == 0 && spec_.query_ranges.empty() && spec_.prefill;
  max_rows_ = prompt_len_ + (spec_.decode ? std::max<int64_t>(0, max_new_tokens_ - 1) : 0);
  if (format_ == SampleFormat::kPickle && !assemble_) {
    return absl::InvalidArgumentError(
        "--format pickle stores full matrices: it needs --form dense over every query row with the "
        "prefill phase");
  }
  // Blocks wait in a file without a name (nothing another user plants can be written through).
  ASSIGN_OR_RETURN(data_, CreateScratchFile(DirectoryOf(path_)));
  if (assemble_) {
    for (size_t i = 0; i < spec_.layers.size(); ++i) layer_slot_[spec_.layers[i]] = i;
    const double bytes = static_cast<double>(layer_slot_.size()) * heads_ * 4.0 *
                         static_cast<double>(max_rows_) * static_cast<double>(max_rows_);
    if (bytes > 1e15) {
      return absl::ResourceExhaustedError(
          absl::StrCat("the pickle would hold ", bytes / 1e12, " TB of full matrices"));
    }
    const PrototypePickleLayout layout{static_cast<int64_t>(layer_slot_.size()), heads_, max_rows_};
    ASSIGN_OR_RETURN(pickle_file_, AtomicFile::Create(path_));
    // The space is reserved now: a full disk is an error here, not after the generation. Whatever
    // is never written reads as zeros.
    if (const int err = posix_fallocate(pickle_file_->fd(), 0, layout.FileSize()); err != 0) {
      return absl::ResourceExhaustedError(absl::StrCat("cannot reserve ", layout.FileSize(),
                                                       " bytes for ", pickle_file_->work_path(),
                                                       ": ", std::strerror(err)));
    }
  }
  return absl::OkStatus();
}

absl::Status SampleWriter::Append(const std::string& name, const std::string& dtype,
                                  const std::vector<int64_t>& shape, absl::string_view data,
                                  int64_t byte_offset, int64_t total_bytes) {
  auto it = entry_of_.find(name);
  if (it == entry_of_.end()) {
    if (byte_offset != 0) return Malformed(absl::StrCat("block ", name, " starts mid-way"));
    it = entry_of_.emplace(name, entries_.size()).first;
    entries_.push_back(Entry{{name, dtype, shape, data_size_, total_bytes}});
  }
  Entry& entry = entries_[it->second];
  const SafetensorsEntry& e = entry.tensor;
  if (e.dtype != dtype || e.shape != shape || e.bytes != total_bytes) {
    return Malformed(
        absl::StrCat("chunks of block ", name, " disagree on its type, shape or size"));
  }
  if (e.offset + byte_offset != data_size_ || byte_offset != entry.written) {
    return Malformed(absl::StrCat("chunks of block ", name, " arrived out of order or twice"));
  }
  if (static_cast<int64_t>(data.size()) > e.bytes - entry.written) {
    return Malformed(absl::StrCat("block ", name, " has more data than its ", e.bytes, " bytes"));
  }
  entry.written += static_cast<int64_t>(data.size());
  if (format_ == SampleFormat::kSafetensors && !data.empty() &&
      std::fwrite(data.data(), 1, data.size(), data_) != data.size()) {
    return absl::DataLossError(
        absl::StrCat("cannot write the work file beside ", path_, " (disk full?)"));
  }
  data_size_ += static_cast<int64_t>(data.size());
  return absl::OkStatus();
}

absl::Status SampleWriter::WriteFull(const BlockHeader& h, absl::string_view data,
                                     int64_t byte_offset) {
  // Block values are [heads, rows, keys] row-major; this chunk holds elements [first, first + n).
  // They go to their place in the pickle, converted to float32; a row's last keys bring the zeros
  // after them, so consecutive rows of a head are one run of bytes in the file.
  const int64_t elem = ElementSize(h.element_type);
  const int64_t rows = h.shape[1], keys = h.shape[2];
  const int64_t first = byte_offset / elem;
  const int64_t n = static_cast<int64_t>(data.size()) / elem;
  const PrototypePickleLayout layout{static_cast<int64_t>(layer_slot_.size()), heads_, max_rows_};
  const int64_t base = layout.DataOffset(static_cast<int64_t>(layer_slot_.at(h.layer)));
  for (int64_t e = first; e < first + n;) {
    const int64_t head = e / (rows * keys), r = (e / keys) % rows, k = e % keys;
    const int64_t len = std::min(keys - k, first + n - e);
    const int64_t row = h.query_begin + r;
    if (row >= max_rows_ || k + len > max_rows_) {
      return Malformed(
          absl::StrCat("row ", row, " beyond the ", max_rows_, " rows of the matrices"));
    }
    const int64_t zeros = k + len == keys ? max_rows_ - keys : 0;
    RETURN_IF_ERROR(Stage(base + ((head * max_rows_ + row) * max_rows_ + k) * 4,
                          data.data() + (e - first) * elem, len, h.element_type, zeros));
    e += len;
  }
  return absl::OkStatus();
}

absl::Status SampleWriter::Stage(int64_t file_offset, const char* src, int64_t count,
                                 ElementType type, int64_t zeros) {
  constexpr int64_t kStageBytes = int64_t{4} << 20;
  if (stage_ == nullptr) stage_ = std::make_unique<char[]>(kStageBytes);
  const int64_t elem = ElementSize(type);
  while (count + zeros > 0) {
    if (stage_bytes_ > 0 &&
        (file_offset != stage_offset_ + stage_bytes_ || stage_bytes_ == kStageBytes)) {
      RETURN_IF_ERROR(FlushStage());
    }
    if (stage_bytes_ == 0) stage_offset_ = file_offset;
    char* dst = stage_.get() + stage_bytes_;
    const int64_t room = (kStageBytes - stage_bytes_) / 4;
    const int64_t c = std::min(count, room);
    if (type == ElementType::kFloat32) {
      std::memcpy(dst, src, static_cast<size_t>(c) * 4);
    } else {
      for (int64_t i = 0; i < c; ++i) {
        const float f = ToFloat(src + i * elem, type);
        std::memcpy(dst + i * 4, &f, 4);
      }
    }
    const int64_t z = std::min(zeros, room - c);
    std::memset(dst + c * 4, 0, static_cast<size_t>(z) * 4);
    src += c * elem;
    count -= c;
    zeros -= z;
    file_offset += (c + z) * 4;
    stage_bytes_ += (c + z) * 4;
  }
  return absl::OkStatus();
}

absl::Status SampleWriter::FlushStage() {
  if (stage_bytes_ == 0) return absl::OkStatus();
  RETURN_IF_ERROR(PickleWrite(stage_offset_, stage_.get(), stage_bytes_));
  stage_bytes_ = 0;
  return absl::OkStatus();
}

absl::Status SampleWriter::PickleWrite(int64_t file_offset, const char* data, int64_t bytes) {
  while (bytes > 0) {
    const ssize_t w = pwrite(pickle_file_->fd(), data, static_cast<size_t>(bytes), file_offset);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      return absl::DataLossError(absl::StrCat("cannot write ", pickle_file_->work_path(), ": ",
                                              w < 0 ? std::strerror(errno) : "no progress"));
    }
    data += w;
    bytes -= w;
    file_offset += w;
  }
  return absl::OkStatus();
}

absl::Status SampleWriter::CheckBlock(const BlockHeader& h, int64_t block_bytes,
                                      int64_t byte_offset, int64_t data_bytes) const {
  const bool attention = h.kind == BlockKind::kAttention;
  const char* what = attention ? "an attention block" : "a statistic";
  if (!have_header_) return Malformed(absl::StrCat(what, " before the stream header"));
  if (!header_layers_.count(h.layer))
    return Malformed(absl::StrCat(what, " for layer ", h.layer, ", not captured"));
  const int64_t max_positions = prompt_len_ + max_new_tokens_;
  const int64_t rows = h.query_end - h.query_begin;
  if (h.query_begin < 0 || rows < (attention ? 1 : 0) || h.query_end > max_positions ||
      h.key_length < 0 || h.key_length > max_positions || h.step < 0 || h.step > max_new_tokens_) {
    return Malformed(absl::StrCat(what, " of rows [", h.query_begin, ", ", h.query_end, ") over ",
                                  h.key_length, " keys at step ", h.step));
  }
  std::vector<int64_t> expected;
  if (attention) {
    if (h.form != spec_.form || h.element_type != spec_.element_type)
      return Malformed("a chunk whose form or element type differs from the header's");
    if (h.form == Form::kNone) return Malformed("an attention block of form none");
    if (h.form == Form::kPooled && h.pool < 1) return Malformed(absl::StrCat("pool ", h.pool));
    if (h.form == Form::kTopK && spec_.top_k < 1)
      return Malformed("a top_k block without k in the header");
    if (h.key_length < 1) return Malformed("an attention block over no keys");
    const auto s = BlockShape(h.form, heads_, rows, h.key_length, h.pool, spec_.top_k);
    expected.assign(s.begin(), s.end());
  } else {
    // Row statistics: [heads, rows]; key statistics come with rows [0, prompt).
    expected = {heads_, rows};
  }
  ASSIGN_OR_RETURN(const int64_t elements, CheckedElements(h.shape, expected.size(), what));
  if (h.shape != expected) {
    return Malformed(absl::StrCat(what, " of shape [", absl::StrJoin(h.shape, ", "),
                                  "], expected [", absl::StrJoin(expected, ", "), "]"));
  }
  const int64_t elem = ElementSize(h.element_type);
  if (block_bytes != elements * elem) {
    return Malformed(absl::StrCat("block_bytes ", block_bytes, " for ", elements, " elements"));
  }
  if (byte_offset < 0 || byte_offset % elem != 0 || data_bytes % elem != 0 ||
      data_bytes > block_bytes - byte_offset) {
    return Malformed(absl::StrCat("a chunk of ", data_bytes, " bytes at offset ", byte_offset,
                                  " of a ", block_bytes, "-byte block"));
  }
  return absl::OkStatus();
}

absl::Status SampleWriter::OnChunk(const BlockHeader& h, absl::string_view data,
                                   absl::string_view indices, int64_t byte_offset,
                                   int64_t block_bytes) {
  const int64_t n = static_cast<int64_t>(data.size());
  RETURN_IF_ERROR(CheckBlock(h, block_bytes, byte_offset, n));
  const int64_t elem = ElementSize(h.element_type);
  if (h.has_indices()) {
    if (static_cast<int64_t>(indices.size()) != n / elem * 4)
      return Malformed("top_k indices do not match values");
    for (size_t i = 0; i < indices.size(); i += 4) {
      int32_t index;
      std::memcpy(&index, indices.data() + i, 4);
      if (index < 0 || index >= h.key_length)
        return Malformed(absl::StrCat("top_k index ", index, " outside the keys"));
    }
  } else if (!indices.empty()) {
    return Malformed("indices in a block that is not top_k");
  }
  bytes_received_ += n + static_cast<int64_t>(indices.size());
  // Every block is tracked (whole, in order) in both formats; only safetensors stores its bytes.
  const std::string name = BlockName(h);
  RETURN_IF_ERROR(Append(name, RowOf(kElementTypes, h.element_type).dtype, h.shape, data,
                         byte_offset, block_bytes));
  if (h.has_indices()) {
    RETURN_IF_ERROR(Append(IndexName(h), "I32", h.shape, indices, byte_offset / elem * 4,
                           block_bytes / elem * 4));
  }
  if (assemble_ && h.kind == BlockKind::kAttention) return WriteFull(h, data, byte_offset);
  return absl::OkStatus();
}

absl::Status SampleWriter::OnAttention(const v1::AttentionChunk& c) {
  return OnAttention(c, c.data(), c.indices());
}

absl::Status SampleWriter::OnAttention(const v1::AttentionChunk& c, absl::string_view values,
                                       absl::string_view indices) {
  if (!have_header_) return Malformed("an attention chunk before the stream header");
  ASSIGN_OR_RETURN(const BlockHeader h, BlockHeaderOf(c));
  return OnChunk(h, values, indices, c.byte_offset(), c.block_bytes());
}

absl::Status SampleWriter::OnStatistic(const v1::StatisticChunk& s) {
  if (!have_header_) return Malformed("a statistic chunk before the stream header");
  ASSIGN_OR_RETURN(const BlockHeader h, BlockHeaderOf(s));
  // block_bytes 0: a server that sends whole blocks only (Generate's layout).
  const int64_t total =
      s.block_bytes() > 0 ? s.block_bytes() : static_cast<int64_t>(s.data().size());
  return OnChunk(h, s.data(), absl::string_view(), s.byte_offset(), total);
}

absl::Status SampleWriter::OnToken(const v1::TokenEvent& token) {
  if (!have_header_) return Malformed("a token before the stream header");
  if (static_cast<int64_t>(tokens_.size()) >= max_new_tokens_) {
    return Malformed(absl::StrCat("more than the ", max_new_tokens_, " tokens asked for"));
  }
  tokens_.push_back(token);
  return absl::OkStatus();
}

absl::Status SampleWriter::WriteSafetensors(const std::string& metadata) {
  SafetensorsWriter w;
  w.SetMetadata("attnscope", metadata);
  w.SetMetadata("format", "pt");
  // Blocks, in the order they arrived (= their order in the data work file), copied in one pass.
  for (const Entry& e : entries_)
    w.Declare(e.tensor.name, e.tensor.dtype, e.tensor.shape, e.tensor.bytes);
  std::fflush(data_);
  w.AddSource(data_size_, [this](std::FILE* out) {
    std::vector<char> buf;
    return CopyRange(data_, 0, data_size_, out, &buf);
  });
  std::vector<int64_t> prompt_ids(header_.prompt_token_ids().begin(),
                                  header_.prompt_token_ids().end());
  std::vector<int64_t> token_ids;
  for (const auto& t : tokens_) token_ids.push_back(t.id());
  w.Add("prompt_token_ids", "I64", {static_cast<int64_t>(prompt_ids.size())}, prompt_ids.data(),
        8 * prompt_ids.size());
  w.Add("token_ids", "I64", {static_cast<int64_t>(token_ids.size())}, token_ids.data(),
        8 * token_ids.size());
  return w.Write(path_, replace_);
}

absl::Status SampleWriter::WritePickle() {
  RETURN_IF_ERROR(FlushStage());
  const int64_t T = std::min<int64_t>(max_rows_, prompt_len_ + std::max<int64_t>(0, tokens() - 1));
  const int64_t layers = static_cast<int64_t>(layer_slot_.size());
  const PrototypePickleLayout full{layers, heads_, max_rows_}, final_layout{layers, heads_, T};
  // A generation shorter than max_new_tokens: rows move to their final, lower offsets, a batch of
  // one head's rows at a time, in order (a batch's destination ends before the next batch's
  // source begins, and its own source is read before it is written).
  if (T < max_rows_) {
    const int64_t batch_rows = std::max<int64_t>(1, (int64_t{4} << 20) / (max_rows_ * 4));
    std::vector<char> in, out;
    for (int64_t slot = 0; slot < layers; ++slot) {
      for (int64_t h = 0; h < heads_; ++h) {
        for (int64_t r0 = 0; r0 < T; r0 += batch_rows) {
          const int64_t m = std::min(batch_rows, T - r0);
          in.resize(static_cast<size_t>(m * max_rows_ * 4));
          out.resize(static_cast<size_t>(m * T * 4));
          const int64_t from = full.DataOffset(slot) + (h * max_rows_ + r0) * max_rows_ * 4;
          for (int64_t got = 0; got < static_cast<int64_t>(in.size());) {
            const ssize_t n =
                pread(pickle_file_->fd(), in.data() + got, in.size() - got, from + got);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) {
              return absl::DataLossError(
                  absl::StrCat("cannot read back ", pickle_file_->work_path()));
            }
            got += n;
          }
          for (int64_t i = 0; i < m; ++i) {
            std::memcpy(out.data() + i * T * 4, in.data() + i * max_rows_ * 4,
                        static_cast<size_t>(T) * 4);
          }
          RETURN_IF_ERROR(PickleWrite(final_layout.DataOffset(slot) + (h * T + r0) * T * 4,
                                      out.data(), static_cast<int64_t>(out.size())));
        }
      }
    }
  }
  const std::string preamble = PrototypePickleLayout::Preamble();
  const std::string tail = PrototypePickleLayout::Tail();
  RETURN_IF_ERROR(PickleWrite(0, preamble.data(), static_cast<int64_t>(preamble.size())));
  int64_t slot = 0;
  for (const auto& [layer, unused] : layer_slot_) {
    const std::string head = final_layout.Head(layer);
    const int64_t data = final_layout.DataOffset(slot++);
    RETURN_IF_ERROR(PickleWrite(data - static_cast<int64_t>(head.size()), head.data(),
                                static_cast<int64_t>(head.size())));
    RETURN_IF_ERROR(PickleWrite(data + final_layout.data_bytes(), tail.data(),
                                static_cast<int64_t>(tail.size())));
  }
  const std::string end = PrototypePickleLayout::End();
  RETURN_IF_ERROR(PickleWrite(final_layout.FileSize() - static_cast<int64_t>(end.size()),
                              end.data(), static_cast<int64_t>(end.size())));
  if (ftruncate(pickle_file_->fd(), final_layout.FileSize()) != 0)
    return absl::DataLossError(absl::StrCat("cannot size ", pickle_file_->work_path()));
  return pickle_file_->Publish(replace_);  // fsync first
}

absl::Status SampleWriter::OnDivergence(const v1::DivergenceEvent& event) {
  if (!have_header_) return Malformed("a divergence event before the header");
  const int64_t cells = int64_t{header_.model().num_layers()} * header_.model().num_heads();
  if (event.lost_mass_size() != 0 && event.lost_mass_size() != cells) {
    return Malformed(absl::StrCat("a divergence event with ", event.lost_mass_size(),
                                  " lost-mass values for ", cells, " (layer, head) pairs"));
  }
  if (static_cast<int64_t>(divergence_.size()) >= max_rows_) {
    return Malformed("more divergence events than generated steps");
  }
  divergence_.push_back(event);
  return absl::OkStatus();
}

absl::Status SampleWriter::OnKvDecision(const v1::KvDecisionEvent& event) {
  if (!have_header_) return Malformed("a KV decision before the header");
  if (event.layer() < 0 || event.layer() >= header_.model().num_layers() ||
      static_cast<int64_t>(kv_decisions_.size()) >= int64_t{64} * header_.model().num_layers()) {
    return Malformed(absl::StrCat("a KV decision for layer ", event.layer()));
  }
  kv_decisions_.push_back(event);
  return absl::OkStatus();
}

absl::Status SampleWriter::Finish(const v1::StreamTrailer& trailer,
                                  const std::string& prompt_text) {
  if (!have_header_) return Malformed("the stream ended without a header");
  for (const Entry& e : entries_) {
    if (e.written != e.tensor.bytes) {
      return Malformed(absl::StrCat("block ", e.tensor.name, " is incomplete: ", e.written, " of ",
                                    e.tensor.bytes, " bytes"));
    }
  }
  nlohmann::json meta = {
      {"format_version", kSampleFormatVersion},
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
      {"capture", CaptureJson(header_.capture())},
  };
  std::vector<std::string> pieces;
  for (const auto& t : tokens_) pieces.push_back(t.piece());
  meta["token_pieces"] = pieces;
  if (!divergence_.empty()) {
    nlohmann::json steps = nlohmann::json::array();
    for (const auto& d : divergence_) {
      steps.push_back({{"step", d.step()},
                       {"kl", d.kl()},
                       {"top1_agree", d.top1_agree()},
                       {"rank", d.rank()},
                       {"token", d.token()},
                       {"logprob_full", d.logprob_full()},
                       {"logprob_intervened", d.logprob_intervened()},
                       {"lost_mass", d.lost_mass()}});
    }
    meta["divergence"] = std::move(steps);
  }
  if (!kv_decisions_.empty()) {
    nlohmann::json decisions = nlohmann::json::array();
    for (const auto& k : kv_decisions_) {
      // The kept bits as hex, numpy's packbits(bitorder="little") of [kv_heads, keys].
      std::string hex;
      static const char kDigits[] = "0123456789abcdef";
      for (unsigned char byte : k.kept()) {
        hex += kDigits[byte >> 4];
        hex += kDigits[byte & 15];
      }
      decisions.push_back({{"step", k.step()},
                           {"layer", k.layer()},
                           {"keys", k.keys()},
                           {"kv_heads", k.kv_heads()},
                           {"kept", hex},
                           {"kept_per_head", k.kept_per_head()},
                           {"bytes_freed", k.bytes_freed()},
                           {"cache_bytes", k.cache_bytes()}});
    }
    meta["kv_decisions"] = std::move(decisions);
  }
  absl::Status s =
      format_ == SampleFormat::kPickle
          ? WritePickle()
          : WriteSafetensors(meta.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
  if (!s.ok()) return s;
  finished_ = true;
  return absl::OkStatus();
}

absl::Status CheckStoredSample(const std::string& path, SampleFormat format) {
  struct stat st {};
  ASSIGN_OR_RETURN(const int fd, OpenRegularFile(path, &st));
  const int64_t size = st.st_size;
  auto read_at = [&](int64_t offset, int64_t n) -> absl::StatusOr<std::string> {
    std::string out(static_cast<size_t>(n), '\0');
    if (n < 0 || offset < 0 || offset + n > size ||
        pread(fd, out.data(), static_cast<size_t>(n), offset) != static_cast<ssize_t>(n))
      return absl::DataLossError(absl::StrCat(path, " is shorter than its contents say"));
    return out;
  };
  auto check = [&]() -> absl::Status {
    if (format == SampleFormat::kPickle) {
      const std::string preamble = PrototypePickleLayout::Preamble();
      const std::string end = PrototypePickleLayout::End();
      ASSIGN_OR_RETURN(const std::string first, read_at(0, static_cast<int64_t>(preamble.size())));
      ASSIGN_OR_RETURN(const std::string last, read_at(size - static_cast<int64_t>(end.size()),
                                                       static_cast<int64_t>(end.size())));
      if (first != preamble || last != end)
        return absl::DataLossError(absl::StrCat(path, " is not a whole sample pickle"));
      return absl::OkStatus();
    }
    ASSIGN_OR_RETURN(const std::string len_bytes, read_at(0, 8));
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(len_bytes[i]);
    constexpr uint64_t kMaxHeaderBytes = uint64_t{100} << 20;
    if (n > kMaxHeaderBytes || static_cast<int64_t>(n) > size - 8)
      return absl::DataLossError(absl::StrCat(path, ": a header of ", n, " bytes in ", size));
    ASSIGN_OR_RETURN(const std::string text, read_at(8, static_cast<int64_t>(n)));
    const nlohmann::json header = nlohmann::json::parse(text, nullptr, false);
    if (header.is_discarded() || !header.is_object())
      return absl::DataLossError(absl::StrCat(path, ": the header is not a JSON object"));
    const auto meta = header.find("__metadata__");
    if (meta == header.end() || !meta->is_object() || !meta->contains("attnscope"))
      return absl::DataLossError(absl::StrCat(path, " holds no attnscope metadata"));
    int64_t end = 0;
    for (const auto& [name, entry] : header.items()) {
      if (name == "__metadata__") continue;
      const auto offsets = entry.is_object() ? entry.find("data_offsets") : entry.end();
      if (!entry.is_object() || offsets == entry.end() || !offsets->is_array() ||
          offsets->size() != 2 || !(*offsets)[1].is_number_unsigned())
        return absl::DataLossError(absl::StrCat(path, ": tensor ", name, " has no data_offsets"));
      // Compared as unsigned with what the file can hold: no claimed offset overflows the sum.
      const uint64_t claimed = (*offsets)[1].get<uint64_t>();
      if (claimed > static_cast<uint64_t>(size))
        return absl::DataLossError(absl::StrCat(path, ": tensor ", name, " ends past the file"));
      end = std::max(end, static_cast<int64_t>(claimed));
    }
    if (8 + static_cast<int64_t>(n) + end != size) {
      return absl::DataLossError(absl::StrCat(path, " has ", size,
                                              " bytes; its header accounts for ",
                                              8 + static_cast<int64_t>(n) + end));
    }
    return absl::OkStatus();
  };
  absl::Status s = check();
  close(fd);
  return s;
}

absl::StatusOr<std::vector<std::string>> StoredSampleDifferences(const std::string& path,
                                                                 SampleFormat format,
                                                                 const SampleSettings& asked) {
  std::vector<std::string> out;
  if (format == SampleFormat::kPickle) return out;
  // The header only (CheckStoredSample has bounded it), never the data.
  struct stat st {};
  ASSIGN_OR_RETURN(const int fd, OpenRegularFile(path, &st));
  auto read_header = [&]() -> absl::StatusOr<nlohmann::json> {
    unsigned char len[8];
    if (pread(fd, len, 8, 0) != 8) return absl::DataLossError(absl::StrCat(path, " is too short"));
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | len[i];
    constexpr uint64_t kMaxHeaderBytes = uint64_t{100} << 20;
    if (n > kMaxHeaderBytes || static_cast<int64_t>(n) > st.st_size - 8)
      return absl::DataLossError(absl::StrCat(path, ": a header of ", n, " bytes"));
    std::string text(static_cast<size_t>(n), '\0');
    if (pread(fd, text.data(), text.size(), 8) != static_cast<ssize_t>(n))
      return absl::DataLossError(absl::StrCat(path, " is shorter than its header"));
    nlohmann::json header = nlohmann::json::parse(text, nullptr, false);
    const auto meta = header.is_object() ? header.find("__metadata__") : header.end();
    if (meta == header.end() || !meta->is_object() || !meta->contains("attnscope") ||
        !(*meta)["attnscope"].is_string())
      return absl::DataLossError(absl::StrCat(path, " holds no attnscope metadata"));
    nlohmann::json m =
        nlohmann::json::parse((*meta)["attnscope"].get<std::string>(), nullptr, false);
    if (!m.is_object())
      return absl::DataLossError(absl::StrCat(path, ": its attnscope metadata is not an object"));
    return m;
  };
  absl::StatusOr<nlohmann::json> read = read_header();
  close(fd);
  if (!read.ok()) return read.status();
  const nlohmann::json& m = *read;
  auto shown = [](const nlohmann::json& v) {
    std::string text = v.is_string() ? v.get<std::string>() : v.dump();
    constexpr size_t kShown = 60;
    if (text.size() > kShown) text = text.substr(0, kShown) + "...";
    return text;
  };
  auto field = [&](const char* key) { return m.contains(key) ? m[key] : nlohmann::json(); };
  if (!asked.model.empty() && field("model") != asked.model)
    out.push_back(absl::StrCat("model: stored ", shown(field("model")), ", asked ", asked.model));
  if (!asked.is_ids && field("prompt") != asked.prompt_text) {
    out.push_back(absl::StrCat("prompt: stored \"", shown(field("prompt")), "\", asked \"",
                               shown(asked.prompt_text), "\""));
  } else if (asked.is_ids && (asked.max_length <= 0 ||
                              static_cast<int64_t>(asked.prompt_ids.size()) <= asked.max_length)) {
    if (field("prompt_token_ids") != nlohmann::json(asked.prompt_ids)) {
      out.push_back(absl::StrCat("prompt_ids: stored ", shown(field("prompt_token_ids")),
                                 ", asked ", shown(nlohmann::json(asked.prompt_ids))));
    }
  }
  const nlohmann::json tokens = field("token_ids");
  const int64_t generated = tokens.is_array() ? static_cast<int64_t>(tokens.size()) : -1;
  const bool ended_by_length = field("finish_reason") == "FINISH_LENGTH";
  if (generated > asked.max_new_tokens || (generated < asked.max_new_tokens && ended_by_length)) {
    out.push_back(absl::StrCat("max_new_tokens: stored ", generated, " tokens",
                               ended_by_length ? " (all it asked for)" : "", ", asked ",
                               asked.max_new_tokens));
  }
  const nlohmann::json stored_capture = field("capture");
  const nlohmann::json asked_capture = CaptureJson(asked.capture);
  if (!stored_capture.is_object()) {
    out.push_back("capture: the file stores no resolved capture spec (an older format)");
  } else if (asked_capture.is_object()) {
    // Field by field, into nested messages (capture.statistics.row_entropy).
    std::function<void(const std::string&, const nlohmann::json&, const nlohmann::json&)> compare =
        [&](const std::string& where, const nlohmann::json& stored, const nlohmann::json& want) {
          if (stored.is_object() && want.is_object()) {
            for (const auto& [key, value] : want.items()) {
              if (where == "capture" && key == "max_bytes") continue;  // a limit, not the file's
              compare(absl::StrCat(where, ".", key),
                      stored.contains(key) ? stored[key] : nlohmann::json(), value);
            }
          } else if (stored != want) {
            out.push_back(absl::StrCat(where, ": stored ", shown(stored), ", asked ", shown(want)));
          }
        };
    compare("capture", stored_capture, asked_capture);
  }
  return out;
}

}  // namespace attnscope
