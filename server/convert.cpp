#include "server/convert.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/status_macros.h"
#include "core/utf8.h"
#include "proto/contract.h"
#include "server/call.h"

namespace attnscope {

namespace {

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

absl::Status CheckModelName(const std::string& asked, const std::string& served_name) {
  if (asked.empty() || asked == served_name) return absl::OkStatus();
  constexpr size_t kShown = 80;  // a name is echoed only this far
  const std::string shown =
      asked.size() > kShown ? utf8::Lossy(asked.substr(0, kShown)) + "..." : utf8::Lossy(asked);
  return absl::NotFoundError(absl::StrCat("this server serves model '", served_name, "', not '",
                                          shown, "'; connect to the server of that model"));
}

absl::StatusOr<HeadProbe> ToHeadProbe(const v1::DetectHeadsRequest& request,
                                      const std::string& served_name) {
  RETURN_IF_ERROR(CheckModelName(request.model(), served_name));
  HeadProbe probe;
  if (request.probe_ids_size() > kMaxProbeTokens) {  // before copying them
    return absl::InvalidArgumentError(absl::StrCat("probe_ids has ", request.probe_ids_size(),
                                                   " ids; a probe has 2 to ", kMaxProbeTokens,
                                                   " ids"));
  }
  probe.ids.assign(request.probe_ids().begin(), request.probe_ids().end());
  if (request.has_span()) probe.span = request.span();
  probe.seed = request.seed();
  probe.exclude_bos = request.exclude_bos();
  probe.exclude_current_token = request.exclude_current_token();
  return probe;
}

void FillHeadDetection(const HeadDetection& detection, v1::DetectHeadsResponse* response) {
  for (int64_t id : detection.probe_ids) response->add_probe_ids(id);
  for (int64_t l = 0; l < detection.num_layers; ++l) {
    for (int64_t h = 0; h < detection.num_heads; ++h) {
      v1::HeadScores* row = response->add_heads();
      row->set_layer(static_cast<int32_t>(l));
      row->set_head(static_cast<int32_t>(h));
      row->set_previous_token(detection.score(l, h, HeadKind::kPreviousToken));
      row->set_duplicate_token(detection.score(l, h, HeadKind::kDuplicateToken));
      row->set_induction(detection.score(l, h, HeadKind::kInduction));
      row->set_sink(detection.score(l, h, HeadKind::kSink));
    }
  }
}

namespace {

// A repeated field of at most `limit` entries, or INVALID_ARGUMENT naming it.
absl::Status Bounded(int size, int64_t limit, const std::string& field, const char* what) {
  if (size > limit) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " has ", size, " entries, more than ", limit, " (", what, ")"));
  }
  return absl::OkStatus();
}

std::vector<PositionRange> ToRanges(
    const google::protobuf::RepeatedPtrField<v1::PositionRange>& ranges) {
  std::vector<PositionRange> out;
  out.reserve(ranges.size());
  for (const auto& r : ranges) out.push_back({r.begin(), r.end()});
  return out;
}

}  // namespace

