// Small UTF-8 helpers shared by the tokenizers.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace attnscope::utf8 {

// Length of the character starting with byte `lead` (1 for invalid lead bytes).
inline int CharLength(unsigned char lead) {
  if (lead < 0x80) return 1;
  if ((lead >> 5) == 0x6) return 2;
  if ((lead >> 4) == 0xE) return 3;
  if ((lead >> 3) == 0x1E) return 4;
  return 1;
}

// Splits into characters (invalid bytes are characters of their own).
inline std::vector<std::string_view> Chars(std::string_view s) {
  std::vector<std::string_view> out;
  for (size_t i = 0; i < s.size();) {
    size_t n = std::min<size_t>(CharLength(static_cast<unsigned char>(s[i])), s.size() - i);
    out.push_back(s.substr(i, n));
    i += n;
  }
  return out;
}

inline void Append(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// Decodes one character at s[i]; returns its code point and advances i. -1 when invalid.
inline int32_t Next(std::string_view s, size_t* i) {
  const auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char lead = b(*i);
  int n = CharLength(lead);
  if (lead >= 0x80 && n == 1) {
    ++*i;
    return -1;
  }
  if (*i + n > s.size()) {
    ++*i;
    return -1;
  }
  uint32_t cp = n == 1 ? lead : n == 2 ? (lead & 0x1F) : n == 3 ? (lead & 0x0F) : (lead & 0x07);
  for (int k = 1; k < n; ++k) {
    if ((b(*i + k) >> 6) != 0x2) {
      ++*i;
      return -1;
    }
    cp = (cp << 6) | (b(*i + k) & 0x3F);
  }
  static const uint32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
  if (cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
    ++*i;
    return -1;
  }
  *i += n;
  return static_cast<int32_t>(cp);
}

inline bool IsValid(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    if (Next(s, &i) < 0) return false;
  }
  return true;
}

// Invalid sequences become U+FFFD, one per maximal invalid prefix of a character.
inline std::string Lossy(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size();) {
    const size_t start = i;
    const int32_t cp = Next(s, &i);
    if (cp >= 0) {
      out.append(s.substr(start, i - start));
      continue;
    }
    // Skip the continuation bytes that belonged to the broken character.
    const int n = CharLength(static_cast<unsigned char>(s[start]));
    size_t j = start + 1;
    while (n > 1 && j < s.size() && j < start + n && (static_cast<unsigned char>(s[j]) >> 6) == 0x2)
      ++j;
    i = j;
    out += "\xEF\xBF\xBD";
  }
  return out;
}

}  // namespace attnscope::utf8
