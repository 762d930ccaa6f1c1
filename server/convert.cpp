#include "server/convert.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "model/status_macros.h"
#include "model/utf8.h"

namespace attnscope {

absl::StatusOr<CaptureSpec> ToCaptureSpec(const v1::CaptureSpec& p) {
  CaptureSpec s;
  s.layers.assign(p.layers().begin(), p.layers().end());
  s.heads.assign(p.heads().begin(), p.heads().end());
  if (p.phases_size() > 0) {
    s.prefill = s.decode = false;
    for (int ph : p.phases()) {
      if (ph == v1::PHASE_PREFILL)
        s.prefill = true;
      else if (ph == v1::PHASE_DECODE)
        s.decode = true;
      else
        return absl::InvalidArgumentError(absl::StrCat("capture.phases: unknown phase ", ph));
    }
  }
  s.last_queries = p.last_queries();
  for (const auto& r : p.query_ranges()) s.query_ranges.push_back({r.begin(), r.end()});
  switch (p.form()) {
    case v1::FORM_NONE:
      s.form = Form::kNone;
      break;
    case v1::FORM_DENSE:
      s.form = Form::kDense;
      break;
    case v1::FORM_HEAD_MEAN:
      s.form = Form::kHeadMean;
      break;
    case v1::FORM_HEAD_MAX:
      s.form = Form::kHeadMax;
      break;
    case v1::FORM_POOLED:
      s.form = Form::kPooled;
      break;
    case v1::FORM_TOP_K:
      s.form = Form::kTopK;
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat("capture.form: unknown form ", p.form()));
  }
  s.pool = p.pool();
  if (p.pool_op() != v1::POOL_MEAN && p.pool_op() != v1::POOL_MAX) {
    return absl::InvalidArgumentError(absl::StrCat("capture.pool_op: unknown value ", p.pool_op()));
  }
  s.pool_op = p.pool_op() == v1::POOL_MAX ? PoolOp::kMax : PoolOp::kMean;
  s.top_k = p.top_k();
  const auto& st = p.statistics();
  s.stats.row_entropy = st.row_entropy();
  s.stats.key_score_window = st.key_score_window();
  s.stats.sink_tokens = st.sink_tokens();
  s.stats.local_window = st.local_window();
  s.stats.key_score_variance = st.key_score_variance();
  switch (p.element_type()) {
    case v1::ELEMENT_FLOAT32:
      s.element_type = ElementType::kFloat32;
      break;
    case v1::ELEMENT_FLOAT16:
      s.element_type = ElementType::kFloat16;
      break;
    case v1::ELEMENT_BFLOAT16:
      s.element_type = ElementType::kBFloat16;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("capture.element_type: unknown value ", p.element_type()));
  }
  if (p.max_bytes() < 0) return absl::InvalidArgumentError("capture.max_bytes must be >= 0");
  return s;
}

namespace {

v1::ElementType ToProto(ElementType t) {
  switch (t) {
    case ElementType::kFloat32:
      return v1::ELEMENT_FLOAT32;
    case ElementType::kFloat16:
      return v1::ELEMENT_FLOAT16;
    case ElementType::kBFloat16:
      return v1::ELEMENT_BFLOAT16;
  }
  return v1::ELEMENT_FLOAT32;
}

v1::Form ToProto(Form f) {
  switch (f) {
    case Form::kNone:
      return v1::FORM_NONE;
    case Form::kDense:
      return v1::FORM_DENSE;
    case Form::kHeadMean:
      return v1::FORM_HEAD_MEAN;
    case Form::kHeadMax:
      return v1::FORM_HEAD_MAX;
    case Form::kPooled:
      return v1::FORM_POOLED;
    case Form::kTopK:
      return v1::FORM_TOP_K;
  }
  return v1::FORM_NONE;
}

std::string MB(int64_t bytes) { return absl::StrFormat("%.1f MB", bytes / 1e6); }

}  // namespace

std::vector<int64_t> TruncateMiddle(const std::vector<int64_t>& ids, int64_t max_length) {
  if (max_length <= 0 || static_cast<int64_t>(ids.size()) <= max_length) return ids;
  const int64_t head = max_length / 2;
  const int64_t tail = max_length - head;
  std::vector<int64_t> out(ids.begin(), ids.begin() + head);
  out.insert(out.end(), ids.end() - tail, ids.end());
  return out;
}

