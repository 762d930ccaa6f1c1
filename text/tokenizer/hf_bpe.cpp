// Encoding: added tokens, the BPE model (with byte fallback) and the post-processor's ids.
#include <algorithm>
#include <queue>

#include "text/tokenizer/hf_tokenizer.h"

namespace attnscope {
namespace hf {
void HfTokenizer::Bpe(const std::string& word, std::vector<int64_t>* out) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    auto it = vocab_.find(word);
    if (it != vocab_.end()) {
      out->push_back(it->second);
      return;
    }
  }
  {
    std::lock_guard<std::mutex> lock(cache_mu_);
    auto it = cache_.find(word);
    if (it != cache_.end()) {
      out->insert(out->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  // Initial symbols: characters in the vocabulary, else their bytes (byte fallback), else unk.
  std::vector<int64_t> sym;
  for (std::string_view ch : utf8::Chars(word)) {
    auto it = vocab_.find(std::string(ch));
    if (it != vocab_.end()) {
      sym.push_back(it->second);
      continue;
    }
    bool bytes_ok = byte_fallback_;
    for (unsigned char c : ch) bytes_ok = bytes_ok && byte_ids_[c] >= 0;
    if (bytes_ok) {
      for (unsigned char c : ch) sym.push_back(byte_ids_[c]);
    } else if (unk_id_ >= 0) {
      if (!(fuse_unk_ && !sym.empty() && sym.back() == unk_id_)) sym.push_back(unk_id_);
    }
  }
  // Merges by rank, leftmost first among equal ranks, over a linked list of symbols.
  const int n = static_cast<int>(sym.size());
  std::vector<int> prev(n), next(n);
  for (int i = 0; i < n; ++i) prev[i] = i - 1, next[i] = i + 1 < n ? i + 1 : -1;
  struct Cand {
    int32_t rank;
    int pos;
    int64_t left, right;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto push = [&](int i) {
    if (i < 0 || next[i] < 0) return;
    const int j = next[i];
    auto it = merges_.find((static_cast<uint64_t>(sym[i]) << 32) | static_cast<uint64_t>(sym[j]));
    if (it != merges_.end()) heap.push({it->second.first, i, sym[i], sym[j]});
  };
  for (int i = 0; i + 1 < n; ++i) push(i);
  std::vector<bool> gone(n, false);
  while (!heap.empty()) {
    Cand c = heap.top();
    heap.pop();
    const int i = c.pos;
    if (gone[i] || next[i] < 0 || sym[i] != c.left || sym[next[i]] != c.right) continue;  // stale
    const int j = next[i];
    sym[i] =
        merges_.at((static_cast<uint64_t>(c.left) << 32) | static_cast<uint64_t>(c.right)).second;
    gone[j] = true;
    next[i] = next[j];
    if (next[j] >= 0) prev[next[j]] = i;
    push(prev[i]);
    push(i);
  }
  std::vector<int64_t> ids;
  for (int i = n > 0 ? 0 : -1; i >= 0; i = next[i]) ids.push_back(sym[i]);
  out->insert(out->end(), ids.begin(), ids.end());
  // Only short words are cached, within a byte budget: a client sending long distinct words can
  // neither grow the server's memory nor time what other clients' prompts held.
  if (word.size() > kMaxCachedWordBytes) return;
  const int64_t cost = CacheCost(word, ids);
  std::lock_guard<std::mutex> lock(cache_mu_);
  if (cache_bytes_ + cost > kWordCacheBudgetBytes) {
    cache_.clear();
    cache_bytes_ = 0;
  }
  if (cache_.emplace(word, std::move(ids)).second) cache_bytes_ += cost;
}

int64_t HfTokenizer::CacheCost(const std::string& word, const std::vector<int64_t>& ids) {
  constexpr int64_t kEntryOverhead = 96;  // hash node, two headers, allocator slack
  return static_cast<int64_t>(word.capacity() + ids.size() * sizeof(int64_t)) + kEntryOverhead;
}

int64_t HfTokenizer::word_cache_bytes() const {
  std::lock_guard<std::mutex> lock(cache_mu_);
  return cache_bytes_;
}

std::vector<int64_t> HfTokenizer::EncodeAtMost(const std::string& text, bool add_special_tokens,
                                               int64_t max_tokens) const {
  std::vector<int64_t> ids;
  if (add_special_tokens) ids = prefix_ids_;
  auto over = [&] { return max_tokens >= 0 && static_cast<int64_t>(ids.size()) > max_tokens; };
  // Added tokens are found in the raw text first; the text between them is normalized,
  // pre-tokenized and run through BPE.
  size_t segment_start = 0;
  bool first_segment = true;
  auto flush = [&](size_t end) {
    if (end > segment_start) {
      for (const std::string& piece :
           PreTokenize(Normalize(text.substr(segment_start, end - segment_start)), first_segment)) {
        Bpe(piece, &ids);
        if (over()) return;
      }
    }
    first_segment = false;
  };
  auto is_word = [&](size_t pos) {
    return pos < text.size() && (std::isalnum(static_cast<unsigned char>(text[pos])) ||
                                 text[pos] == '_' || static_cast<unsigned char>(text[pos]) >= 0x80);
  };
  for (size_t pos = 0; pos < text.size();) {
    const AddedToken* hit = nullptr;
    for (const AddedToken* a : added_by_byte_[static_cast<unsigned char>(text[pos])]) {
      if (text.compare(pos, a->content.size(), a->content) != 0) continue;
      if (a->single_word && ((pos > 0 && is_word(pos - 1)) || is_word(pos + a->content.size())))
        continue;
      hit = a;
      break;
    }
    if (hit == nullptr) {
      pos += utf8::CharLength(static_cast<unsigned char>(text[pos]));
      continue;
    }
    size_t begin = pos, end = pos + hit->content.size();
    if (hit->lstrip) {
      while (begin > segment_start && std::isspace(static_cast<unsigned char>(text[begin - 1])))
        --begin;
    }
    if (hit->rstrip) {
      while (end < text.size() && std::isspace(static_cast<unsigned char>(text[end]))) ++end;
    }
    flush(begin);
    ids.push_back(hit->id);
    if (over()) return ids;
    segment_start = pos = end;
  }
  flush(text.size());
  if (add_special_tokens) ids.insert(ids.end(), suffix_ids_.begin(), suffix_ids_.end());
  return ids;
}

}  // namespace hf
}  // namespace attnscope