absl::StatusOr<Interventions> ToInterventions(const v1::Interventions& proto,
                                              const ModelInfo& info) {
  Interventions out;
  RETURN_IF_ERROR(Bounded(proto.ablations_size(), kMaxAblations, "interventions.ablations",
                          "ablations per request"));
  RETURN_IF_ERROR(Bounded(proto.knockouts_size(), kMaxKnockouts, "interventions.knockouts",
                          "knockouts per request"));
  int64_t ranges = 0;
  for (const auto& k : proto.knockouts()) ranges += k.keys_size() + k.queries_size();
  if (ranges > kMaxKnockoutRanges) {
    return absl::InvalidArgumentError(absl::StrCat("interventions.knockouts hold ", ranges,
                                                   " ranges together, more than ",
                                                   kMaxKnockoutRanges));
  }
  for (int i = 0; i < proto.ablations_size(); ++i) {
    const auto& a = proto.ablations(i);
    RETURN_IF_ERROR(Bounded(a.heads_size(), info.num_heads,
                            absl::StrCat("interventions.ablations[", i, "].heads"),
                            "the model's heads"));
    const auto kind = FromProto(a.kind(), "interventions.ablations.kind");
    if (!kind.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("interventions.ablations[", i, "].kind ",
                                                     static_cast<int>(a.kind()),
                                                     " is not an AblationKind"));
    }
    out.ablations.push_back(
        {a.layer(), std::vector<int64_t>(a.heads().begin(), a.heads().end()), *kind});
  }
  for (int i = 0; i < proto.knockouts_size(); ++i) {
    const auto& k = proto.knockouts(i);
    const std::string field = absl::StrCat("interventions.knockouts[", i, "]");
    RETURN_IF_ERROR(
        Bounded(k.layers_size(), info.num_layers, field + ".layers", "the model's layers"));
    RETURN_IF_ERROR(Bounded(k.heads_size(), info.num_heads, field + ".heads", "the model's heads"));
    out.knockouts.push_back({std::vector<int64_t>(k.layers().begin(), k.layers().end()),
                             std::vector<int64_t>(k.heads().begin(), k.heads().end()),
                             ToRanges(k.keys()), ToRanges(k.queries())});
  }
  const v1::KvPolicy& p = proto.kv_policy();
  KvPolicy& policy = out.kv_policy;
  const auto kind = FromProto(p.kind(), "interventions.kv_policy.kind");
  if (!kind.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "interventions.kv_policy.kind ", static_cast<int>(p.kind()), " is not a KvPolicyKind"));
  }
  policy.kind = *kind;
  policy.compression_ratio = p.compression_ratio();
  policy.budget = p.budget();
  if (p.has_n_sink()) policy.n_sink = p.n_sink();
  if (p.has_window_size()) policy.window_size = p.window_size();
  if (p.has_kernel_size()) policy.kernel_size = p.kernel_size();
  if (p.has_beta()) policy.beta = p.beta();
  policy.recent_size = p.recent_size();
  policy.adaptive = p.adaptive();
  if (p.has_alpha_safeguard()) policy.alpha_safeguard = p.alpha_safeguard();
  policy.report_scores = p.report_scores();
  policy.decode_interval = p.decode_interval();
  return out;
}

void FillKvDecision(const KvDecision& decision, v1::KvDecisionEvent* event) {
  event->set_step(decision.step);
  event->set_layer(static_cast<int32_t>(decision.layer));
  event->set_keys(decision.keys);
  event->set_kv_heads(static_cast<int32_t>(decision.kv_heads));
  event->set_kept(decision.kept.data(), decision.kept.size());
  event->mutable_kept_per_head()->Add(decision.kept_per_head.begin(), decision.kept_per_head.end());
  event->mutable_scores()->Add(decision.scores.begin(), decision.scores.end());
  event->set_bytes_freed(decision.bytes_freed);
  event->set_cache_bytes(decision.cache_bytes);
}

void FillDivergence(const DivergenceStep& step, v1::DivergenceEvent* event) {
  event->set_step(step.step);
  event->set_kl(step.kl);
  event->set_top1_agree(step.top1_agree);
  event->set_rank(step.rank);
  event->set_token(step.token);
  event->set_logprob_full(step.logprob_full);
  event->set_logprob_intervened(step.logprob_intervened);
  event->mutable_lost_mass()->Add(step.lost_mass.begin(), step.lost_mass.end());
}

