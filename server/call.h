// What every call of the service shares, whichever reactor runs it: the clock, decoding a raw
// request and encoding a response, the refusals a busy or stopping server gives, and timings.
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "attnscope/v1/attnscope.grpc.pb.h"  // the protobuf SerializationTraits
#include "engine/engine.h"

namespace attnscope {

using Clock = std::chrono::steady_clock;

inline double MsBetween(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

inline void FillTimings(const GenerateResult& r, int64_t prompt_tokens, double queue_ms,
                        v1::Timings* t) {
  t->set_queue_ms(queue_ms);
  t->set_prefill_ms(r.timings.prefill_ms);
  t->set_decode_ms(r.timings.decode_ms);
  if (r.timings.prefill_ms > 0)
    t->set_prefill_tokens_per_s(prompt_tokens / (r.timings.prefill_ms / 1e3));
  if (r.timings.decode_ms > 0)
    t->set_decode_tokens_per_s(r.decode_steps / (r.timings.decode_ms / 1e3));
}

inline absl::Status BusyError() {
  return absl::ResourceExhaustedError(
      "the server is busy: every generation slot and queue place is taken; retry later");
}

inline absl::Status CancelledStatus(bool accepting) {
  return accepting
             ? absl::CancelledError("the generation was cancelled")
             : absl::UnavailableError("the server is shutting down; the generation was stopped");
}

// Decodes a raw request; INVALID_ARGUMENT naming the expected message when it does not decode.
template <typename Message>
absl::Status Decode(const grpc::ByteBuffer* raw, Message* out) {
  grpc::ByteBuffer copy(*raw);  // shares the slices; decoding consumes the buffer
  grpc::Status s = grpc::SerializationTraits<Message>::Deserialize(&copy, out);
  if (s.ok()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("the request could not be decoded as ",
                                                 Message::descriptor()->full_name(), ": ",
                                                 s.error_message()));
}

inline absl::Status Encode(const google::protobuf::Message& message, grpc::ByteBuffer* out) {
  bool own = false;
  grpc::Status s =
      grpc::SerializationTraits<google::protobuf::Message>::Serialize(message, out, &own);
  return s.ok()
             ? absl::OkStatus()
             : absl::InternalError(absl::StrCat("cannot encode the response: ", s.error_message()));
}

}  // namespace attnscope
