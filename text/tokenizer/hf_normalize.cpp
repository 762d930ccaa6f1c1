// Normalizers (Unicode forms, prepend, replace, lowercase) and pre-tokenizers (split, byte-level,
// metaspace, digits).
#include <utf8proc.h>

#include "absl/strings/str_replace.h"
#include "text/tokenizer/hf_tokenizer.h"

namespace attnscope {
namespace hf {
namespace {

std::string Utf8Normalize(const std::string& s, utf8proc_option_t options) {
  utf8proc_uint8_t* out = nullptr;
  utf8proc_ssize_t n =
      utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()), s.size(), &out,
                   static_cast<utf8proc_option_t>(options | UTF8PROC_STABLE));
  if (n < 0) return s;  // not valid UTF-8: leave it as is
  std::string r(reinterpret_cast<char*>(out), n);
  free(out);
  return r;
}

// Splits `s` into the matches of `re` and the text between them (behavior "Isolated").
std::vector<std::string> SplitIsolated(const Regex& re, const std::string& s) {
  std::vector<std::string> out;
  size_t last = 0;
  for (auto [b, e] : re.FindAll(s)) {
    if (b > last) out.push_back(s.substr(last, b - last));
    out.push_back(s.substr(b, e - b));
    last = e;
  }
  if (last < s.size()) out.push_back(s.substr(last));
  return out;
}

}  // namespace

std::string HfTokenizer::Normalize(std::string s) const {
  for (const Normalizer& n : normalizers_) {
    switch (n.kind) {
      case Normalizer::kNfc:
        s = Utf8Normalize(s, UTF8PROC_COMPOSE);
        break;
      case Normalizer::kNfkc:
        s = Utf8Normalize(s, static_cast<utf8proc_option_t>(UTF8PROC_COMPOSE | UTF8PROC_COMPAT));
        break;
      case Normalizer::kNfd:
        s = Utf8Normalize(s, UTF8PROC_DECOMPOSE);
        break;
      case Normalizer::kNfkd:
        s = Utf8Normalize(s, static_cast<utf8proc_option_t>(UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT));
        break;
      case Normalizer::kLowercase:
        s = Utf8Normalize(s, UTF8PROC_CASEFOLD);
        break;
      case Normalizer::kPrepend:
        if (!s.empty()) s = n.a + s;
        break;
      case Normalizer::kReplace:
        s = absl::StrReplaceAll(s, {{n.a, n.b}});
        break;
    }
  }
  return s;
}

std::vector<std::string> HfTokenizer::PreTokenize(const std::string& s, bool first_segment) const {
  std::vector<std::string> pieces = {s};
  for (const PreTokenizer& p : pre_tokenizers_) {
    std::vector<std::string> next;
    for (std::string& piece : pieces) {
      switch (p.kind) {
        case PreTokenizer::kSplit:
        case PreTokenizer::kDigits:
          for (auto& x : SplitIsolated(*p.regex, piece)) next.push_back(std::move(x));
          break;
        case PreTokenizer::kByteLevel: {
          if (p.add_prefix_space && !piece.empty() && piece[0] != ' ') piece = " " + piece;
          std::vector<std::string> parts =
              p.regex ? SplitIsolated(*p.regex, piece) : std::vector<std::string>{piece};
          for (const std::string& part : parts) {
            std::string mapped;
            for (unsigned char c : part) mapped += Bytes().to_char[c];
            next.push_back(std::move(mapped));
          }
          break;
        }
        case PreTokenizer::kMetaspace: {
          std::string r = absl::StrReplaceAll(piece, {{" ", p.replacement}});
          const bool prepend =
              p.prepend_scheme == "always" || (p.prepend_scheme == "first" && first_segment);
          if (prepend && r.compare(0, p.replacement.size(), p.replacement) != 0)
            r = p.replacement + r;
          if (!p.split) {
            next.push_back(std::move(r));
            break;
          }
          // Each piece starts at a replacement character (merged with the word after it).
          size_t start = 0;
          for (size_t pos = r.find(p.replacement, 1); pos != std::string::npos;
               pos = r.find(p.replacement, pos + 1)) {
            next.push_back(r.substr(start, pos - start));
            start = pos;
          }
          next.push_back(r.substr(start));
          break;
        }
      }
    }
    pieces = std::move(next);
  }
  return pieces;
}

}  // namespace hf
}  // namespace attnscope
