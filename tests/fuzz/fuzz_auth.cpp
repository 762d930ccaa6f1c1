// The bearer-token file (--auth_tokens_file) and the authorization metadata checked against it: the
// input's first line is the presented header value, the rest the token file.
#include <string>

#include "server/auth.h"
#include "tests/fuzz/fuzz_target.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  const size_t newline = text.find('\n');
  const absl::string_view presented(text.data(),
                                    newline == std::string::npos ? text.size() : newline);
  auto tokens = attnscope::BearerTokens::Parse(
      newline == std::string::npos ? "" : absl::string_view(text).substr(newline + 1), "fuzz");
  attnscope::fuzz::Record(tokens.status());
  if (tokens.ok()) attnscope::fuzz::Record(tokens->Check(&presented));
  return 0;
}
