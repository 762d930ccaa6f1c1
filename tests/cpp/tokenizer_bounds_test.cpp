// What a client's text may cost the tokenizer is bounded: long words are never cached and short
// ones only within a byte budget, so Tokenize cannot grow the server's memory (issue 21.C1); and a
// prompt past the context is encoded only until that is certain (issue 21.C8).
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <random>
#include <string>

#include "text/tokenizer/hf_tokenizer.h"

namespace attnscope {
namespace {

// A byte-level vocabulary of "a".."z" with the merge "a b" -> "ab"; no pre-tokenizer, so the whole
// text is one word.
std::string WriteTokenizer(const std::string& pre_tokenizer = "null") {
  std::string vocab = "{";
  for (char c = 'a'; c <= 'z'; ++c)
    vocab += "\"" + std::string(1, c) + "\":" + std::to_string(c - 'a') + ",";
  vocab += "\"ab\":26}";
  char dir[] = "/tmp/attnscope-tok-XXXXXX";
  EXPECT_NE(mkdtemp(dir), nullptr);
  const std::string path = std::string(dir) + "/tokenizer.json";
  std::ofstream(path) << "{\"pre_tokenizer\": " << pre_tokenizer
                      << ", \"model\": {\"type\": \"BPE\", \"vocab\": " << vocab
                      << ", \"merges\": [\"a b\"]}}";
  return path;
}

std::string RandomWord(std::mt19937* rng, size_t n) {
  std::string w(n, 'a');
  for (char& c : w) c = static_cast<char>('a' + (*rng)() % 26);
  return w;
}

TEST(TokenizerCache, LongWordsAreNeverCached) {
  const std::string path = WriteTokenizer();
  auto tok = hf::HfTokenizer::Parse(path);
  ASSERT_TRUE(tok.ok()) << tok.status();
  std::mt19937 rng(1);
  for (int i = 0; i < 20; ++i) {
    const std::string word = RandomWord(&rng, 100000) + "ab";
    const std::vector<int64_t> ids = (*tok)->Encode(word, false);
    ASSERT_EQ(ids.back(), 26);  // the merge still applies
    EXPECT_EQ((*tok)->word_cache_bytes(), 0) << "a " << word.size() << "-byte word was cached";
  }
  std::remove(path.c_str());
}

TEST(TokenizerCache, ShortWordsStayWithinTheBudget) {
  const std::string path = WriteTokenizer();
  auto tok = hf::HfTokenizer::Parse(path);
  ASSERT_TRUE(tok.ok()) << tok.status();
  std::mt19937 rng(2);
  int64_t peak = 0;
  const std::string probe = "abcab";
  const std::vector<int64_t> want = (*tok)->Encode(probe, false);
  EXPECT_EQ(want, (std::vector<int64_t>{26, 2, 26}));
  for (int i = 0; i < 20000; ++i) {  // about three times the budget
    (*tok)->Encode(RandomWord(&rng, hf::HfTokenizer::kMaxCachedWordBytes), false);
    peak = std::max(peak, (*tok)->word_cache_bytes());
  }
  EXPECT_GT(peak, hf::HfTokenizer::kWordCacheBudgetBytes / 2);  // the budget was reached
  EXPECT_LE(peak, hf::HfTokenizer::kWordCacheBudgetBytes);
  EXPECT_EQ((*tok)->Encode(probe, false), want);  // cached or not, the same ids
  std::remove(path.c_str());
}

TEST(TokenizerBounds, EncodingStopsOncePastTheLimit) {
  const std::string path = WriteTokenizer(
      R"({"type": "Split", "pattern": {"Regex": "[a-z]+"}, "behavior": "Isolated"})");
  auto tok = hf::HfTokenizer::Parse(path);
  ASSERT_TRUE(tok.ok()) << tok.status();
  std::string text;
  for (int i = 0; i < 100000; ++i) text += "ab cd ";
  const std::vector<int64_t> all = (*tok)->Encode(text, false);
  ASSERT_EQ(all.size(), 100000u * 3);  // "ab" -> 26, "cd" -> c, d
  const std::vector<int64_t> some = (*tok)->EncodeAtMost(text, false, 1000);
  EXPECT_GT(some.size(), 1000u);
  EXPECT_LE(some.size(), 1002u);  // stopped after the word that passed the limit
  EXPECT_TRUE(std::equal(some.begin(), some.end(), all.begin()));
  EXPECT_EQ((*tok)->EncodeAtMost(text, false, 300000), all);  // at the limit: everything
  EXPECT_EQ((*tok)->max_token_bytes(), 2);
  std::remove(path.c_str());
}

}  // namespace
}  // namespace attnscope
