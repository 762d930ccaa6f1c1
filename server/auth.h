// Bearer-token authentication (RFC 6750): the scheme is matched case-insensitively and a presented
// token is compared with every accepted one in constant time.
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace attnscope {

class BearerTokens {
 public:
  BearerTokens() = default;
  // One token per line; surrounding spaces, tabs and CR are dropped; blank lines and lines starting
  // with '#' are skipped. INVALID_ARGUMENT when no token remains or a token is not printable ASCII.
  static absl::StatusOr<BearerTokens> Parse(absl::string_view text, absl::string_view source);

  bool empty() const { return tokens_.empty(); }
  size_t size() const { return tokens_.size(); }
  // OK, or UNAUTHENTICATED saying what is wrong with the `authorization` metadata value (nullptr:
  // absent).
  absl::Status Check(const absl::string_view* authorization) const;

 private:
  std::vector<std::string> tokens_;
};

// The token of an `authorization: Bearer <token>` value (the scheme in any case), "" when it is not
// one. For identity only; BearerTokens::Check decides whether it is accepted.
std::string PresentedBearerToken(absl::string_view authorization);

// Compares in time that depends only on the lengths, not on where the strings differ.
bool ConstantTimeEquals(absl::string_view a, absl::string_view b);

}  // namespace attnscope
