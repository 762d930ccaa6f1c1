// Requests of the public contract (attnscope.v1) resolved for the engine, and the engine's results
// as messages. Enum, spec and block-header conversions are proto/contract.h's.
#pragma once

#include <functional>

#include "absl/status/statusor.h"
#include "attnscope/v1/attnscope.pb.h"
#include "core/block.h"
#include "engine/engine.h"
#include "engine/head_detector.h"
#include "proto/contract.h"

namespace attnscope {

// Default for a GenerateRequest without max_new_tokens (0 is the prompt only).
constexpr int64_t kDefaultMaxNewTokens = 16;

// What the server adds to every request's resolution.
struct ResolveOptions {
  std::string served_name = "model";  // a request naming another model gets NOT_FOUND
  int64_t budget_bytes = 0;           // capture byte budget per request; 0: none
  int64_t default_max_length = 0;  // the registry's max_length, for requests without one; 0: none
  bool statistics_only = false;    // Generate: checked as asked, then run with form none
};

struct ResolvedRequest {
  ValidatedRequest generate;  // the engine's request and capture spec, checked once
  int64_t estimated_bytes = 0;
  int64_t max_length = 0;                 // the middle truncation applied (0: none)
  int64_t untruncated_prompt_tokens = 0;  // the prompt's length before it
};

// NOT_FOUND when a request names a model other than the served one (empty: any).
absl::Status CheckModelName(const std::string& asked, const std::string& served_name);

// A DetectHeads request as the engine's probe (its ids bounded before they are copied).
absl::StatusOr<HeadProbe> ToHeadProbe(const v1::DetectHeadsRequest& request,
                                      const std::string& served_name);
void FillHeadDetection(const HeadDetection& detection, v1::DetectHeadsResponse* response);

// The request's interventions; list lengths are bounded before anything is copied (the engine's
// Validate checks the rest).
absl::StatusOr<Interventions> ToInterventions(const v1::Interventions& proto,
                                              const ModelInfo& info);
void FillDivergence(const DivergenceStep& step, v1::DivergenceEvent* event);
void FillKvDecision(const KvDecision& decision, v1::KvDecisionEvent* event);

// Resolves the input (token ids, or text/chat through the engine's tokenizer), middle truncation,
// generation parameters and capture spec; checks everything the engine checks and the byte budget.
// Errors carry the status a user should see.
absl::StatusOr<ResolvedRequest> ResolveRequest(const v1::GenerateRequest& request,
                                               const Engine& engine, const ResolveOptions& options);

// LongBench-style middle truncation: the first half and the last half of `max_length` tokens.
std::vector<int64_t> TruncateMiddle(const std::vector<int64_t>& ids, int64_t max_length);

void FillModelInfo(const ModelInfo& info, const std::string& name, v1::ModelInfo* out);
// A stream's header for a resolved request (StreamAttention and detached jobs alike; the shared
// output's fields are the stream's own).
void FillStreamHeader(const ResolvedRequest& resolved, const Engine& engine,
                      const std::string& model_name, int64_t chunk_bytes,
                      const std::string& request_id, v1::StreamHeader* header);
// A finished generation's trailer: tokens, text, finish reason, timings, bytes sent.
void FillStreamTrailer(const GenerateResult& result, const Engine& engine, int64_t prompt_tokens,
                       double queue_ms, int64_t bytes_sent, v1::StreamTrailer* trailer);
v1::FinishReason ToProto(FinishReason reason);
// The whole statistics block in one message (Generate's response).
void FillStatistic(const Block& block, v1::StatisticChunk* out);
// Receives the messages of a chunked block one at a time; an error stops the chunking.
using MessageSink = std::function<absl::Status(const v1::StreamAttentionResponse& message)>;

// One attention chunk's payload: its values as bytes, or (a block given with Block::fill) `fill`,
// which writes its `value_bytes` where it is told; and its indices, if the form has them.
struct ChunkPiece {
  absl::string_view values;
  int64_t value_bytes = 0;
  std::function<void(void* dst)> fill;  // set when `values` is not
  absl::string_view indices;
};
// Places an attention chunk's values and indices elsewhere than in the message (the shared ring):
// writes them and fills the chunk's shared_* fields instead of `data` / `indices`.
using ChunkPlacer = std::function<absl::Status(const ChunkPiece& piece, v1::AttentionChunk* chunk)>;

// The one chunker (StreamAttention): a block of either kind in messages whose payload is at most
// `chunk_bytes`, each made just before `emit` takes it: one chunk's copy exists at a time, not the
// whole block's. With `place`, attention chunks carry their place instead of their bytes. A block
// given with `fill` instead of values is written chunk by chunk (straight into the place, with
// `place`).
absl::Status ChunkBlock(const Block& block, int64_t chunk_bytes, const MessageSink& emit,
                        const ChunkPlacer* place = nullptr);

}  // namespace attnscope