absl::StatusOr<ResolvedRequest> ResolveRequest(const v1::GenerateRequest& request,
                                               const Engine& engine, const std::string& served_name,
                                               int64_t budget_bytes) {
  if (!request.model().empty() && request.model() != served_name) {
    constexpr size_t kShown = 80;  // a name is echoed only this far
    const std::string& asked = request.model();
    const std::string shown =
        asked.size() > kShown ? utf8::Lossy(asked.substr(0, kShown)) + "..." : utf8::Lossy(asked);
    return absl::NotFoundError(absl::StrCat("this server serves model '", served_name, "', not '",
                                            shown, "'; connect to the server of that model"));
  }
  ResolvedRequest r;
  switch (request.input_case()) {
    case v1::GenerateRequest::kTokenIds:
      r.generate.prompt_ids.assign(request.token_ids().ids().begin(),
                                   request.token_ids().ids().end());
      break;
    case v1::GenerateRequest::kText: {
      if (!utf8::IsValid(request.text()))
        return absl::InvalidArgumentError("the text is not valid UTF-8");
      ASSIGN_OR_RETURN(r.generate.prompt_ids, engine.Encode(request.text()));
      break;
    }
    case v1::GenerateRequest::kChat: {
      std::vector<ChatMessage> messages;
      for (const auto& m : request.chat().messages()) messages.push_back({m.role(), m.content()});
      ASSIGN_OR_RETURN(r.generate.prompt_ids, engine.EncodeChat(messages));
      break;
    }
    case v1::GenerateRequest::INPUT_NOT_SET:
      return absl::InvalidArgumentError("the request has no input: set text, token_ids or chat");
  }
  if (request.max_length() < 0) return absl::InvalidArgumentError("max_length must be >= 0");
  r.generate.prompt_ids = TruncateMiddle(r.generate.prompt_ids, request.max_length());
  r.generate.max_new_tokens =
      request.max_new_tokens() == 0 ? kDefaultMaxNewTokens : request.max_new_tokens();
  r.generate.sampling.temperature = request.sampling().temperature();
  r.generate.sampling.top_k = request.sampling().top_k();
  r.generate.sampling.top_p = request.sampling().top_p() == 0 ? 1.0 : request.sampling().top_p();
  r.generate.sampling.seed = request.sampling().seed();
  r.generate.stop_token_ids.assign(request.stop_token_ids().begin(),
                                   request.stop_token_ids().end());
  r.generate.ignore_eos = request.ignore_eos();
  ASSIGN_OR_RETURN(r.capture, ToCaptureSpec(request.capture()));
  RETURN_IF_ERROR(engine.Validate(r.generate, r.capture));

  const ModelInfo& info = engine.info();
  r.estimated_bytes = EstimateCaptureBytes(r.capture, info.num_layers, info.num_heads,
                                           static_cast<int64_t>(r.generate.prompt_ids.size()),
                                           r.generate.max_new_tokens);
  int64_t budget = budget_bytes;
  if (request.capture().max_bytes() > 0)
    budget = budget > 0 ? std::min(budget, request.capture().max_bytes())
                        : request.capture().max_bytes();
  if (budget > 0 && r.estimated_bytes > budget) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the capture would produce about ", MB(r.estimated_bytes),
                     ", over the budget of ", MB(budget),
                     "; shrink it: fewer layers or heads, last_queries or query_ranges, "
                     "FORM_POOLED, FORM_TOP_K or "
                     "FORM_HEAD_MEAN, statistics only, ELEMENT_FLOAT16, or fewer max_new_tokens"));
  }
  return r;
}

void FillModelInfo(const ModelInfo& info, const std::string& name, v1::ModelInfo* out) {
  out->set_name(name);
  out->set_architecture(info.architecture);
  out->set_num_layers(static_cast<int32_t>(info.num_layers));
  out->set_num_heads(static_cast<int32_t>(info.num_heads));
  out->set_num_kv_heads(static_cast<int32_t>(info.num_kv_heads));
  out->set_head_dim(static_cast<int32_t>(info.head_dim));
  out->set_vocab_size(info.vocab_size);
  out->set_max_positions(info.max_positions);
  out->set_dtype(info.dtype);
  out->set_device(info.device);
  out->set_has_tokenizer(info.has_tokenizer);
  out->set_chat_format(info.chat_format);
  for (int64_t id : info.eos_token_ids) out->add_eos_token_ids(id);
}

void FillCaptureSpec(const CaptureSpec& s, int64_t num_layers, int64_t num_heads,
                     v1::CaptureSpec* out) {
  if (s.layers.empty()) {
    for (int64_t l = 0; l < num_layers; ++l) out->add_layers(static_cast<int32_t>(l));
  } else {
    for (int64_t l : s.layers) out->add_layers(static_cast<int32_t>(l));
  }
  if (s.heads.empty()) {
    for (int64_t h = 0; h < num_heads; ++h) out->add_heads(static_cast<int32_t>(h));
  } else {
    for (int64_t h : s.heads) out->add_heads(static_cast<int32_t>(h));
  }
  if (s.prefill) out->add_phases(v1::PHASE_PREFILL);
  if (s.decode) out->add_phases(v1::PHASE_DECODE);
  out->set_last_queries(s.last_queries);
  for (const auto& r : s.query_ranges) {
    auto* q = out->add_query_ranges();
    q->set_begin(r.begin);
    q->set_end(r.end);
  }
  out->set_form(ToProto(s.form));
  out->set_pool(static_cast<int32_t>(s.pool));
  out->set_pool_op(s.pool_op == PoolOp::kMax ? v1::POOL_MAX : v1::POOL_MEAN);
  out->set_top_k(static_cast<int32_t>(s.top_k));
  auto* st = out->mutable_statistics();
  st->set_row_entropy(s.stats.row_entropy);
  st->set_key_score_window(s.stats.key_score_window);
  st->set_sink_tokens(s.stats.sink_tokens);
  st->set_local_window(s.stats.local_window);
  st->set_key_score_variance(s.stats.key_score_variance);
  out->set_element_type(ToProto(s.element_type));
}

