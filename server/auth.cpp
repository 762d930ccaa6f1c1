#include "server/auth.h"

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace attnscope {
namespace {

constexpr size_t kMaxTokenBytes = 4096;

bool IsTokenChar(char c) { return c > 0x20 && c < 0x7f; }

}  // namespace

bool ConstantTimeEquals(absl::string_view a, absl::string_view b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  if (a.empty()) return b.empty();
  for (size_t i = 0; i < b.size(); ++i) {
    diff |= static_cast<unsigned char>(a[i % a.size()] ^ b[i]);
  }
  return diff == 0;
}

absl::StatusOr<BearerTokens> BearerTokens::Parse(absl::string_view text, absl::string_view source) {
  BearerTokens out;
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    if (line.size() > kMaxTokenBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ":", line_no, ": token longer than ", kMaxTokenBytes, " bytes"));
    }
    for (char c : line) {
      if (!IsTokenChar(c)) {
        return absl::InvalidArgumentError(
            absl::StrCat(source, ":", line_no, ": tokens are printable ASCII without spaces"));
      }
    }
    out.tokens_.emplace_back(line);
  }
  if (out.tokens_.empty())
    return absl::InvalidArgumentError(absl::StrCat(source, " holds no token"));
  return out;
}

std::string PresentedBearerToken(absl::string_view authorization) {
  absl::string_view value = absl::StripAsciiWhitespace(authorization);
  constexpr absl::string_view kScheme = "bearer";
  if (value.size() <= kScheme.size() ||
      !absl::EqualsIgnoreCase(value.substr(0, kScheme.size()), kScheme) ||
      (value[kScheme.size()] != ' ' && value[kScheme.size()] != '\t')) {
    return "";
  }
  return std::string(absl::StripLeadingAsciiWhitespace(value.substr(kScheme.size())));
}

absl::Status BearerTokens::Check(const absl::string_view* authorization) const {
  if (tokens_.empty()) return absl::OkStatus();
  if (authorization == nullptr) {
    return absl::UnauthenticatedError("missing 'authorization: Bearer <token>' metadata");
  }
  const std::string presented = PresentedBearerToken(*authorization);
  if (presented.empty())
    return absl::UnauthenticatedError("the authorization metadata must be 'Bearer <token>'");
  bool match = false;
  for (const std::string& token : tokens_) match |= ConstantTimeEquals(token, presented);
  if (!match) return absl::UnauthenticatedError("the bearer token is not valid for this server");
  return absl::OkStatus();
}

}  // namespace attnscope
