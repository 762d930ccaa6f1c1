// Writes one stored sample while it streams: blocks go to disk as they arrive (memory stays
// bounded), and the file appears under its final name only when complete (temporary file, then
// rename).
//
// Formats:
//  - safetensors (default): every block as its own tensor under its stored name
//    (core/block.h BlockName: "attention.<phase>.<layer>.<step>.<query_begin>" with
//    ".indices" for top_k, "statistic.<kind>.<phase>.<layer>.<step>.<query_begin>"),
//    "prompt_token_ids" and "token_ids" (I64); JSON metadata under "attnscope", format version
//    kSampleFormatVersion: the resolved capture spec once, under "capture", as the proto's JSON
//    mapping (field names, every field). Python's StreamResult.metadata() writes the same keys
//    and attnscope.load reads both, and version 1 (a partial "capture" and the dialect text under
//    "capture_spec"). Readers assemble full matrices from the blocks.
//  - pickle: the prototype's {layer: {'shape': [1, heads, T, T], 'tensor': float32 ndarray}}.
#pragma once

#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "attnscope/v1/attnscope.pb.h"
#include "core/atomic_file.h"
#include "core/block.h"
#include "core/safetensors_writer.h"

namespace attnscope {

enum class SampleFormat { kSafetensors, kPickle };

// 2 since 0.2: "capture" is the proto JSON of the resolved spec; 1 stored a partial dict and text.
inline constexpr int kSampleFormatVersion = 2;

class SampleWriter {
 public:
  // `path` is the final file; the work file lives beside it under a fresh name
  // (core/atomic_file.h). `replace`: a file already at `path` when the sample is finished is
  // replaced (--overwrite); otherwise Finish fails with ALREADY_EXISTS and leaves it alone.
  SampleWriter(std::string path, SampleFormat format, bool replace = false);
  ~SampleWriter();  // removes work files of an unfinished sample

  // `max_new_tokens` bounds the rows of the assembled matrices.
  absl::Status OnHeader(const v1::StreamHeader& header, int64_t max_new_tokens);
  absl::Status OnAttention(const v1::AttentionChunk& chunk);
  // A chunk whose values (and top_k indices) came another way than its message (a shared ring).
  absl::Status OnAttention(const v1::AttentionChunk& chunk, absl::string_view values,
                           absl::string_view indices);
  absl::Status OnStatistic(const v1::StatisticChunk& chunk);
  absl::Status OnToken(const v1::TokenEvent& token);
  // A request with interventions: each step's divergence and each KV policy decision, kept in the
  // safetensors metadata ("divergence", "kv_decisions"; the pickle format has no place for them).
  absl::Status OnDivergence(const v1::DivergenceEvent& event);
  absl::Status OnKvDecision(const v1::KvDecisionEvent& event);
  // Assembles the file and renames it into place; refuses a sample with a missing or incomplete
  // block.
  absl::Status Finish(const v1::StreamTrailer& trailer, const std::string& prompt_text);

  int64_t bytes_received() const { return bytes_received_; }
  int64_t tokens() const { return static_cast<int64_t>(tokens_.size()); }

 private:
  // A stored tensor being received (offsets in the data work file, which becomes the data
  // section as it is).
  struct Entry {
    SafetensorsEntry tensor;
    int64_t written = 0;  // bytes received so far
  };
  // Every chunk is checked against the stream header before it costs anything: a hostile or broken
  // server gets a clear error, never a crash or a file that does not load.
  absl::Status CheckBlock(const BlockHeader& h, int64_t block_bytes, int64_t byte_offset,
                          int64_t data_bytes) const;
  // The one reassembler: a chunk of either kind, its values (and indices) appended in order.
  absl::Status OnChunk(const BlockHeader& h, absl::string_view data, absl::string_view indices,
                       int64_t byte_offset, int64_t block_bytes);
  absl::Status Append(const std::string& name, const std::string& dtype,
                      const std::vector<int64_t>& shape, absl::string_view data,
                      int64_t byte_offset, int64_t total_bytes);
  absl::Status WriteFull(const BlockHeader& h, absl::string_view data, int64_t byte_offset);
  absl::Status WriteSafetensors(const std::string& metadata);
  absl::Status WritePickle();

  std::string path_;
  SampleFormat format_;
  bool replace_ = false;
  v1::StreamHeader header_;
  CaptureSpec spec_;  // the header's, converted
  bool have_header_ = false;
  std::set<int64_t> header_layers_;
  int64_t max_new_tokens_ = 0;
  bool assemble_ = false;  // dense capture of every row: keep full matrices
  int64_t prompt_len_ = 0;
  int64_t max_rows_ = 0;  // prompt + max_new_tokens - 1: row capacity of the full matrices
  int64_t heads_ = 0;
  std::FILE* data_ = nullptr;  // blocks, appended as they arrive
  // Pickle: the output file itself, reserved for T = max_rows_ (PrototypePickleLayout); dense
  // values are converted into a staging buffer, their rows padded with the zeros of the keys past
  // the block's, and written with pwrite where consecutive rows of a head meet (no page faults of a
  // mapping, no rows written one by one). A shorter generation is compacted at the end.
  absl::Status Stage(int64_t file_offset, const char* src, int64_t count, ElementType type,
                     int64_t zeros);
  absl::Status FlushStage();
  absl::Status PickleWrite(int64_t file_offset, const char* data, int64_t bytes);
  std::unique_ptr<AtomicFile> pickle_file_;
  std::unique_ptr<char[]> stage_;  // stage_bytes_ bytes for the file from stage_offset_ on
  int64_t stage_offset_ = 0, stage_bytes_ = 0;
  std::vector<Entry> entries_;              // in arrival (= file) order
  std::map<std::string, size_t> entry_of_;  // name -> index in entries_
  std::map<int64_t, size_t> layer_slot_;    // layer -> slot in full_
  std::vector<v1::TokenEvent> tokens_;
  std::vector<v1::DivergenceEvent> divergence_;
  std::vector<v1::KvDecisionEvent> kv_decisions_;
  int64_t data_size_ = 0;
  int64_t bytes_received_ = 0;
  bool finished_ = false;
};

// Whether the file at `path` is a whole stored sample of `format` (what a rerun may skip): for
// safetensors, a header that parses, carries the attnscope metadata and accounts for every byte of
// the file; for pickle, the prototype layout's first and last bytes. DATA_LOSS says what is wrong.
absl::Status CheckStoredSample(const std::string& path, SampleFormat format);

// What a run asks of sample i, for a rerun to compare with the file it finds.
struct SampleSettings {
  std::string model;                // empty: any
  bool is_ids = false;              // the prompt came as token ids
  std::string prompt_text;          // else its text (a chat's user message)
  std::vector<int64_t> prompt_ids;  // with is_ids
  int64_t max_length = 0;           // truncation: ids are compared only when it did not cut
  int64_t max_new_tokens = 0;
  v1::CaptureSpec capture;  // resolved: the model's layers and heads filled in
};

// How the whole stored sample at `path` differs from `asked`: one line per setting ("capture.form:
// stored FORM_DENSE, asked FORM_HEAD_MEAN", "prompt: ..."); empty when it matches. Pickle files
// keep no settings: nothing is compared. Errors: the file's metadata cannot be read.
absl::StatusOr<std::vector<std::string>> StoredSampleDifferences(const std::string& path,
                                                                 SampleFormat format,
                                                                 const SampleSettings& asked);

}  // namespace attnscope