absl::StatusOr<ResolvedRequest> ResolveRequest(const v1::GenerateRequest& request,
                                               const Engine& engine,
                                               const ResolveOptions& options) {
  RETURN_IF_ERROR(CheckModelName(request.model(), options.served_name));
  GenerateRequest g;
  if (request.max_length() < 0) return absl::InvalidArgumentError("max_length must be >= 0");
  // The request's limit, else the registry's for the served model (a default never replaces a
  // value the user gave).
  const int64_t max_length =
      request.max_length() > 0 ? request.max_length() : options.default_max_length;
  // Without truncation a prompt past the context is refused: text and chats are encoded (and
  // rendered) only until that is certain, not in full.
  const int64_t max_tokens = max_length > 0 ? 0 : engine.info().max_position_embeddings;
  switch (request.input_case()) {
    case v1::GenerateRequest::kTokenIds:
      g.prompt_ids.assign(request.token_ids().ids().begin(), request.token_ids().ids().end());
      break;
    case v1::GenerateRequest::kText: {
      ASSIGN_OR_RETURN(g.prompt_ids,
                       engine.Encode(request.text(), /*add_special_tokens=*/true, max_tokens));
      break;
    }
    case v1::GenerateRequest::kChat: {
      std::vector<ChatMessage> messages;
      for (const auto& m : request.chat().messages()) messages.push_back({m.role(), m.content()});
      ASSIGN_OR_RETURN(
          g.prompt_ids,
          engine.EncodeChat(messages, request.chat().chat_template_kwargs(), max_tokens));
      break;
    }
    case v1::GenerateRequest::INPUT_NOT_SET:
      return absl::InvalidArgumentError("the request has no input: set text, token_ids or chat");
  }
  const int64_t untruncated_prompt_tokens = static_cast<int64_t>(g.prompt_ids.size());
  g.prompt_ids = TruncateMiddle(g.prompt_ids, max_length);
  if (request.has_max_new_tokens() && request.max_new_tokens() < 0)
    return absl::OutOfRangeError(
        absl::StrCat("max_new_tokens = ", request.max_new_tokens(),
                     " must be >= 0 (0: the prompt only, no token generated)"));
  g.max_new_tokens = request.has_max_new_tokens() ? request.max_new_tokens() : kDefaultMaxNewTokens;
  g.sampling.temperature = request.sampling().temperature();
  g.sampling.top_k = request.sampling().top_k();
  g.sampling.top_p = request.sampling().top_p() == 0 ? 1.0 : request.sampling().top_p();
  g.sampling.seed = request.sampling().seed();
  g.stop_token_ids.assign(request.stop_token_ids().begin(), request.stop_token_ids().end());
  g.ignore_eos = request.ignore_eos();
  ASSIGN_OR_RETURN(g.interventions, ToInterventions(request.interventions(), engine.info()));
  g.reference_leads = request.interventions().reference_leads();
  g.capture_reference = request.interventions().capture_reference();
  ASSIGN_OR_RETURN(CaptureSpec capture, ToCaptureSpec(request.capture()));
  ASSIGN_OR_RETURN(ValidatedRequest valid, engine.Validate(std::move(g), std::move(capture)));
  ResolvedRequest r{std::move(valid), 0, max_length, untruncated_prompt_tokens};

  const ModelInfo& info = engine.info();
  const GenerateRequest& resolved = r.generate.request();
  r.estimated_bytes = EstimateCaptureBytes(r.generate.capture(), info.num_layers, info.num_heads,
                                           static_cast<int64_t>(resolved.prompt_ids.size()),
                                           resolved.max_new_tokens);
  // The tighter of the server's budget and the request's own max_bytes (the clients' limit).
  const int64_t asked = request.capture().max_bytes();
  const bool request_binds =
      asked > 0 && (options.budget_bytes <= 0 || asked < options.budget_bytes);
  const int64_t budget = request_binds ? asked : options.budget_bytes;
  if (budget > 0 && r.estimated_bytes > budget) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the capture would produce about ", MB(r.estimated_bytes), ", over ",
        request_binds ? "the request's max_bytes of " : "the server's budget of ", MB(budget),
        "; shrink it: fewer layers or heads, rows=last:N or query ranges, form pooled, top_k or "
        "head_mean, statistics only, element type float16, or fewer max_new_tokens",
        request_binds ? "; or raise the limit (Python: max_bytes=N per call or "
                        "Client(max_bytes=N); attnscope-capture: --max_bytes N; 0: none)"
                      : ""));
  }
  // Generate: the request is checked and its budget judged as asked, but only statistics computed.
  if (options.statistics_only) r.generate = r.generate.StatisticsOnly();
  return r;
}

void FillModelInfo(const ModelInfo& info, const std::string& name, v1::ModelInfo* out) {
  out->set_name(name);
  out->set_architecture(info.model_type);
  out->set_num_layers(static_cast<int32_t>(info.num_layers));
  out->set_num_heads(static_cast<int32_t>(info.num_heads));
  out->set_num_kv_heads(static_cast<int32_t>(info.num_kv_heads));
  out->set_head_dim(static_cast<int32_t>(info.head_dim));
  out->set_vocab_size(info.vocab_size);
  out->set_max_positions(info.max_position_embeddings);
  out->set_dtype(info.dtype);
  out->set_device(info.device);
  out->set_has_tokenizer(info.has_tokenizer);
  out->set_chat_format(info.chat_format);
  for (int64_t id : info.eos_token_ids) out->add_eos_token_ids(id);
}

