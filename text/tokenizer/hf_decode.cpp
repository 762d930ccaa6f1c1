// Decoding: the decoder chain (byte-level, replace, byte fallback, fuse, strip, metaspace).
#include "absl/strings/str_replace.h"
#include "text/tokenizer/hf_tokenizer.h"

namespace attnscope {
namespace hf {
std::vector<std::string> HfTokenizer::DecodeTokens(std::vector<std::string> tokens,
                                                   bool strip) const {
  for (const Decoder& d : decoders_) {
    switch (d.kind) {
      case Decoder::kReplace:
        for (auto& t : tokens) t = absl::StrReplaceAll(t, {{d.a, d.b}});
        break;
      case Decoder::kByteFallback: {
        std::vector<std::string> out;
        std::string bytes;
        int pending = 0;
        auto flush = [&] {
          if (pending == 0) return;
          if (utf8::IsValid(bytes)) {
            out.push_back(bytes);
          } else {
            for (int k = 0; k < pending; ++k) out.push_back("\xEF\xBF\xBD");
          }
          bytes.clear();
          pending = 0;
        };
        for (auto& t : tokens) {
          unsigned int b = 0;
          if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>' &&
              std::sscanf(t.c_str() + 3, "%2X", &b) == 1) {
            bytes.push_back(static_cast<char>(b));
            ++pending;
          } else {
            flush();
            out.push_back(std::move(t));
          }
        }
        flush();
        tokens = std::move(out);
        break;
      }
      case Decoder::kFuse: {
        std::string all;
        for (auto& t : tokens) all += t;
        tokens = {all};
        break;
      }
      case Decoder::kStrip:
        if (!strip) break;
        for (auto& t : tokens) {
          int s = 0;
          while (s < d.start && t.compare(0, d.a.size(), d.a) == 0) t.erase(0, d.a.size()), ++s;
          s = 0;
          while (s < d.stop && t.size() >= d.a.size() &&
                 t.compare(t.size() - d.a.size(), d.a.size(), d.a) == 0) {
            t.erase(t.size() - d.a.size()), ++s;
          }
        }
        break;
      case Decoder::kMetaspace:
        for (size_t i = 0; i < tokens.size(); ++i) {
          tokens[i] = absl::StrReplaceAll(tokens[i], {{d.a, " "}});
          if (i == 0 && strip && d.prepend && !tokens[i].empty() && tokens[i][0] == ' ')
            tokens[i].erase(0, 1);
        }
        break;
      case Decoder::kByteLevel: {
        std::string bytes;
        for (const auto& t : tokens) {
          for (size_t i = 0; i < t.size();) {
            const size_t start = i;
            const int32_t cp = utf8::Next(t, &i);
            auto it = Bytes().from.find(cp);
            if (it != Bytes().from.end())
              bytes.push_back(static_cast<char>(it->second));
            else
              bytes.append(t, start, i - start);
          }
        }
        tokens = {utf8::Lossy(bytes)};
        break;
      }
    }
  }
  return tokens;
}

std::string HfTokenizer::Decode(const std::vector<int64_t>& ids, bool skip_special_tokens) const {
  std::vector<std::string> tokens;
  for (int64_t id : ids) {
    if (id < 0 || id >= static_cast<int64_t>(id_to_token_.size())) continue;
    if (skip_special_tokens && special_[id]) continue;
    tokens.push_back(id_to_token_[id]);
  }
  std::string out;
  for (const auto& t : DecodeTokens(std::move(tokens), /*strip=*/true)) out += t;
  return out;
}

std::string HfTokenizer::Piece(int64_t id) const {
  if (id < 0 || id >= static_cast<int64_t>(id_to_token_.size())) return "";
  std::string out;
  for (const auto& t : DecodeTokens({id_to_token_[id]}, /*strip=*/false)) out += t;
  return out;
}

}  // namespace hf
}  // namespace attnscope
