// The capture client's stream handling: a sequence of messages (each prefixed by a 2-byte length)
// from a hostile server, fed to the sample writer, then finished. Every outcome must be a status.
#include <cstring>

#include "attnscope/v1/attnscope.pb.h"
#include "samples/sample_writer.h"
#include "tests/fuzz/fuzz_target.h"

namespace {
// Protobuf logs every invalid UTF-8 string it meets while parsing; mutants are full of them.
const bool kQuiet = attnscope::fuzz::SilenceProtobufLogs();
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string dir = attnscope::fuzz::WriteScratch("unused", nullptr, 0);
  const bool pickle = size > 0 && (data[0] & 1);
  attnscope::SampleWriter writer(dir + "/sample", pickle ? attnscope::SampleFormat::kPickle
                                                         : attnscope::SampleFormat::kSafetensors);
  absl::Status status;
  attnscope::v1::StreamTrailer trailer;
  for (size_t at = size > 0 ? 1 : 0; status.ok() && at + 2 <= size;) {
    const size_t n = std::min<size_t>(size - at - 2, data[at] | (data[at + 1] << 8));
    attnscope::v1::StreamAttentionResponse msg;
    const bool parsed = msg.ParseFromArray(data + at + 2, static_cast<int>(n));
    at += 2 + n;
    if (!parsed) continue;
    switch (msg.event_case()) {
      case attnscope::v1::StreamAttentionResponse::kHeader:
        status = writer.OnHeader(msg.header(), 4);
        break;
      case attnscope::v1::StreamAttentionResponse::kToken:
        status = writer.OnToken(msg.token());
        break;
      case attnscope::v1::StreamAttentionResponse::kAttention:
        status = writer.OnAttention(msg.attention());
        break;
      case attnscope::v1::StreamAttentionResponse::kStatistic:
        status = writer.OnStatistic(msg.statistic());
        break;
      case attnscope::v1::StreamAttentionResponse::kTrailer:
        trailer = msg.trailer();
        break;
      default:
        break;
    }
  }
  if (status.ok()) status = writer.Finish(trailer, "prompt");
  attnscope::fuzz::Record(status);
  return 0;
}