v1::FinishReason ToProto(FinishReason reason) {
  return static_cast<v1::FinishReason>(ProtoEnumNumber(v1::FinishReason_descriptor(), "FINISH_",
                                                       RowOf(kFinishReasons, reason).name));
}

void FillStatistic(const Block& block, v1::StatisticChunk* out) {
  FillBlockHeader(block.header, out);
  out->set_data(block.values, block.header.value_bytes());
}

absl::Status ChunkBlock(const Block& block, int64_t chunk_bytes, const MessageSink& emit,
                        const ChunkPlacer* place) {
  const BlockHeader& h = block.header;
  const int64_t elem = ElementSize(h.element_type);
  const int64_t index_size = h.has_indices() ? 4 : 0;
  const int64_t count = h.numel();
  const int64_t per_chunk = std::max<int64_t>(1, chunk_bytes / (elem + index_size));
  const auto* values = static_cast<const char*>(block.values);
  const auto* indices = static_cast<const char*>(block.indices);
  for (int64_t first = 0; first == 0 || first < count; first += per_chunk) {
    const int64_t n = std::max<int64_t>(0, std::min(per_chunk, count - first));
    v1::StreamAttentionResponse msg;
    if (h.kind == BlockKind::kStatistic) {
      auto* c = msg.mutable_statistic();
      FillBlockHeader(h, c);
      c->set_byte_offset(first * elem);
      c->set_data(values + first * elem, n * elem);
    } else {
      auto* c = msg.mutable_attention();
      FillBlockHeader(h, c);
      c->set_byte_offset(first * elem);
      ChunkPiece piece;
      piece.value_bytes = n * elem;
      if (values != nullptr) {
        piece.values = absl::string_view(values + first * elem, n * elem);
      } else {
        piece.fill = [&block, first, n](void* dst) { block.fill(first, n, dst); };
      }
      if (index_size > 0) piece.indices = absl::string_view(indices + first * 4, n * 4);
      if (place != nullptr) {
        RETURN_IF_ERROR((*place)(piece, c));
      } else {
        if (values != nullptr) {
          c->set_data(piece.values.data(), piece.values.size());
        } else {
          std::string* data = c->mutable_data();
          data->resize(static_cast<size_t>(piece.value_bytes));
          piece.fill(data->data());
        }
        if (!piece.indices.empty()) c->set_indices(piece.indices.data(), piece.indices.size());
      }
    }
    RETURN_IF_ERROR(emit(msg));
  }
  return absl::OkStatus();
}

void FillStreamHeader(const ResolvedRequest& resolved, const Engine& engine,
                      const std::string& model_name, int64_t chunk_bytes,
                      const std::string& request_id, v1::StreamHeader* h) {
  const GenerateRequest& generate = resolved.generate.request();
  h->set_request_id(request_id);
  FillModelInfo(engine.info(), model_name, h->mutable_model());
  for (int64_t id : generate.prompt_ids) h->add_prompt_token_ids(id);
  for (auto& piece : engine.Pieces(generate.prompt_ids)) h->add_prompt_pieces(std::move(piece));
  FillCaptureSpec(resolved.generate.capture(), engine.info().num_layers, engine.info().num_heads,
                  h->mutable_capture());
  h->set_estimated_bytes(resolved.estimated_bytes);
  h->set_chunk_bytes(chunk_bytes);
  h->set_max_new_tokens(generate.max_new_tokens);
  h->set_max_length(resolved.max_length);
  h->set_untruncated_prompt_tokens(resolved.untruncated_prompt_tokens);
}

void FillStreamTrailer(const GenerateResult& result, const Engine& engine, int64_t prompt_tokens,
                       double queue_ms, int64_t bytes_sent, v1::StreamTrailer* t) {
  for (int64_t id : result.tokens) t->add_token_ids(id);
  if (engine.info().has_tokenizer) {
    auto text = engine.Decode(result.tokens, /*skip_special_tokens=*/true);
    if (text.ok()) t->set_text(*text);
  }
  t->set_finish_reason(ToProto(result.finish));
  FillTimings(result, prompt_tokens, queue_ms, t->mutable_timings());
  t->set_bytes_sent(bytes_sent);
}

}  // namespace attnscope
