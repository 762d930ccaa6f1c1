// attnscope-chat-template: renders chat templates with attnscope's Jinja renderer, one JSON case
// per input line: {"template": "...", "variables": {...}} -> {"text": "..."} or
// {"error": "INVALID_ARGUMENT", "message": "..."}. With --repeat N, each case is rendered N times
// and "us" gives the mean microseconds per render (parsing excluded).
#include <chrono>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>

#include "absl/status/status.h"
#include "text/jinja/jinja.h"

int main(int argc, char** argv) {
  int repeat = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--repeat=", 0) == 0) repeat = std::max(1, std::atoi(arg.c_str() + 9));
  }
  using attnscope::jinja::Template;
  using attnscope::jinja::Value;
  for (std::string line; std::getline(std::cin, line);) {
    nlohmann::ordered_json out;
    const auto in = nlohmann::ordered_json::parse(line, nullptr, false);
    if (in.is_discarded() || !in.is_object() || !in.contains("template") ||
        !in["template"].is_string()) {
      out["error"] = "BAD_INPUT";
      std::cout << out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << std::endl;
      continue;
    }
    auto t = Template::Parse(in["template"].get<std::string>());
    absl::StatusOr<std::string> text = t.ok() ? absl::StatusOr<std::string>("") : t.status();
    double us = 0;
    if (t.ok()) {
      const Value variables =
          Value::FromJson(in.value("variables", nlohmann::ordered_json::object()));
      const auto start = std::chrono::steady_clock::now();
      for (int r = 0; r < repeat; ++r) text = t->Render(variables);
      us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start)
               .count() /
           repeat;
    }
    if (text.ok()) {
      out["text"] = *text;
      if (repeat > 1) out["us"] = us;
    } else {
      out["error"] = absl::StatusCodeToString(text.status().code());
      out["message"] = std::string(text.status().message());
    }
    std::cout << out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << std::endl;
  }
  return 0;
}
