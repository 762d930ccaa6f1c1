// Mapping between the public contract (attnscope.v1) and the engine API.
#pragma once

#include <functional>

#include "absl/status/statusor.h"
#include "attnscope/v1/attnscope.pb.h"
#include "model/capture_types.h"
#include "model/engine.h"

namespace attnscope {

// Default for GenerateRequest.max_new_tokens = 0.
constexpr int64_t kDefaultMaxNewTokens = 16;

struct ResolvedRequest {
  GenerateRequest generate;
  CaptureSpec capture;
  int64_t estimated_bytes = 0;
};

// The capture spec of a request, its enums and fields checked (the model-dependent checks are
// the engine's Validate).
absl::StatusOr<CaptureSpec> ToCaptureSpec(const v1::CaptureSpec& proto);

// Resolves the input (token ids, or text/chat through the engine's tokenizer), middle truncation,
// generation parameters and capture spec; checks everything the engine checks and the byte budget
// (`budget_bytes` > 0). Errors carry the status a user should see.
absl::StatusOr<ResolvedRequest> ResolveRequest(const v1::GenerateRequest& request,
                                               const Engine& engine, const std::string& served_name,
                                               int64_t budget_bytes);

// LongBench-style middle truncation: the first half and the last half of `max_length` tokens.
std::vector<int64_t> TruncateMiddle(const std::vector<int64_t>& ids, int64_t max_length);

void FillModelInfo(const ModelInfo& info, const std::string& name, v1::ModelInfo* out);
void FillCaptureSpec(const CaptureSpec& spec, int64_t num_layers, int64_t num_heads,
                     v1::CaptureSpec* out);
v1::FinishReason ToProto(FinishReason reason);
v1::Phase ToProto(Phase phase);
// The whole block in one message (Generate's response).
void FillStatistic(const StatBlock& stat, v1::StatisticChunk* out);
// Receives the messages of a chunked block one at a time; an error stops the chunking.
using MessageSink = std::function<absl::Status(const v1::StreamAttentionResponse& message)>;

// The block in messages whose payload is at most `chunk_bytes` (StreamAttention), each made just
// before `emit` takes it: one chunk's copy exists at a time, not the whole block's.
absl::Status ChunkStatistic(const StatBlock& stat, int64_t chunk_bytes, const MessageSink& emit);
absl::Status ChunkAttention(const AttentionBlock& block, ElementType element_type,
                            int64_t chunk_bytes, const MessageSink& emit);

}  // namespace attnscope
