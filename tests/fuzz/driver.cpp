// A seeded mutation loop for the fuzz targets, for builds without libFuzzer (gcc, the sanitizer
// build, CI): runs every seed, then `--iterations` mutants of random seeds (bit flips, interesting
// bytes, inserted, deleted and repeated runs, splices of two seeds), and prints what the inputs
// ended in. A crash or a sanitizer report ends the process, failing the test.
//   fuzz_config --corpus tests/fuzz/corpus/config --iterations 20000 --seed 1
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "tests/fuzz/fuzz_target.h"

namespace {

using Bytes = std::vector<uint8_t>;

Bytes Mutate(const std::vector<Bytes>& seeds, std::mt19937_64& rng) {
  auto pick = [&](size_t n) { return n == 0 ? 0 : static_cast<size_t>(rng() % n); };
  Bytes b = seeds[pick(seeds.size())];
  static const uint8_t kInteresting[] = {0,   1,   0x7f, 0x80, 0xff, '"', '{', '}',
                                         '[', ']', ':',  ',',  '-',  '9', '\\'};
  const int rounds = 1 + static_cast<int>(rng() % 4);
  for (int r = 0; r < rounds; ++r) {
    switch (rng() % 7) {
      case 0:
        if (!b.empty()) b[pick(b.size())] ^= static_cast<uint8_t>(1u << (rng() % 8));
        break;
      case 1:
        if (!b.empty()) b[pick(b.size())] = kInteresting[pick(sizeof(kInteresting))];
        break;
      case 2: {  // insert random bytes
        const size_t at = pick(b.size() + 1), n = 1 + pick(8);
        Bytes ins(n);
        for (auto& x : ins) x = static_cast<uint8_t>(rng());
        b.insert(b.begin() + at, ins.begin(), ins.end());
        break;
      }
      case 3: {  // delete a run
        if (b.empty()) break;
        const size_t at = pick(b.size()), n = 1 + pick(std::min<size_t>(32, b.size() - at));
        b.erase(b.begin() + at, b.begin() + at + n);
        break;
      }
      case 4: {  // repeat a run
        if (b.empty()) break;
        const size_t at = pick(b.size()), n = 1 + pick(std::min<size_t>(64, b.size() - at));
        const Bytes run(b.begin() + at, b.begin() + at + n);
        b.insert(b.begin() + pick(b.size() + 1), run.begin(), run.end());
        break;
      }
      case 5: {  // splice with another seed
        const Bytes& o = seeds[pick(seeds.size())];
        if (o.empty()) break;
        const size_t cut = pick(b.size() + 1), from = pick(o.size());
        b.resize(cut);
        b.insert(b.end(), o.begin() + from, o.end());
        break;
      }
      case 6: {  // overwrite 8 bytes with a large or negative number (lengths, offsets)
        if (b.size() < 8) break;
        const uint64_t v = (rng() % 2) ? ~uint64_t{0} - (rng() % 4) : uint64_t{1} << (rng() % 64);
        std::memcpy(b.data() + pick(b.size() - 7), &v, 8);
        break;
      }
    }
  }
  return b;
}

}  // namespace

int main(int argc, char** argv) {
  std::string corpus;
  int64_t iterations = 1000;
  uint64_t seed = 1;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--corpus")
      corpus = argv[i + 1];
    else if (flag == "--iterations")
      iterations = std::stoll(argv[i + 1]);
    else if (flag == "--seed")
      seed = std::stoull(argv[i + 1]);
    else {
      std::cerr << "usage: " << argv[0] << " --corpus DIR [--iterations N] [--seed S]" << std::endl;
      return 2;
    }
  }
  std::vector<std::filesystem::path> files;
  if (!corpus.empty()) {
    for (const auto& e : std::filesystem::directory_iterator(corpus)) {
      if (e.is_regular_file()) files.push_back(e.path());
    }
  }
  std::sort(files.begin(), files.end());
  std::vector<Bytes> seeds;
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    seeds.emplace_back(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  if (seeds.empty()) seeds.emplace_back();
  const auto t0 = std::chrono::steady_clock::now();
  for (const Bytes& s : seeds) LLVMFuzzerTestOneInput(s.data(), s.size());
  std::mt19937_64 rng(seed);
  for (int64_t i = 0; i < iterations; ++i) {
    const Bytes b = Mutate(seeds, rng);
    LLVMFuzzerTestOneInput(b.data(), b.size());
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::cout << argv[0] << ": " << seeds.size() << " seeds + " << iterations << " mutants in " << s
            << " s, no crash; outcomes:";
  for (const auto& [name, n] : attnscope::fuzz::Outcomes()) std::cout << " " << name << "=" << n;
  std::cout << std::endl;
  return 0;
}
