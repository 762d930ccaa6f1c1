// attnscope-tokenize: encodes a JSON list of strings with a checkpoint folder's tokenizer and
// prints, per string, {"ids", "ids_special", "decoded", "decoded_skip", "pieces"} as a JSON list.
// For tests against reference tokenizers and for the tokenizer benchmark (--repeat).
#include <chrono>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "text/tokenizer/tokenizer.h"

ABSL_FLAG(std::string, dir, "", "folder with tokenizer.json or tokenizer.model");
ABSL_FLAG(std::string, model_file, "", "instead of --dir: this tokenizer.json or tokenizer.model");
ABSL_FLAG(std::string, input, "", "JSON file: a list of strings");
ABSL_FLAG(bool, timing, false, "print encode time and token count instead (benchmark)");

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  using attnscope::Tokenizer;
  absl::StatusOr<std::unique_ptr<Tokenizer>> tok;
  const std::string file = absl::GetFlag(FLAGS_model_file);
  if (!file.empty()) {
    tok = file.size() > 5 && file.substr(file.size() - 5) == ".json"
              ? attnscope::LoadHfTokenizer(file)
              : attnscope::LoadSentencePieceTokenizer(file);
  } else {
    tok = Tokenizer::Load(absl::GetFlag(FLAGS_dir));
  }
  if (!tok.ok()) {
    std::cerr << "attnscope-tokenize: " << tok.status() << std::endl;
    return 1;
  }
  std::ifstream in(absl::GetFlag(FLAGS_input));
  nlohmann::json texts = nlohmann::json::parse(in, nullptr, false);
  if (!texts.is_array()) {
    std::cerr << "attnscope-tokenize: --input must be a JSON list of strings" << std::endl;
    return 1;
  }
  if (absl::GetFlag(FLAGS_timing)) {
    for (const auto& t : texts) {
      const std::string s = t.get<std::string>();
      const auto t0 = std::chrono::steady_clock::now();
      const size_t n = (*tok)->Encode(s, true).size();
      const double ms =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      std::cout << nlohmann::json({{"chars", s.size()}, {"tokens", n}, {"ms", ms}}).dump()
                << std::endl;
    }
    return 0;
  }
  nlohmann::json out = nlohmann::json::array();
  for (const auto& t : texts) {
    const std::string s = t.get<std::string>();
    const auto ids = (*tok)->Encode(s, false);
    const auto ids_special = (*tok)->Encode(s, true);
    nlohmann::json pieces = nlohmann::json::array();
    for (int64_t id : ids) pieces.push_back((*tok)->Piece(id));
    out.push_back({{"ids", ids},
                   {"ids_special", ids_special},
                   {"decoded", (*tok)->Decode(ids_special, false)},
                   {"decoded_skip", (*tok)->Decode(ids_special, true)},
                   {"pieces", pieces}});
  }
  std::cout << out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << std::endl;
  return 0;
}