v1::FinishReason ToProto(FinishReason reason) {
  switch (reason) {
    case FinishReason::kEos:
      return v1::FINISH_EOS;
    case FinishReason::kStopToken:
      return v1::FINISH_STOP_TOKEN;
    case FinishReason::kLength:
      return v1::FINISH_LENGTH;
    case FinishReason::kContextFull:
      return v1::FINISH_CONTEXT_FULL;
    case FinishReason::kCancelled:
      return v1::FINISH_CANCELLED;
  }
  return v1::FINISH_UNSPECIFIED;
}

v1::Phase ToProto(Phase phase) {
  return phase == Phase::kPrefill ? v1::PHASE_PREFILL : v1::PHASE_DECODE;
}

namespace {

void FillStatisticHeader(const StatBlock& stat, v1::StatisticChunk* out) {
  out->set_kind(StatKindName(stat.kind));
  out->set_phase(ToProto(stat.phase));
  out->set_step(stat.step);
  out->set_layer(static_cast<int32_t>(stat.layer));
  for (int64_t h : *stat.heads) out->add_heads(static_cast<int32_t>(h));
  out->set_query_begin(stat.query_begin);
  out->set_query_end(stat.query_end);
  out->set_key_length(stat.key_length);
  for (int64_t d : stat.values.shape) out->add_shape(d);
  out->set_block_bytes(stat.values.bytes);
}

}  // namespace

void FillStatistic(const StatBlock& stat, v1::StatisticChunk* out) {
  FillStatisticHeader(stat, out);
  out->set_data(stat.values.data, stat.values.bytes);
}

absl::Status ChunkStatistic(const StatBlock& stat, int64_t chunk_bytes, const MessageSink& emit) {
  const int64_t total = stat.values.bytes;
  const int64_t piece =
      std::max<int64_t>(sizeof(float), chunk_bytes / sizeof(float) * sizeof(float));
  const auto* data = static_cast<const char*>(stat.values.data);
  for (int64_t offset = 0; offset == 0 || offset < total; offset += piece) {
    v1::StreamAttentionResponse msg;
    auto* c = msg.mutable_statistic();
    FillStatisticHeader(stat, c);
    c->set_byte_offset(offset);
    c->set_data(data + offset, std::max<int64_t>(0, std::min(piece, total - offset)));
    RETURN_IF_ERROR(emit(msg));
  }
  return absl::OkStatus();
}

absl::Status ChunkAttention(const AttentionBlock& block, ElementType element_type,
                            int64_t chunk_bytes, const MessageSink& emit) {
  const int64_t elem = ElementSize(element_type);
  const int64_t index_size = block.indices.defined() ? 4 : 0;
  const int64_t count = block.values.numel();
  const int64_t per_chunk = std::max<int64_t>(1, chunk_bytes / (elem + index_size));
  const auto* values = static_cast<const char*>(block.values.data);
  const auto* indices =
      block.indices.defined() ? static_cast<const char*>(block.indices.data) : nullptr;
  for (int64_t first = 0; first == 0 || first < count; first += per_chunk) {
    const int64_t n = std::max<int64_t>(0, std::min(per_chunk, count - first));
    v1::StreamAttentionResponse msg;
    auto* c = msg.mutable_attention();
    c->set_phase(ToProto(block.phase));
    c->set_step(block.step);
    c->set_layer(static_cast<int32_t>(block.layer));
    for (int64_t h : *block.heads) c->add_heads(static_cast<int32_t>(h));
    c->set_query_begin(block.query_begin);
    c->set_query_end(block.query_end);
    c->set_key_length(block.key_length);
    c->set_form(ToProto(block.form));
    c->set_pool(static_cast<int32_t>(block.pool));
    c->set_element_type(ToProto(element_type));
    for (int64_t d : block.values.shape) c->add_shape(d);
    c->set_byte_offset(first * elem);
    c->set_block_bytes(count * elem);
    c->set_data(values + first * elem, n * elem);
    if (indices != nullptr) c->set_indices(indices + first * 4, n * 4);
    RETURN_IF_ERROR(emit(msg));
  }
  return absl::OkStatus();
}

}  // namespace attnscope
