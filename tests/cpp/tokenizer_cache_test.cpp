// The BPE word cache is bounded: long words are never cached and short ones only within a byte
// budget, so a client cannot grow the server's memory through Tokenize (issue 21.C1).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <random>
#include <string>

#include "model/tokenizer/hf_tokenizer.h"

namespace attnscope {
namespace {

// A byte-level vocabulary of "a".."z" with the merge "a b" -> "ab"; no pre-tokenizer, so the whole
// text is one word.
std::string WriteTokenizer() {
  std::string vocab = "{";
  for (char c = 'a'; c <= 'z'; ++c)
    vocab += "\"" + std::string(1, c) + "\":" + std::to_string(c - 'a') + ",";
  vocab += "\"ab\":26}";
  char dir[] = "/tmp/attnscope-tok-XXXXXX";
  EXPECT_NE(mkdtemp(dir), nullptr);
  const std::string path = std::string(dir) + "/tokenizer.json";
  std::ofstream(path) << "{\"model\": {\"type\": \"BPE\", \"vocab\": " << vocab
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

}  // namespace
}  // namespace attnscope
