// Decoded request messages: the capture spec conversion, its validation against a model's shape,
// the size estimate, the interventions' conversion and validation and middle truncation, as the
// server runs them on every request.
#include "attnscope/v1/attnscope.pb.h"
#include "server/convert.h"
#include "tests/fuzz/fuzz_target.h"

namespace {
// Protobuf logs every invalid UTF-8 string it meets while parsing; mutants are full of them.
const bool kQuiet = attnscope::fuzz::SilenceProtobufLogs();
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  attnscope::v1::GenerateRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) {
    attnscope::fuzz::Record(absl::InvalidArgumentError("undecodable"));
    return 0;
  }
  auto spec = attnscope::ToCaptureSpec(request.capture());
  if (!spec.ok()) {
    attnscope::fuzz::Record(spec.status());
    return 0;
  }
  const int64_t prompt_len = request.token_ids().ids_size();
  absl::Status valid =
      attnscope::ValidateCaptureSpec(*spec, /*num_layers=*/32, /*num_heads=*/32, prompt_len);
  attnscope::fuzz::Record(valid);
  if (valid.ok()) {
    attnscope::EstimateCaptureBytes(*spec, 32, 32, prompt_len, request.max_new_tokens() & 0xFFFFF);
  }
  attnscope::ModelInfo info;
  info.num_layers = 32;
  info.num_heads = 32;
  info.num_kv_heads = 8;
  auto interventions = attnscope::ToInterventions(request.interventions(), info);
  attnscope::fuzz::Record(interventions.status());
  if (interventions.ok()) {
    attnscope::fuzz::Record(attnscope::ValidateInterventions(*interventions, 32, 32, 8, prompt_len,
                                                             /*max_positions=*/131072));
  }
  std::vector<int64_t> ids(request.token_ids().ids().begin(), request.token_ids().ids().end());
  attnscope::TruncateMiddle(ids, request.max_length());
  return 0;
}
