// Evaluation: scopes as jinja2 has them (a for loop's iterations and a macro's calls are scopes of
// their own; `if` is not), Python operators, and the filters, tests, globals and methods chat
// templates use.
#include <utf8proc.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <ctime>
#include <unordered_map>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/status_macros.h"
#include "core/utf8.h"
#include "text/jinja/jinja_ast.h"

namespace attnscope::jinja {

absl::StatusOr<NodePtr> ParseTemplate(absl::string_view source);  // jinja_parse.cpp

// Python's str.isspace() characters.
bool IsPythonSpace(int32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20) || cp == 0x85 || cp == 0xA0 ||
         cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 ||
         cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

namespace {

constexpr int kMaxCallDepth = 100;
constexpr int64_t kMaxRange = 1 << 20;  // items of one list
// Statements, loop iterations, macro calls and filters of one rendering: a template (a checkpoint
// file) cannot make the server loop for minutes (real ones take a few hundred).
constexpr int64_t kMaxSteps = 1 << 20;

enum class Flow { kNormal, kBreak, kContinue };

struct Scope {
  std::unordered_map<std::string, Value> vars;
  std::shared_ptr<Scope> parent;
  const Value* Find(const std::string& name) const {
    for (const Scope* s = this; s != nullptr; s = s->parent.get()) {
      auto it = s->vars.find(name);
      if (it != s->vars.end()) return &it->second;
    }
    return nullptr;
  }
};
using ScopePtr = std::shared_ptr<Scope>;

absl::Status Error(int line, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("chat template line ", line, ": ", what));
}

std::vector<int32_t> CodePoints(const std::string& s) {
  std::vector<int32_t> out;
  for (size_t i = 0; i < s.size();) out.push_back(utf8::Next(s, &i));
  return out;
}
std::string FromCodePoints(const std::vector<int32_t>& cps, size_t a, size_t b) {
  std::string out;
  for (size_t i = a; i < b; ++i) utf8::Append(static_cast<uint32_t>(cps[i]), &out);
  return out;
}
bool IsCasedLetter(int32_t cp) {
  const auto c = utf8proc_category(cp);
  return c == UTF8PROC_CATEGORY_LU || c == UTF8PROC_CATEGORY_LL || c == UTF8PROC_CATEGORY_LT;
}
bool IsCaseIgnorable(int32_t cp) {
  const auto c = utf8proc_category(cp);
  return c == UTF8PROC_CATEGORY_MN || c == UTF8PROC_CATEGORY_ME || c == UTF8PROC_CATEGORY_CF ||
         c == UTF8PROC_CATEGORY_LM || c == UTF8PROC_CATEGORY_SK || cp == '\'' || cp == 0x2019 ||
         cp == '.' || cp == ':' || cp == 0xB7;
}
int64_t StrLen(const std::string& s) {
  int64_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

// Python's str.upper()/lower(): per-character mappings plus the unconditional SpecialCasing
// expansions that text meets in practice (ß, the Latin ligatures, İ) and the final sigma.
std::string MapCase(const std::string& s, bool upper) {
  static const std::unordered_map<int32_t, const char*> kUpper = {
      {0x00DF, "SS"},  {0xFB00, "FF"}, {0xFB01, "FI"}, {0xFB02, "FL"},     {0xFB03, "FFI"},
      {0xFB04, "FFL"}, {0xFB05, "ST"}, {0xFB06, "ST"}, {0x0149, "\u02BCN"}};
  std::vector<int32_t> cps = CodePoints(s);
  std::string out;
  for (size_t i = 0; i < cps.size(); ++i) {
    const int32_t cp = cps[i];
    if (upper) {
      auto it = kUpper.find(cp);
      if (it != kUpper.end()) {
        out += it->second;
        continue;
      }
      utf8::Append(static_cast<uint32_t>(utf8proc_toupper(cp)), &out);
      continue;
    }
    if (cp == 0x0130) {  // İ -> i + combining dot above
      out += "i\u0307";
      continue;
    }
    if (cp == 0x03A3) {  // Σ: final form after a cased letter and not before one
      bool before = false, after = false;
      for (size_t j = i; j-- > 0;) {
        if (IsCasedLetter(cps[j])) {
          before = true;
          break;
        }
        if (!IsCaseIgnorable(cps[j])) break;
      }
      for (size_t j = i + 1; j < cps.size(); ++j) {
        if (IsCasedLetter(cps[j])) {
          after = true;
          break;
        }
        if (!IsCaseIgnorable(cps[j])) break;
      }
      utf8::Append(before && !after ? 0x03C2 : 0x03C3, &out);
      continue;
    }
    utf8::Append(static_cast<uint32_t>(utf8proc_tolower(cp)), &out);
  }
  return out;
}
bool IsCased(int32_t cp) {
  const auto c = utf8proc_category(cp);
  return c == UTF8PROC_CATEGORY_LU || c == UTF8PROC_CATEGORY_LL || c == UTF8PROC_CATEGORY_LT;
}
// str.title(): a letter after a cased letter is lowered, any other cased letter titled.
std::string PyTitle(const std::string& s) {
  std::string out;
  bool prev_cased = false;
  for (int32_t cp : CodePoints(s)) {
    const bool cased = IsCased(cp);
    utf8::Append(static_cast<uint32_t>(
                     cased ? (prev_cased ? utf8proc_tolower(cp) : utf8proc_totitle(cp)) : cp),
                 &out);
    prev_cased = cased;
  }
  return out;
}
std::string PyCapitalize(const std::string& s) {
  std::vector<int32_t> cps = CodePoints(s);
  std::string out;
  for (size_t i = 0; i < cps.size(); ++i)
    utf8::Append(
        static_cast<uint32_t>(i == 0 ? utf8proc_totitle(cps[i]) : utf8proc_tolower(cps[i])), &out);
  return out;
}

// str.strip/lstrip/rstrip with Python's whitespace or the given characters.
std::string PyStrip(const std::string& s, const Value& chars, bool left, bool right) {
  std::vector<int32_t> cps = CodePoints(s);
  std::vector<int32_t> set;
  const bool custom = chars.is_string();
  if (custom) set = CodePoints(chars.text());
  auto strip = [&](int32_t cp) {
    return custom ? std::find(set.begin(), set.end(), cp) != set.end() : IsPythonSpace(cp);
  };
  size_t a = 0, b = cps.size();
  if (left)
    while (a < b && strip(cps[a])) ++a;
  if (right)
    while (b > a && strip(cps[b - 1])) --b;
  return FromCodePoints(cps, a, b);
}

ValueList PySplit(const std::string& s, const Value& sep, int64_t maxsplit) {
  ValueList out;
  if (!sep.is_string()) {  // runs of whitespace
    std::vector<int32_t> cps = CodePoints(s);
    size_t i = 0;
    while (i < cps.size()) {
      while (i < cps.size() && IsPythonSpace(cps[i])) ++i;
      if (i == cps.size()) break;
      if (maxsplit >= 0 && static_cast<int64_t>(out.size()) == maxsplit) {
        size_t e = cps.size();
        while (e > i && IsPythonSpace(cps[e - 1])) --e;
        out.push_back(Value::String(FromCodePoints(cps, i, e)));
        break;
      }
      size_t j = i;
      while (j < cps.size() && !IsPythonSpace(cps[j])) ++j;
      out.push_back(Value::String(FromCodePoints(cps, i, j)));
      i = j;
    }
    return out;
  }
  const std::string& d = sep.text();
  size_t pos = 0;
  while (maxsplit < 0 || static_cast<int64_t>(out.size()) < maxsplit) {
    const size_t at = s.find(d, pos);
    if (at == std::string::npos) break;
    out.push_back(Value::String(s.substr(pos, at - pos)));
    pos = at + d.size();
  }
  out.push_back(Value::String(s.substr(pos)));
  return out;
}

std::string PyReplace(const std::string& s, const std::string& from, const std::string& to,
                      int64_t count) {
  if (from.empty()) {  // Python inserts `to` around every character
    std::vector<int32_t> cps = CodePoints(s);
    std::string out;
    int64_t done = 0;
    for (size_t i = 0; i <= cps.size(); ++i) {
      if (count < 0 || done < count) {
        out += to;
        ++done;
      }
      if (i < cps.size()) utf8::Append(static_cast<uint32_t>(cps[i]), &out);
    }
    return out;
  }
  std::string out;
  size_t pos = 0;
  int64_t done = 0;
  while (count < 0 || done < count) {
    const size_t at = s.find(from, pos);
    if (at == std::string::npos) break;
    out.append(s, pos, at - pos);
    out += to;
    pos = at + from.size();
    ++done;
  }
  out.append(s, pos, std::string::npos);
  return out;
}

// Python's index normalisation for [i] and slices.
// jinja2's title filter: words split at runs of -, whitespace and opening brackets (not
// Python's str.title, the method).
std::string JinjaTitle(const std::string& s) {
  std::string out;
  bool at_start = true;
  for (int32_t cp : CodePoints(s)) {
    const bool sep =
        cp == '-' || IsPythonSpace(cp) || cp == '(' || cp == '{' || cp == '[' || cp == '<';
    if (sep) {
      utf8::Append(static_cast<uint32_t>(cp), &out);
      at_start = true;
    } else {
      utf8::Append(static_cast<uint32_t>(at_start ? utf8proc_toupper(cp) : utf8proc_tolower(cp)),
                   &out);
      at_start = false;
    }
  }
  return out;
}

// Python's str.splitlines() (\n, \r and \r\n).
ValueList SplitLines(const std::string& s) {
  ValueList out;
  size_t pos = 0;
  while (pos < s.size()) {
    size_t at = s.find_first_of("\n\r", pos);
    if (at == std::string::npos) {
      out.push_back(Value::String(s.substr(pos)));
      break;
    }
    out.push_back(Value::String(s.substr(pos, at - pos)));
    pos = at + ((s[at] == '\r' && at + 1 < s.size() && s[at + 1] == '\n') ? 2 : 1);
  }
  return out;
}

// A dict's items as (key, value) tuples, in order.
ValueList DictItems(const Value& d) {
  ValueList out;
  for (const auto& [k, v] : d.dict().items)
    out.push_back(Value::List({Value::String(k), v}, /*tuple=*/true));
  return out;
}

bool NormalizeIndex(int64_t* i, int64_t n) {
  if (*i < 0) *i += n;
  return *i >= 0 && *i < n;
}

class Renderer;
class Args;

// One builtin filter or method, as a table row: its name, its parameters (positional in this
// order, each also a keyword), whether it is variadic, and its body. A call of a fixed row with an
// argument the row does not name is an error, as in jinja2 and Python. A variadic row (map,
// select: a filter or test and its arguments) reads its positional arguments itself and its
// params as keywords only, and passes other keywords on.
struct Builtin {
  const char* name;
  std::vector<const char*> params;
  bool variadic;
  absl::StatusOr<Value> (*fn)(Renderer& r, const Value& self, const Args& a);
};
constexpr bool kFixed = false, kVariadic = true;
using BuiltinTable = std::unordered_map<std::string, Builtin>;

BuiltinTable MakeTable(std::initializer_list<Builtin> rows) {
  BuiltinTable table;
  for (const Builtin& row : rows) table.emplace(row.name, row);
  return table;
}

// The arguments of one call of a builtin, by its row's parameter names.
class Args {
 public:
  Args(CallArgs& a, const Builtin& row, int line) : a_(a), row_(row), line_(line) {}
  // The argument of `param` (by its position in the row or by keyword); `fallback` when absent.
  Value Get(const char* param, Value fallback = Value()) const {
    for (size_t i = 0; i < row_.params.size(); ++i) {
      if (absl::string_view(row_.params[i]) != param) continue;
      if (!row_.variadic && i < a_.positional.size()) return a_.positional[i];
      break;
    }
    for (const auto& [k, v] : a_.keywords) {
      if (k == param) return v;
    }
    return fallback;
  }
  // For fixed rows: at most params positional arguments, keywords among params.
  absl::Status Check() const {
    if (a_.positional.size() > row_.params.size())
      return Error(line_, absl::StrCat(row_.name, "() takes at most ", row_.params.size(),
                                       " arguments (", a_.positional.size(), " given)"));
    for (const auto& [k, v] : a_.keywords) {
      bool known = false;
      for (const char* want : row_.params) known |= k == want;
      if (!known)
        return Error(line_, absl::StrCat(row_.name, "() got an unexpected keyword '", k, "'"));
    }
    return absl::OkStatus();
  }
  const ValueList& positional() const { return a_.positional; }
  CallArgs& raw() const { return a_; }
  absl::string_view name() const { return row_.name; }
  int line() const { return line_; }

 private:
  CallArgs& a_;
  const Builtin& row_;
  int line_;
};

class Renderer {
 public:
  Renderer(std::string* out, size_t max_output) : out_(out), max_output_(max_output) {}

  absl::StatusOr<Flow> RenderBody(const Body& body, const ScopePtr& scope) {
    for (const NodePtr& n : body) {
      ASSIGN_OR_RETURN(Flow f, RenderNode(*n, scope));
      if (f != Flow::kNormal) return f;
    }
    return Flow::kNormal;
  }

  ScopePtr Globals() {
    auto g = std::make_shared<Scope>();
    g->vars["raise_exception"] =
        Value::MakeFunction("raise_exception", [](CallArgs& a) -> absl::StatusOr<Value> {
          const std::string msg = a.positional.empty() ? "" : a.positional[0].Str();
          return absl::FailedPreconditionError(msg);
        });
    g->vars["strftime_now"] =
        Value::MakeFunction("strftime_now", [](CallArgs& a) -> absl::StatusOr<Value> {
          if (a.positional.size() != 1 || !a.positional[0].is_string())
            return absl::InvalidArgumentError("strftime_now() takes one format string");
          std::time_t now = std::time(nullptr);
          std::tm tm{};
          localtime_r(&now, &tm);
          char buf[512];
          const size_t n = std::strftime(buf, sizeof(buf), a.positional[0].text().c_str(), &tm);
          return Value::String(std::string(buf, n));
        });
    g->vars["namespace"] =
        Value::MakeFunction("namespace", [](CallArgs& a) -> absl::StatusOr<Value> {
          auto d = std::make_shared<Dict>();
          d->is_namespace = true;
          for (const Value& p : a.positional) {
            if (!p.is_dict())
              return absl::InvalidArgumentError("namespace() takes a dict or keywords");
            for (const auto& [k, v] : p.dict().items) d->Set(k, v);
          }
          for (const auto& [k, v] : a.keywords) d->Set(k, v);
          return Value::MakeDict(d);
        });
    g->vars["dict"] = Value::MakeFunction("dict", [](CallArgs& a) -> absl::StatusOr<Value> {
      auto d = std::make_shared<Dict>();
      for (const auto& [k, v] : a.keywords) d->Set(k, v);
      return Value::MakeDict(d);
    });
    g->vars["range"] = Value::MakeFunction("range", [](CallArgs& a) -> absl::StatusOr<Value> {
      int64_t start = 0, stop = 0, step = 1;
      for (const Value& v : a.positional) {
        if (v.kind() != Value::Kind::kInt && v.kind() != Value::Kind::kBool)
          return absl::InvalidArgumentError("range() takes integers");
      }
      if (a.positional.size() == 1) {
        stop = a.positional[0].as_int();
      } else if (a.positional.size() >= 2) {
        start = a.positional[0].as_int();
        stop = a.positional[1].as_int();
        if (a.positional.size() > 2) step = a.positional[2].as_int();
      }
      if (step == 0) return absl::InvalidArgumentError("range() step must not be zero");
      ValueList out;
      for (int64_t i = start; step > 0 ? i < stop : i > stop;) {
        if (static_cast<int64_t>(out.size()) >= kMaxRange)
          return absl::ResourceExhaustedError("range() longer than 2^20 items");
        out.push_back(Value::Int(i));
        if (__builtin_add_overflow(i, step, &i)) break;
      }
      return Value::List(std::move(out));
    });
    return g;
  }

 private:
  absl::Status Write(const std::string& s) {
    if (out_->size() + s.size() > max_output_) {
      return absl::ResourceExhaustedError(
          absl::StrCat("the chat template renders more than ", max_output_, " bytes"));
    }
    *out_ += s;
    return absl::OkStatus();
  }

  absl::Status Step() {
    if (++steps_ > kMaxSteps) {
      return absl::ResourceExhaustedError(
          "the chat template takes more than 2^20 steps to render; it is refused");
    }
    return absl::OkStatus();
  }

  // Strings and lists an operation builds are bounded like the output.
  absl::StatusOr<Value> Bounded(Value v) {
    if (v.is_string() && v.text().size() > max_output_) {
      return absl::ResourceExhaustedError(
          absl::StrCat("the chat template builds a string of more than ", max_output_, " bytes"));
    }
    if (v.is_list() && static_cast<int64_t>(v.list().size()) > kMaxRange)
      return absl::ResourceExhaustedError(
          "the chat template builds a list of more than 2^20 items");
    return v;
  }

  absl::StatusOr<Flow> RenderNode(const Node& n, const ScopePtr& scope) {
    RETURN_IF_ERROR(Step());
    switch (n.kind) {
      case NodeKind::kRoot:
        return RenderBody(n.body, scope);
      case NodeKind::kText:
        RETURN_IF_ERROR(Write(n.text));
        return Flow::kNormal;
      case NodeKind::kOutput: {
        ASSIGN_OR_RETURN(Value v, Eval(*n.expr, scope));
        RETURN_IF_ERROR(Write(v.Str()));
        return Flow::kNormal;
      }
      case NodeKind::kIf:
        for (size_t i = 0; i < n.bodies.size(); ++i) {
          if (i < n.conditions.size()) {
            ASSIGN_OR_RETURN(Value c, Eval(*n.conditions[i], scope));
            if (!c.Truthy()) continue;
          }
          return RenderBody(n.bodies[i], scope);
        }
        return Flow::kNormal;
      case NodeKind::kFor:
        return For(n, scope);
      case NodeKind::kSet: {
        ASSIGN_OR_RETURN(Value v, Eval(*n.expr, scope));
        if (!n.text.empty()) {  // ns.attr = value
          const Value* ns = scope->Find(n.targets[0]);
          if (ns == nullptr || !ns->is_dict() || !ns->dict().is_namespace)
            return Error(n.line, "can only assign attributes of a namespace()");
          ns->mutable_dict().Set(n.text, v);
          return Flow::kNormal;
        }
        RETURN_IF_ERROR(Assign(n.targets, v, n.line, scope.get()));
        return Flow::kNormal;
      }
      case NodeKind::kSetBlock: {
        ASSIGN_OR_RETURN(std::string text, Capture(n.body, scope));
        Value v = Value::String(std::move(text));
        for (const ExprPtr& f : n.filters) {
          ASSIGN_OR_RETURN(v, ApplyFilter(*f, v, scope));
        }
        scope->vars[n.targets[0]] = v;
        return Flow::kNormal;
      }
      case NodeKind::kMacro:
        scope->vars[n.text] = MakeMacro(n, scope);
        return Flow::kNormal;
      case NodeKind::kCallBlock: {
        // The call's macro gets the block as its `caller` keyword.
        const Expr& call = *n.expr;
        ASSIGN_OR_RETURN(Value fn, Eval(*call.args[0], scope));
        CallArgs args;
        RETURN_IF_ERROR(EvalArgs(call, 1, scope, &args));
        args.keywords.emplace_back("caller", MakeMacro(n, scope, "caller"));
        ASSIGN_OR_RETURN(Value v, Call(fn, args, call.line));
        RETURN_IF_ERROR(Write(v.Str()));
        return Flow::kNormal;
      }
      case NodeKind::kBreak:
        return Flow::kBreak;
      case NodeKind::kContinue:
        return Flow::kContinue;
      case NodeKind::kGeneration: {  // transformers renders it as a call block: a scope of its own
        auto inner = std::make_shared<Scope>();
        inner->parent = scope;
        ASSIGN_OR_RETURN(std::string text, Capture(n.body, inner));
        RETURN_IF_ERROR(Write(text));
        return Flow::kNormal;
      }
    }
    return Flow::kNormal;
  }

  absl::StatusOr<std::string> Capture(const Body& body, const ScopePtr& scope) {
    std::string* saved = out_;
    std::string buffer;
    out_ = &buffer;
    absl::StatusOr<Flow> f = RenderBody(body, scope);
    out_ = saved;
    if (!f.ok()) return f.status();
    return buffer;
  }

  absl::Status Assign(const std::vector<std::string>& targets, const Value& v, int line,
                      Scope* scope) {
    if (targets.size() == 1) {
      scope->vars[targets[0]] = v;
      return absl::OkStatus();
    }
    ASSIGN_OR_RETURN(ValueList items, Iterate(v, line));
    if (items.size() != targets.size()) {
      return Error(line, absl::StrCat("cannot unpack ", items.size(), " values into ",
                                      targets.size(), " names"));
    }
    for (size_t i = 0; i < targets.size(); ++i) scope->vars[targets[i]] = items[i];
    return absl::OkStatus();
  }

  // A macro keeps its defining scope alive through the renderer (not through itself: the scope
  // holds the macro, and a cycle would leak).
  Value MakeMacro(const Node& n, const ScopePtr& scope_of_definition,
                  const std::string& name_override = "") {
    const Node* node = &n;
    const std::string name = name_override.empty() ? n.text : name_override;
    keep_alive_.push_back(scope_of_definition);
    Scope* defined_in_raw = scope_of_definition.get();
    return Value::MakeFunction(
        name, [this, node, defined_in_raw, name](CallArgs& a) -> absl::StatusOr<Value> {
          ScopePtr defined_in(keep_alive_.front(), defined_in_raw);  // aliasing: no ownership taken
          if (++depth_ > kMaxCallDepth) {
            --depth_;
            return absl::ResourceExhaustedError("chat template macros recurse too deeply");
          }
          auto scope = std::make_shared<Scope>();
          scope->parent = defined_in;
          const auto& params = node->targets;
          if (a.positional.size() > params.size()) {
            --depth_;
            return Error(node->line, absl::StrCat("macro '", name, "' takes ", params.size(),
                                                  " arguments, got ", a.positional.size()));
          }
          for (size_t i = 0; i < params.size(); ++i) {
            Value v;
            bool set = false;
            if (i < a.positional.size()) {
              v = a.positional[i];
              set = true;
            }
            for (const auto& [k, kv] : a.keywords) {
              if (k == params[i]) {
                v = kv;
                set = true;
              }
            }
            if (!set && node->defaults[i] != nullptr) {
              auto value = Eval(*node->defaults[i], scope);
              if (!value.ok()) {
                --depth_;
                return value.status();
              }
              v = *value;
            } else if (!set) {
              v = Value::Undefined(params[i]);
            }
            scope->vars[params[i]] = v;
          }
          for (const auto& [k, kv] : a.keywords) {
            if (std::find(params.begin(), params.end(), k) == params.end() && k != "caller") {
              --depth_;
              return Error(node->line,
                           absl::StrCat("macro '", name, "' has no argument '", k, "'"));
            }
            if (k == "caller") scope->vars["caller"] = kv;
          }
          auto text = Capture(node->body, scope);
          --depth_;
          if (!text.ok()) return text.status();
          return Value::String(*std::move(text));
        });
  }

  absl::StatusOr<Flow> For(const Node& n, const ScopePtr& scope) {
    ASSIGN_OR_RETURN(Value seq, Eval(*n.expr, scope));
    ASSIGN_OR_RETURN(ValueList items, Iterate(seq, n.line));
    if (n.cond != nullptr) {  // the filter runs before the loop: loop.length counts what passes
      ValueList kept;
      for (const Value& item : items) {
        auto probe = std::make_shared<Scope>();
        probe->parent = scope;
        RETURN_IF_ERROR(Assign(n.targets, item, n.line, probe.get()));
        ASSIGN_OR_RETURN(Value c, Eval(*n.cond, probe));
        if (c.Truthy()) kept.push_back(item);
      }
      items = std::move(kept);
    }
    const int64_t length = static_cast<int64_t>(items.size());
    for (int64_t i = 0; i < length; ++i) {
      RETURN_IF_ERROR(Step());
      auto iteration = std::make_shared<Scope>();
      iteration->parent = scope;
      RETURN_IF_ERROR(Assign(n.targets, items[i], n.line, iteration.get()));
      auto loop = std::make_shared<Dict>();
      loop->Set("index", Value::Int(i + 1));
      loop->Set("index0", Value::Int(i));
      loop->Set("revindex", Value::Int(length - i));
      loop->Set("revindex0", Value::Int(length - i - 1));
      loop->Set("first", Value::Bool(i == 0));
      loop->Set("last", Value::Bool(i == length - 1));
      loop->Set("length", Value::Int(length));
      loop->Set("depth", Value::Int(1));
      loop->Set("depth0", Value::Int(0));
      loop->Set("previtem", i > 0 ? items[i - 1] : Value::Undefined("previtem"));
      loop->Set("nextitem", i + 1 < length ? items[i + 1] : Value::Undefined("nextitem"));
      loop->Set("cycle", Value::MakeFunction("cycle", [i](CallArgs& a) -> absl::StatusOr<Value> {
                  if (a.positional.empty())
                    return absl::InvalidArgumentError("loop.cycle() needs arguments");
                  return a.positional[static_cast<size_t>(i) % a.positional.size()];
                }));
      iteration->vars["loop"] = Value::MakeDict(loop);
      ASSIGN_OR_RETURN(Flow f, RenderBody(n.body, iteration));
      if (f == Flow::kBreak) break;
    }
    if (length == 0) return RenderBody(n.else_body, scope);
    return Flow::kNormal;
  }

  absl::StatusOr<ValueList> Iterate(const Value& v, int line) {
    switch (v.kind()) {
      case Value::Kind::kUndefined:
        return ValueList{};
      case Value::Kind::kList:
        return v.list();
      case Value::Kind::kDict: {
        ValueList keys;
        for (const auto& [k, e] : v.dict().items) keys.push_back(Value::String(k));
        return keys;
      }
      case Value::Kind::kString: {
        ValueList chars;
        for (size_t i = 0; i < v.text().size();) {
          const size_t start = i;
          utf8::Next(v.text(), &i);
          chars.push_back(Value::String(v.text().substr(start, i - start)));
        }
        return chars;
      }
      default:
        return Error(line, absl::StrCat("'", v.TypeName(), "' object is not iterable"));
    }
  }

  absl::StatusOr<Value> GetAttr(const Value& obj, const std::string& name, int line) {
    if (obj.is_undefined()) {
      return Error(line,
                   absl::StrCat("'", obj.text().empty() ? name : obj.text(), "' is undefined"));
    }
    Value method = Method(obj, name, line);
    if (!method.is_undefined()) return method;
    if (obj.is_dict()) {
      const Value* v = obj.dict().Find(name);
      if (v != nullptr) return *v;
    }
    return Value::Undefined(absl::StrCat(obj.TypeName(), " object has no attribute ", name));
  }

  absl::StatusOr<Value> GetItem(const Value& obj, const Value& key, int line) {
    if (obj.is_undefined()) {
      return Error(line,
                   absl::StrCat("'", obj.text().empty() ? "value" : obj.text(), "' is undefined"));
    }
    if (obj.is_dict()) {
      if (key.is_string()) {
        const Value* v = obj.dict().Find(key.text());
        if (v != nullptr) return *v;
        return GetAttr(obj, key.text(), line);
      }
      return Value::Undefined(absl::StrCat("dict object has no element ", key.Repr()));
    }
    if ((obj.is_list() || obj.is_string()) &&
        (key.kind() == Value::Kind::kInt || key.kind() == Value::Kind::kBool)) {
      int64_t i = key.as_int();
      if (obj.is_list()) {
        if (!NormalizeIndex(&i, static_cast<int64_t>(obj.list().size())))
          return Value::Undefined("index");
        return obj.list()[i];
      }
      std::vector<int32_t> cps = CodePoints(obj.text());
      if (!NormalizeIndex(&i, static_cast<int64_t>(cps.size()))) return Value::Undefined("index");
      return Value::String(FromCodePoints(cps, i, i + 1));
    }
    if (key.is_string()) return GetAttr(obj, key.text(), line);
    return Value::Undefined("item");
  }

  absl::StatusOr<Value> Slice(const Value& obj, const Value& a, const Value& b, const Value& c,
                              int line) {
    auto as_int = [&](const Value& v, int64_t* out) -> absl::Status {
      if (v.is_none() || v.is_undefined()) return absl::OkStatus();
      if (v.kind() != Value::Kind::kInt && v.kind() != Value::Kind::kBool)
        return Error(line, "slice indices must be integers");
      *out = v.as_int();
      return absl::OkStatus();
    };
    int64_t step = 1;
    RETURN_IF_ERROR(as_int(c, &step));
    if (step == 0) return Error(line, "slice step cannot be zero");
    std::vector<int32_t> cps;
    int64_t n;
    if (obj.is_string()) {
      cps = CodePoints(obj.text());
      n = static_cast<int64_t>(cps.size());
    } else if (obj.is_list()) {
      n = static_cast<int64_t>(obj.list().size());
    } else {
      return Error(line, absl::StrCat("'", obj.TypeName(), "' object is not subscriptable"));
    }
    int64_t start = step > 0 ? 0 : n - 1, stop = step > 0 ? n : -n - 1;
    RETURN_IF_ERROR(as_int(a, &start));
    RETURN_IF_ERROR(as_int(b, &stop));
    auto clamp = [&](int64_t v, bool is_stop) {
      if (v < 0) v += n;
      if (step > 0) return std::clamp<int64_t>(v, 0, n);
      return std::clamp<int64_t>(v, -1, n - 1) + (is_stop ? 0 : 0);
    };
    if (!(a.is_none() || a.is_undefined())) start = clamp(start, false);
    if (!(b.is_none() || b.is_undefined()))
      stop = clamp(stop, true);
    else if (step < 0)
      stop = -1;
    std::vector<int64_t> picks;
    for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) picks.push_back(i);
    if (obj.is_string()) {
      std::string out;
      for (int64_t i : picks) utf8::Append(static_cast<uint32_t>(cps[i]), &out);
      return Value::String(out);
    }
    ValueList out;
    for (int64_t i : picks) out.push_back(obj.list()[i]);
    return Value::List(std::move(out), obj.is_tuple());
  }

  // Methods of str and dict (what templates call); undefined when there is none.
  // A string's or dict's method bound to it (undefined when it has none): StringMethods(),
  // DictMethods().
  Value Method(const Value& obj, const std::string& name, int line);

  absl::StatusOr<Value> Call(const Value& fn, CallArgs& args, int line) {
    RETURN_IF_ERROR(Step());
    if (!fn.is_function()) {
      if (fn.is_undefined())
        return Error(line,
                     absl::StrCat("'", fn.text().empty() ? "value" : fn.text(), "' is undefined"));
      return Error(line, absl::StrCat("'", fn.TypeName(), "' object is not callable"));
    }
    absl::StatusOr<Value> r = fn.function().call(args);
    if (r.ok()) return Bounded(*std::move(r));
    if (!r.ok() && absl::IsInvalidArgument(r.status()) &&
        r.status().message().find("chat template line") == absl::string_view::npos) {
      return Error(line, std::string(r.status().message()));
    }
    return r;
  }

  absl::Status EvalArgs(const Expr& e, size_t from, const ScopePtr& scope, CallArgs* out) {
    for (size_t i = from; i < e.args.size(); ++i) {
      ASSIGN_OR_RETURN(Value v, Eval(*e.args[i], scope));
      out->positional.push_back(std::move(v));
    }
    for (size_t i = 0; i < e.kwargs.size(); ++i) {
      ASSIGN_OR_RETURN(Value v, Eval(*e.kwargs[i], scope));
      out->keywords.emplace_back(e.kwnames[i], std::move(v));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<Value> Arith(const std::string& op, const Value& a, const Value& b, int line) {
    if (op == "~") return Value::String(a.Str() + b.Str());
    const bool ints = (a.kind() == Value::Kind::kInt || a.kind() == Value::Kind::kBool) &&
                      (b.kind() == Value::Kind::kInt || b.kind() == Value::Kind::kBool);
    const bool nums = a.is_number() || a.kind() == Value::Kind::kBool;
    const bool bnums = b.is_number() || b.kind() == Value::Kind::kBool;
    // Python's integers are unbounded; ours are int64 and say so rather than wrap.
    auto overflow = [&] {
      return absl::UnimplementedError(
          absl::StrCat("chat template line ", line, ": integer ", op,
                       " overflows 64 bits (Python would use a big integer)"));
    };
    auto type_error = [&] {
      return Error(line, absl::StrCat("unsupported operand types for ", op, ": '", a.TypeName(),
                                      "' and '", b.TypeName(), "'"));
    };
    if (op == "+") {
      if (a.is_string() && b.is_string()) return Value::String(a.text() + b.text());
      if (a.is_list() && b.is_list() && a.is_tuple() == b.is_tuple()) {
        ValueList out = a.list();
        out.insert(out.end(), b.list().begin(), b.list().end());
        return Value::List(std::move(out), a.is_tuple());
      }
      int64_t r;
      if (ints)
        return __builtin_add_overflow(a.as_int(), b.as_int(), &r)
                   ? overflow()
                   : absl::StatusOr<Value>(Value::Int(r));
      if (nums && bnums) return Value::Float(a.as_double() + b.as_double());
      return type_error();
    }
    if (op == "-") {
      int64_t r;
      if (ints)
        return __builtin_sub_overflow(a.as_int(), b.as_int(), &r)
                   ? overflow()
                   : absl::StatusOr<Value>(Value::Int(r));
      if (nums && bnums) return Value::Float(a.as_double() - b.as_double());
      return type_error();
    }
    if (op == "*") {
      int64_t r;
      if (ints)
        return __builtin_mul_overflow(a.as_int(), b.as_int(), &r)
                   ? overflow()
                   : absl::StatusOr<Value>(Value::Int(r));
      if ((a.is_string() || a.is_list()) && (b.kind() == Value::Kind::kInt)) {
        const int64_t n = std::max<int64_t>(0, b.as_int());
        if (a.is_string()) {
          if (static_cast<double>(a.text().size()) * n > static_cast<double>(max_output_))
            return absl::ResourceExhaustedError("string repetition too large");
          std::string out;
          for (int64_t i = 0; i < n; ++i) out += a.text();
          return Value::String(out);
        }
        if (static_cast<double>(a.list().size()) * n > kMaxRange)
          return absl::ResourceExhaustedError("list repetition too large");
        ValueList out;
        for (int64_t i = 0; i < n; ++i) out.insert(out.end(), a.list().begin(), a.list().end());
        return Value::List(std::move(out), a.is_tuple());
      }
      if (nums && bnums) return Value::Float(a.as_double() * b.as_double());
      return type_error();
    }
    if (op == "/" || op == "//" || op == "%") {
      if (!(nums && bnums)) return type_error();
      if (b.as_double() == 0) return Error(line, "division by zero");
      if (op == "/") return Value::Float(a.as_double() / b.as_double());
      if (ints) {
        const int64_t x = a.as_int(), y = b.as_int();
        if (x == INT64_MIN && y == -1) return overflow();
        int64_t q = x / y, r = x % y;
        if (r != 0 && ((r < 0) != (y < 0))) {
          --q;
          r += y;
        }
        return Value::Int(op == "//" ? q : r);
      }
      const double x = a.as_double(), y = b.as_double();
      const double q = std::floor(x / y);
      return Value::Float(op == "//" ? q : x - q * y);
    }
    if (op == "**") {
      if (ints && b.as_int() >= 0) {
        int64_t r = 1;
        for (int64_t i = 0;
             i < b.as_int() && r != 0 && !(r == 1 && (a.as_int() == 1 || a.as_int() == 0)); ++i) {
          if (__builtin_mul_overflow(r, a.as_int(), &r)) return overflow();
        }
        if (a.as_int() == 0 && b.as_int() > 0) r = 0;
        return Value::Int(r);
      }
      if (nums && bnums) return Value::Float(std::pow(a.as_double(), b.as_double()));
      return type_error();
    }
    return type_error();
  }

  // <, <=, >, >= with Python's rules: numbers, strings, lists.
  absl::StatusOr<int> Order(const Value& a, const Value& b, int line) {
    const bool an = a.is_number() || a.kind() == Value::Kind::kBool;
    const bool bn = b.is_number() || b.kind() == Value::Kind::kBool;
    if (an && bn) {
      const double x = a.as_double(), y = b.as_double();
      return x < y ? -1 : x > y ? 1 : 0;
    }
    if (a.is_string() && b.is_string())
      return a.text() < b.text() ? -1 : a.text() > b.text() ? 1 : 0;
    if (a.is_list() && b.is_list()) {
      for (size_t i = 0; i < a.list().size() && i < b.list().size(); ++i) {
        if (!a.list()[i].Equals(b.list()[i])) return Order(a.list()[i], b.list()[i], line);
      }
      return a.list().size() < b.list().size() ? -1 : a.list().size() > b.list().size() ? 1 : 0;
    }
    return Error(line, absl::StrCat("'<' not supported between instances of '", a.TypeName(),
                                    "' and '", b.TypeName(), "'"));
  }

  absl::StatusOr<bool> Contains(const Value& container, const Value& item, int line) {
    if (container.is_string()) {
      if (!item.is_string())
        return Error(line, absl::StrCat("'in <string>' requires string as left operand, not ",
                                        item.TypeName()));
      return container.text().find(item.text()) != std::string::npos;
    }
    if (container.is_dict())
      return item.is_string() && container.dict().Find(item.text()) != nullptr;
    if (container.is_list()) {
      for (const Value& v : container.list()) {
        if (v.Equals(item)) return true;
      }
      return false;
    }
    if (container.is_undefined()) return false;
    return Error(line,
                 absl::StrCat("argument of type '", container.TypeName(), "' is not iterable"));
  }

  absl::StatusOr<bool> Compare(const std::string& op, const Value& a, const Value& b, int line) {
    if (op == "==") return a.Equals(b);
    if (op == "!=") return !a.Equals(b);
    if (op == "in") return Contains(b, a, line);
    if (op == "notin") {
      ASSIGN_OR_RETURN(bool in, Contains(b, a, line));
      return !in;
    }
    ASSIGN_OR_RETURN(int c, Order(a, b, line));
    if (op == "<") return c < 0;
    if (op == "<=") return c <= 0;
    if (op == ">") return c > 0;
    return c >= 0;
  }

  absl::StatusOr<Value> Eval(const Expr& e, const ScopePtr& scope) {
    switch (e.kind) {
      case ExprKind::kLiteral:
        return e.literal;
      case ExprKind::kName: {
        const Value* v = scope->Find(e.name);
        return v != nullptr ? *v : Value::Undefined(e.name);
      }
      case ExprKind::kAttr: {
        ASSIGN_OR_RETURN(Value obj, Eval(*e.args[0], scope));
        return GetAttr(obj, e.name, e.line);
      }
      case ExprKind::kItem: {
        ASSIGN_OR_RETURN(Value obj, Eval(*e.args[0], scope));
        ASSIGN_OR_RETURN(Value key, Eval(*e.args[1], scope));
        return GetItem(obj, key, e.line);
      }
      case ExprKind::kSlice: {
        ASSIGN_OR_RETURN(Value obj, Eval(*e.args[0], scope));
        Value parts[3];
        for (int k = 0; k < 3; ++k) {
          if (e.args[k + 1] != nullptr) {
            ASSIGN_OR_RETURN(parts[k], Eval(*e.args[k + 1], scope));
          } else {
            parts[k] = Value::None();
          }
        }
        if (obj.is_undefined())
          return Error(e.line, absl::StrCat("'", obj.text(), "' is undefined"));
        return Slice(obj, parts[0], parts[1], parts[2], e.line);
      }
      case ExprKind::kCall: {
        ASSIGN_OR_RETURN(Value fn, Eval(*e.args[0], scope));
        CallArgs args;
        RETURN_IF_ERROR(EvalArgs(e, 1, scope, &args));
        return Call(fn, args, e.line);
      }
      case ExprKind::kFilter: {
        ASSIGN_OR_RETURN(Value v, Eval(*e.args[0], scope));
        return ApplyFilter(e, v, scope);
      }
      case ExprKind::kTest: {
        ASSIGN_OR_RETURN(Value v, Eval(*e.args[0], scope));
        CallArgs args;
        RETURN_IF_ERROR(EvalArgs(e, 1, scope, &args));
        ASSIGN_OR_RETURN(bool r, Test(e.name, v, args, e.line));
        return Value::Bool(r != e.negated);
      }
      case ExprKind::kNeg:
      case ExprKind::kPos: {
        ASSIGN_OR_RETURN(Value v, Eval(*e.args[0], scope));
        if (v.kind() == Value::Kind::kInt || v.kind() == Value::Kind::kBool) {
          if (e.kind == ExprKind::kNeg && v.as_int() == INT64_MIN)
            return absl::UnimplementedError(absl::StrCat("chat template line ", e.line,
                                                         ": integer negation overflows 64 bits"));
          return Value::Int(e.kind == ExprKind::kNeg ? -v.as_int() : v.as_int());
        }
        if (v.kind() == Value::Kind::kFloat)
          return Value::Float(e.kind == ExprKind::kNeg ? -v.as_double() : v.as_double());
        return Error(e.line, absl::StrCat("bad operand type for unary -: '", v.TypeName(), "'"));
      }
      case ExprKind::kNot: {
        ASSIGN_OR_RETURN(Value v, Eval(*e.args[0], scope));
        return Value::Bool(!v.Truthy());
      }
      case ExprKind::kAnd:
      case ExprKind::kOr: {
        ASSIGN_OR_RETURN(Value a, Eval(*e.args[0], scope));
        if (a.Truthy() == (e.kind == ExprKind::kOr)) return a;
        return Eval(*e.args[1], scope);
      }
      case ExprKind::kBinary: {
        ASSIGN_OR_RETURN(Value a, Eval(*e.args[0], scope));
        ASSIGN_OR_RETURN(Value b, Eval(*e.args[1], scope));
        ASSIGN_OR_RETURN(Value r, Arith(e.name, a, b, e.line));
        return Bounded(std::move(r));
      }
      case ExprKind::kCompare: {
        ASSIGN_OR_RETURN(Value left, Eval(*e.args[0], scope));
        for (size_t i = 0; i < e.ops.size(); ++i) {
          ASSIGN_OR_RETURN(Value right, Eval(*e.args[i + 1], scope));
          ASSIGN_OR_RETURN(bool ok, Compare(e.ops[i], left, right, e.line));
          if (!ok) return Value::Bool(false);
          left = std::move(right);
        }
        return Value::Bool(true);
      }
      case ExprKind::kCond: {
        ASSIGN_OR_RETURN(Value c, Eval(*e.args[0], scope));
        if (c.Truthy()) return Eval(*e.args[1], scope);
        if (e.args[2] == nullptr) return Value::Undefined("conditional expression");
        return Eval(*e.args[2], scope);
      }
      case ExprKind::kList:
      case ExprKind::kTuple: {
        ValueList items;
        for (const ExprPtr& a : e.args) {
          ASSIGN_OR_RETURN(Value v, Eval(*a, scope));
          items.push_back(std::move(v));
        }
        return Value::List(std::move(items), e.kind == ExprKind::kTuple);
      }
      case ExprKind::kDict: {
        auto d = std::make_shared<Dict>();
        for (size_t i = 0; i + 1 < e.args.size(); i += 2) {
          ASSIGN_OR_RETURN(Value k, Eval(*e.args[i], scope));
          ASSIGN_OR_RETURN(Value v, Eval(*e.args[i + 1], scope));
          if (!k.is_string())
            return Error(e.line, "dict keys other than strings are not supported");
          d->Set(k.text(), std::move(v));
        }
        return Value::MakeDict(d);
      }
    }
    return Value();
  }

  absl::StatusOr<bool> Test(const std::string& name, const Value& v, CallArgs& a, int line) {
    const Value arg = a.positional.empty() ? Value() : a.positional[0];
    const auto k = v.kind();
    if (name == "defined") return !v.is_undefined();
    if (name == "undefined") return v.is_undefined();
    if (name == "none") return v.is_none();
    if (name == "string") return v.is_string();
    if (name == "number") return v.is_number() || k == Value::Kind::kBool;
    if (name == "integer") return k == Value::Kind::kInt;
    if (name == "float") return k == Value::Kind::kFloat;
    if (name == "boolean") return k == Value::Kind::kBool;
    if (name == "true") return k == Value::Kind::kBool && v.as_bool();
    if (name == "false") return k == Value::Kind::kBool && !v.as_bool();
    if (name == "mapping") return v.is_dict();
    if (name == "iterable") return v.is_list() || v.is_dict() || v.is_string() || v.is_undefined();
    if (name == "sequence") return v.is_list() || v.is_dict() || v.is_string();
    if (name == "callable") return v.is_function();
    if (name == "escaped") return false;
    if (name == "lower" || name == "upper") {
      if (!v.is_string()) return false;
      return MapCase(v.text(), name == "upper") == v.text() &&
             MapCase(v.text(), name != "upper") != v.text();
    }
    if (name == "odd" || name == "even" || name == "divisibleby") {
      if (k != Value::Kind::kInt && k != Value::Kind::kBool)
        return Error(line, absl::StrCat("test '", name, "' needs an integer"));
      if (name == "divisibleby") {
        if (arg.as_int() == 0) return Error(line, "divisibleby 0");
        if (arg.as_int() == -1) return true;
        return v.as_int() % arg.as_int() == 0;
      }
      return ((v.as_int() % 2) != 0) == (name == "odd");
    }
    if (name == "eq" || name == "equalto" || name == "==") return v.Equals(arg);
    if (name == "ne" || name == "!=") return !v.Equals(arg);
    if (name == "sameas") {
      if (v.is_none() || arg.is_none() || k == Value::Kind::kBool)
        return v.kind() == arg.kind() && v.Equals(arg);
      if (v.is_dict() && arg.is_dict()) return v.dict_ptr() == arg.dict_ptr();
      return false;
    }
    if (name == "in") return Contains(arg, v, line);
    if (name == "lt" || name == "lessthan" || name == "<" || name == "le" || name == "<=" ||
        name == "gt" || name == "greaterthan" || name == ">" || name == "ge" || name == ">=") {
      ASSIGN_OR_RETURN(int c, Order(v, arg, line));
      if (name == "lt" || name == "lessthan" || name == "<") return c < 0;
      if (name == "le" || name == "<=") return c <= 0;
      if (name == "gt" || name == "greaterthan" || name == ">") return c > 0;
      return c >= 0;
    }
    return absl::UnimplementedError(
        absl::StrCat("chat template line ", line, ": test '", name, "'"));
  }

  // An item's attribute for selectattr/map/join/sort: dotted paths, digits as indices.
  absl::StatusOr<Value> AttrPath(const Value& item, const std::string& path, int line) {
    Value v = item;
    size_t pos = 0;
    while (pos <= path.size()) {
      const size_t dot = path.find('.', pos);
      const std::string part =
          path.substr(pos, dot == std::string::npos ? std::string::npos : dot - pos);
      if (v.is_undefined()) return v;
      int64_t index = 0;
      const bool digits = !part.empty() && std::all_of(part.begin(), part.end(), ::isdigit) &&
                          absl::SimpleAtoi(part, &index);
      ASSIGN_OR_RETURN(
          v, digits ? GetItem(v, Value::Int(index), line) : GetItem(v, Value::String(part), line));
      if (dot == std::string::npos) break;
      pos = dot + 1;
    }
    return v;
  }

  absl::StatusOr<Value> ApplyFilter(const Expr& e, const Value& v, const ScopePtr& scope) {
    RETURN_IF_ERROR(Step());
    CallArgs raw;
    RETURN_IF_ERROR(EvalArgs(e, 1, scope, &raw));
    ASSIGN_OR_RETURN(Value r, Filter(e.name, v, raw, e.line));
    return Bounded(std::move(r));
  }

  // The filter `name` (Filters()) applied to `v`.
  absl::StatusOr<Value> Filter(const std::string& name, const Value& v, CallArgs& raw, int line);

  // The tables of builtins (below the class) and the bodies several rows share.
  static const BuiltinTable& StringMethods();
  static const BuiltinTable& DictMethods();
  static const BuiltinTable& Filters();
  static absl::StatusOr<Value> Affix(Renderer&, const Value& s, const Args& a);
  static absl::StatusOr<Value> IsClass(Renderer&, const Value& s, const Args& a);
  static absl::StatusOr<Value> Length(Renderer&, const Value& v, const Args& a);
  static absl::StatusOr<Value> Escape(Renderer&, const Value& v, const Args& a);
  static absl::StatusOr<Value> Default(Renderer&, const Value& v, const Args& a);
  static absl::StatusOr<Value> SelectOrReject(Renderer& r, const Value& v, const Args& a);
  static absl::StatusOr<Value> MinOrMax(Renderer& r, const Value& v, const Args& a);
  absl::StatusOr<Value> SortKey(const Value& item, const Value& attribute, bool case_sensitive,
                                int line);

  std::string* out_;
  size_t max_output_;
  int depth_ = 0;
  int64_t steps_ = 0;
  std::vector<ScopePtr> keep_alive_;
};

// -- methods: Python's str and dict methods chat templates call --------------------------------

const BuiltinTable& Renderer::StringMethods() {
  using R = absl::StatusOr<Value>;
  static const BuiltinTable table = MakeTable({
      {"strip",
       {"chars"},
       kFixed,
       [](Renderer&, const Value& s, const Args& a) -> R {
         return Value::String(PyStrip(s.text(), a.Get("chars"), true, true));
       }},
      {"lstrip",
       {"chars"},
       kFixed,
       [](Renderer&, const Value& s, const Args& a) -> R {
         return Value::String(PyStrip(s.text(), a.Get("chars"), true, false));
       }},
      {"rstrip",
       {"chars"},
       kFixed,
       [](Renderer&, const Value& s, const Args& a) -> R {
         return Value::String(PyStrip(s.text(), a.Get("chars"), false, true));
       }},
      {"split",
       {"sep", "maxsplit"},
       kFixed,
       [](Renderer&, const Value& s, const Args& a) -> R {
         const Value sep = a.Get("sep", Value::None());
         if (sep.is_string() && sep.text().empty())
           return Error(a.line(), "split(): empty separator");
         return Value::List(PySplit(s.text(), sep, a.Get("maxsplit", Value::Int(-1)).as_int()));
       }},
      {"startswith", {"prefix"}, kFixed, &Affix},
      {"endswith", {"suffix"}, kFixed, &Affix},
      {"upper",
       {},
       kFixed,
       [](Renderer&, const Value& s, const Args&) -> R {
         return Value::String(MapCase(s.text(), true));
       }},
      {"lower",
       {},
       kFixed,
       [](Renderer&, const Value& s, const Args&) -> R {
         return Value::String(MapCase(s.text(), false));
       }},
      {"title",
       {},
       kFixed,
       [](Renderer&, const Value& s, const Args&) -> R {
         return Value::String(PyTitle(s.text()));
       }},
      {"capitalize",
       {},
       kFixed,
       [](Renderer&, const Value& s, const Args&) -> R {
         return Value::String(PyCapitalize(s.text()));
       }},
      {"replace",
       {"old", "new", "count"},
       kFixed,
       [](Renderer&, const Value& s, const Args& a) -> R {
         const Value from = a.Get("old"), to = a.Get("new"), count = a.Get("count", Value::None());
         if (!from.is_string() || !to.is_string())
           return Error(a.line(), "replace() takes two strings");
         return Value::String(
             PyReplace(s.text(), from.text(), to.text(), count.is_none() ? -1 : count.as_int()));
       }},
      {"find",
       {"sub"},
       kFixed,
       [](Renderer&, const Value& s, const Args& a) -> R {
         const Value sub = a.Get("sub");
         if (!sub.is_string()) return Error(a.line(), "find() takes a string");
         const size_t at = s.text().find(sub.text());
         return Value::Int(at == std::string::npos ? -1 : StrLen(s.text().substr(0, at)));
       }},
      {"count",
       {"sub"},
       kFixed,
       [](Renderer&, const Value& s, const Args& a) -> R {
         const Value sub_v = a.Get("sub");
         if (!sub_v.is_string()) return Error(a.line(), "count() takes a string");
         const std::string &text = s.text(), &sub = sub_v.text();
         if (sub.empty()) return Value::Int(StrLen(text) + 1);
         int64_t n = 0;
         for (size_t at = text.find(sub); at != std::string::npos;
              at = text.find(sub, at + sub.size()))
           ++n;
         return Value::Int(n);
       }},
      {"join",
       {"iterable"},
       kFixed,
       [](Renderer& r, const Value& s, const Args& a) -> R {
         if (a.positional().empty() && a.raw().keywords.empty())
           return Error(a.line(), "join() takes an iterable");
         ASSIGN_OR_RETURN(ValueList items, r.Iterate(a.Get("iterable"), a.line()));
         std::string out;
         for (size_t i = 0; i < items.size(); ++i) {
           if (!items[i].is_string())
             return Error(a.line(), "join(): sequence item is not a string");
           if (i > 0) out += s.text();
           out += items[i].text();
         }
         return Value::String(out);
       }},
      {"splitlines",
       {},
       kFixed,
       [](Renderer&, const Value& s, const Args&) -> R {
         return Value::List(SplitLines(s.text()));
       }},
      {"isdigit", {}, kFixed, &IsClass},
      {"isspace", {}, kFixed, &IsClass},
      {"isalpha", {}, kFixed, &IsClass},
      {"isalnum", {}, kFixed, &IsClass},
  });
  return table;
}

const BuiltinTable& Renderer::DictMethods() {
  using R = absl::StatusOr<Value>;
  static const BuiltinTable table = MakeTable({
      {"items",
       {},
       kFixed,
       [](Renderer&, const Value& d, const Args&) -> R { return Value::List(DictItems(d)); }},
      {"keys",
       {},
       kFixed,
       [](Renderer&, const Value& d, const Args&) -> R {
         ValueList out;
         for (const auto& [k, v] : d.dict().items) out.push_back(Value::String(k));
         return Value::List(std::move(out));
       }},
      {"values",
       {},
       kFixed,
       [](Renderer&, const Value& d, const Args&) -> R {
         ValueList out;
         for (const auto& [k, v] : d.dict().items) out.push_back(v);
         return Value::List(std::move(out));
       }},
      {"get",
       {"key", "default"},
       kFixed,
       [](Renderer&, const Value& d, const Args& a) -> R {
         if (a.positional().empty()) return Error(a.line(), "get() takes a key");
         const Value key = a.Get("key");
         const Value* v = key.is_string() ? d.dict().Find(key.text()) : nullptr;
         if (v != nullptr) return *v;
         return a.Get("default", Value::None());
       }},
  });
  return table;
}

Value Renderer::Method(const Value& obj, const std::string& name, int line) {
  const BuiltinTable* table = obj.is_string()                             ? &StringMethods()
                              : obj.is_dict() && !obj.dict().is_namespace ? &DictMethods()
                                                                          : nullptr;
  if (table == nullptr) return Value();
  const auto row = table->find(name);
  if (row == table->end()) return Value();
  const Builtin* b = &row->second;
  return Value::MakeFunction(name, [this, obj, b, line](CallArgs& call) -> absl::StatusOr<Value> {
    Args a(call, *b, line);
    RETURN_IF_ERROR(a.Check());
    return b->fn(*this, obj, a);
  });
}

// -- filters: jinja2's, as chat templates use them (tojson as transformers defines it) ----------

const BuiltinTable& Renderer::Filters() {
  using R = absl::StatusOr<Value>;
  static const BuiltinTable table = MakeTable({
      {"tojson",
       {"ensure_ascii", "indent", "separators", "sort_keys"},
       kFixed,
       [](Renderer&, const Value& v, const Args& a) -> R {
         const Value indent = a.Get("indent", Value::None());
         const Value seps = a.Get("separators", Value::None());
         const int ind = indent.is_none() ? -1 : static_cast<int>(indent.as_int());
         std::string item_sep = ind >= 0 ? "," : ", ", key_sep = ": ";
         if (seps.is_list() && seps.list().size() == 2) {
           item_sep = seps.list()[0].Str();
           key_sep = seps.list()[1].Str();
         }
         auto json =
             ToJson(v, ind, item_sep, key_sep, a.Get("sort_keys", Value::Bool(false)).Truthy());
         if (!json.ok()) return Error(a.line(), std::string(json.status().message()));
         return Value::String(*json);
       }},
      {"trim",
       {"chars"},
       kFixed,
       [](Renderer&, const Value& v, const Args& a) -> R {
         return Value::String(PyStrip(v.Str(), a.Get("chars"), true, true));
       }},
      {"length", {}, kFixed, &Length},
      {"count", {}, kFixed, &Length},
      {"upper",
       {},
       kFixed,
       [](Renderer&, const Value& v, const Args&) -> R {
         return Value::String(MapCase(v.Str(), true));
       }},
      {"lower",
       {},
       kFixed,
       [](Renderer&, const Value& v, const Args&) -> R {
         return Value::String(MapCase(v.Str(), false));
       }},
      {"title",
       {},
       kFixed,
       [](Renderer&, const Value& v, const Args&) -> R {
         return Value::String(JinjaTitle(v.Str()));
       }},
      {"capitalize",
       {},
       kFixed,
       [](Renderer&, const Value& v, const Args&) -> R {
         return Value::String(PyCapitalize(v.Str()));
       }},
      {"replace",
       {"old", "new", "count"},
       kFixed,
       [](Renderer&, const Value& v, const Args& a) -> R {
         const Value count = a.Get("count", Value::None());
         return Value::String(PyReplace(v.Str(), a.Get("old").Str(), a.Get("new").Str(),
                                        count.is_none() ? -1 : count.as_int()));
       }},
      {"string",
       {},
       kFixed,
       [](Renderer&, const Value& v, const Args&) -> R { return Value::String(v.Str()); }},
      {"safe", {}, kFixed, [](Renderer&, const Value& v, const Args&) -> R { return v; }},
      {"e", {}, kFixed, &Escape},
      {"escape", {}, kFixed, &Escape},
      {"default", {"default_value", "boolean"}, kFixed, &Default},
      {"d", {"default_value", "boolean"}, kFixed, &Default},
      {"first",
       {},
       kFixed,
       [](Renderer& r, const Value& v, const Args& a) -> R {
         ASSIGN_OR_RETURN(ValueList items, r.Iterate(v, a.line()));
         if (items.empty()) return Value::Undefined("no first item");
         return items.front();
       }},
      {"last",
       {},
       kFixed,
       [](Renderer& r, const Value& v, const Args& a) -> R {
         ASSIGN_OR_RETURN(ValueList items, r.Iterate(v, a.line()));
         if (items.empty()) return Value::Undefined("no last item");
         return items.back();
       }},
      {"items",
       {},
       kFixed,
       [](Renderer&, const Value& v, const Args& a) -> R {
         if (v.is_undefined()) return Value::List({});
         if (!v.is_dict()) return Error(a.line(), "items filter needs a mapping");
         return Value::List(DictItems(v));
       }},
      {"list",
       {},
       kFixed,
       [](Renderer& r, const Value& v, const Args& a) -> R {
         ASSIGN_OR_RETURN(ValueList items, r.Iterate(v, a.line()));
         return Value::List(std::move(items));
       }},
      {"join",
       {"d", "attribute"},
       kFixed,
       [](Renderer& r, const Value& v, const Args& a) -> R {
         ASSIGN_OR_RETURN(ValueList items, r.Iterate(v, a.line()));
         const std::string sep = a.Get("d", Value::String("")).Str();
         const Value attribute = a.Get("attribute", Value::None());
         std::string out;
         for (size_t i = 0; i < items.size(); ++i) {
           Value item = items[i];
           if (!attribute.is_none()) {
             ASSIGN_OR_RETURN(item, r.AttrPath(item, attribute.Str(), a.line()));
           }
           if (i > 0) out += sep;
           out += item.Str();
         }
         return Value::String(out);
       }},
      {"selectattr", {}, kVariadic, &SelectOrReject},
      {"rejectattr", {}, kVariadic, &SelectOrReject},
      {"select", {}, kVariadic, &SelectOrReject},
      {"reject", {}, kVariadic, &SelectOrReject},
      {"map",
       {"attribute", "default"},
       kVariadic,
       [](Renderer& r, const Value& v, const Args& a) -> R {
         ASSIGN_OR_RETURN(ValueList items, r.Iterate(v, a.line()));
         ValueList out;
         const Value attribute = a.Get("attribute", Value::None());
         if (!attribute.is_none()) {
           const Value fallback = a.Get("default");
           for (const Value& item : items) {
             ASSIGN_OR_RETURN(Value x, r.AttrPath(item, attribute.Str(), a.line()));
             out.push_back(x.is_undefined() && !fallback.is_undefined() ? fallback : x);
           }
           return Value::List(std::move(out));
         }
         if (a.positional().empty())
           return Error(a.line(), "map needs a filter name or attribute=");
         const std::string filter = a.positional()[0].Str();
         CallArgs rest;
         rest.positional.assign(a.positional().begin() + 1, a.positional().end());
         rest.keywords = a.raw().keywords;
         for (const Value& item : items) {
           CallArgs copy = rest;
           ASSIGN_OR_RETURN(Value x, r.Filter(filter, item, copy, a.line()));
           out.push_back(std::move(x));
         }
         return Value::List(std::move(out));
       }},
      {"int",
       {"default", "base"},
       kFixed,
       [](Renderer&, const Value& v, const Args& a) -> R {
         const Value fallback = a.Get("default", Value::Int(0));
         if (v.kind() == Value::Kind::kInt || v.kind() == Value::Kind::kBool)
           return Value::Int(v.as_int());
         if (v.kind() == Value::Kind::kFloat) {
           if (!(std::fabs(v.as_double()) < 9.2e18)) return fallback;
           return Value::Int(static_cast<int64_t>(v.as_double()));
         }
         if (v.is_string()) {
           const int64_t base = a.Get("base", Value::Int(10)).as_int();
           char* end = nullptr;
           const std::string s = PyStrip(v.text(), Value(), true, true);
           if (base == 0 || (base >= 2 && base <= 36)) {
             errno = 0;
             const long long n = std::strtoll(s.c_str(), &end, static_cast<int>(base));
             if (!s.empty() && end != nullptr && *end == '\0' && errno == 0) return Value::Int(n);
           }
           const double d = std::strtod(s.c_str(), &end);
           if (!s.empty() && end != nullptr && *end == '\0' && std::fabs(d) < 9.2e18)
             return Value::Int(static_cast<int64_t>(d));
         }
         return fallback;
       }},
      {"float",
       {"default"},
       kFixed,
       [](Renderer&, const Value& v, const Args& a) -> R {
         const Value fallback = a.Get("default", Value::Float(0));
         if (v.is_number() || v.kind() == Value::Kind::kBool) return Value::Float(v.as_double());
         if (v.is_string()) {
           char* end = nullptr;
           const std::string s = PyStrip(v.text(), Value(), true, true);
           const double d = std::strtod(s.c_str(), &end);
           if (!s.empty() && end != nullptr && *end == '\0') return Value::Float(d);
         }
         return fallback;
       }},
      {"abs",
       {},
       kFixed,
       [](Renderer&, const Value& v, const Args& a) -> R {
         if (v.kind() == Value::Kind::kInt || v.kind() == Value::Kind::kBool) {
           if (v.as_int() == INT64_MIN) return Error(a.line(), "abs overflows 64 bits");
           return Value::Int(std::abs(v.as_int()));
         }
         if (v.kind() == Value::Kind::kFloat) return Value::Float(std::fabs(v.as_double()));
         return Error(a.line(), "abs needs a number");
       }},
      {"round",
       {"precision", "method"},
       kFixed,
       [](Renderer&, const Value& v, const Args& a) -> R {
         const int64_t precision = a.Get("precision", Value::Int(0)).as_int();
         const std::string method = a.Get("method", Value::String("common")).Str();
         const double scale = std::pow(10.0, static_cast<double>(precision));
         double x = v.as_double() * scale;
         // Python's round(): halves to even.
         x = method == "ceil"    ? std::ceil(x)
             : method == "floor" ? std::floor(x)
                                 : std::nearbyint(x);
         return Value::Float(x / scale);
       }},
      {"unique",
       {"case_sensitive", "attribute"},
       kFixed,
       [](Renderer& r, const Value& v, const Args& a) -> R {
         ASSIGN_OR_RETURN(ValueList items, r.Iterate(v, a.line()));
         const bool case_sensitive = a.Get("case_sensitive", Value::Bool(false)).Truthy();
         const Value attribute = a.Get("attribute", Value::None());
         ValueList out, seen;
         for (const Value& item : items) {
           ASSIGN_OR_RETURN(Value key, r.SortKey(item, attribute, case_sensitive, a.line()));
           bool again = false;
           for (const Value& s : seen) again |= key.Equals(s);
           if (again) continue;
           seen.push_back(key);
           out.push_back(item);
         }
         return Value::List(std::move(out));
       }},
      {"reverse",
       {},
       kFixed,
       [](Renderer& r, const Value& v, const Args& a) -> R {
         if (v.is_string()) {
           std::vector<int32_t> cps = CodePoints(v.text());
           std::reverse(cps.begin(), cps.end());
           return Value::String(FromCodePoints(cps, 0, cps.size()));
         }
         ASSIGN_OR_RETURN(ValueList items, r.Iterate(v, a.line()));
         std::reverse(items.begin(), items.end());
         return Value::List(std::move(items));
       }},
      {"sort",
       {"reverse", "case_sensitive", "attribute"},
       kFixed,
       [](Renderer& r, const Value& v, const Args& a) -> R {
         ASSIGN_OR_RETURN(ValueList items, r.Iterate(v, a.line()));
         const bool reverse = a.Get("reverse", Value::Bool(false)).Truthy();
         const bool case_sensitive = a.Get("case_sensitive", Value::Bool(false)).Truthy();
         const Value attribute = a.Get("attribute", Value::None());
         std::vector<std::pair<Value, Value>> keyed;
         for (const Value& item : items) {
           ASSIGN_OR_RETURN(Value key, r.SortKey(item, attribute, case_sensitive, a.line()));
           keyed.emplace_back(key, item);
         }
         absl::Status failed;
         std::stable_sort(keyed.begin(), keyed.end(), [&](const auto& x, const auto& y) {
           auto c = r.Order(x.first, y.first, a.line());
           if (!c.ok()) {
             failed = c.status();
             return false;
           }
           return reverse ? *c > 0 : *c < 0;
         });
         if (!failed.ok()) return failed;
         ValueList out;
         for (auto& [k, item] : keyed) out.push_back(item);
         return Value::List(std::move(out));
       }},
      {"sum",
       {"attribute", "start"},
       kFixed,
       [](Renderer& r, const Value& v, const Args& a) -> R {
         ASSIGN_OR_RETURN(ValueList items, r.Iterate(v, a.line()));
         const Value attribute = a.Get("attribute", Value::None());
         Value total = a.Get("start", Value::Int(0));
         for (const Value& item : items) {
           Value x = item;
           if (!attribute.is_none()) {
             ASSIGN_OR_RETURN(x, r.AttrPath(item, attribute.Str(), a.line()));
           }
           ASSIGN_OR_RETURN(total, r.Arith("+", total, x, a.line()));
         }
         return total;
       }},
      {"min", {"case_sensitive", "attribute"}, kFixed, &MinOrMax},
      {"max", {"case_sensitive", "attribute"}, kFixed, &MinOrMax},
      {"indent",
       {"width", "first", "blank"},
       kFixed,
       [](Renderer&, const Value& v, const Args& a) -> R {
         const Value width = a.Get("width", Value::Int(4));
         const bool first = a.Get("first", Value::Bool(false)).Truthy();
         const bool blank = a.Get("blank", Value::Bool(false)).Truthy();
         const std::string indention = width.is_string()
                                           ? width.text()
                                           : std::string(std::max<int64_t>(0, width.as_int()), ' ');
         const ValueList lines = SplitLines(v.Str() + "\n");
         std::string rv;
         if (blank) {
           for (size_t i = 0; i < lines.size(); ++i)
             rv += (i > 0 ? "\n" + indention : "") + lines[i].text();
         } else {
           rv = lines.empty() ? "" : lines[0].text();
           for (size_t i = 1; i < lines.size(); ++i)
             rv += "\n" + (lines[i].text().empty() ? "" : indention + lines[i].text());
         }
         if (first) rv = indention + rv;
         return Value::String(rv);
       }},
      {"wordcount",
       {},
       kFixed,
       [](Renderer&, const Value& v, const Args&) -> R {
         return Value::Int(static_cast<int64_t>(PySplit(v.Str(), Value(), -1).size()));
       }},
      {"attr",
       {"name"},
       kFixed,
       [](Renderer& r, const Value& v, const Args& a) -> R {
         return r.GetAttr(v, a.Get("name").Str(), a.line());
       }},
  });
  return table;
}

absl::StatusOr<Value> Renderer::Filter(const std::string& name, const Value& v, CallArgs& raw,
                                       int line) {
  const BuiltinTable& table = Filters();
  const auto row = table.find(name);
  if (row == table.end()) {
    return absl::UnimplementedError(
        absl::StrCat("chat template line ", line, ": filter '", name.substr(0, 64), "'"));
  }
  Args a(raw, row->second, line);
  if (!row->second.variadic) RETURN_IF_ERROR(a.Check());
  return row->second.fn(*this, v, a);
}

// The bodies several rows share.

absl::StatusOr<Value> Renderer::Affix(Renderer&, const Value& s, const Args& a) {
  const bool start = a.name() == "startswith";
  const Value arg = a.Get(start ? "prefix" : "suffix");
  if (arg.is_undefined()) return Error(a.line(), absl::StrCat(a.name(), "() needs an argument"));
  ValueList options = arg.is_list() ? arg.list() : ValueList{arg};
  const std::string& text = s.text();
  for (const Value& o : options) {
    if (!o.is_string()) return Error(a.line(), absl::StrCat(a.name(), "() takes strings"));
    const std::string& p = o.text();
    if (p.size() <= text.size() && (start ? text.compare(0, p.size(), p) == 0
                                          : text.compare(text.size() - p.size(), p.size(), p) == 0))
      return Value::Bool(true);
  }
  return Value::Bool(false);
}

absl::StatusOr<Value> Renderer::IsClass(Renderer&, const Value& s, const Args& a) {
  if (s.text().empty()) return Value::Bool(false);
  const absl::string_view name = a.name();
  for (int32_t cp : CodePoints(s.text())) {
    const auto cat = utf8proc_category(cp);
    const bool digit = cat == UTF8PROC_CATEGORY_ND;
    const bool alpha = cat == UTF8PROC_CATEGORY_LU || cat == UTF8PROC_CATEGORY_LL ||
                       cat == UTF8PROC_CATEGORY_LT || cat == UTF8PROC_CATEGORY_LM ||
                       cat == UTF8PROC_CATEGORY_LO;
    const bool ok = name == "isdigit"   ? digit
                    : name == "isspace" ? IsPythonSpace(cp)
                    : name == "isalpha" ? alpha
                                        : alpha || digit;
    if (!ok) return Value::Bool(false);
  }
  return Value::Bool(true);
}

absl::StatusOr<Value> Renderer::Length(Renderer&, const Value& v, const Args& a) {
  if (v.is_string()) return Value::Int(StrLen(v.text()));
  if (v.is_list()) return Value::Int(static_cast<int64_t>(v.list().size()));
  if (v.is_dict()) return Value::Int(static_cast<int64_t>(v.dict().items.size()));
  if (v.is_undefined()) return Value::Int(0);
  return Error(a.line(), absl::StrCat("object of type '", v.TypeName(), "' has no len()"));
}

absl::StatusOr<Value> Renderer::Escape(Renderer&, const Value& v, const Args&) {
  std::string out;
  for (char c : v.Str()) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&#34;";
        break;
      case '\'':
        out += "&#39;";
        break;
      default:
        out += c;
    }
  }
  return Value::String(out);
}

absl::StatusOr<Value> Renderer::Default(Renderer&, const Value& v, const Args& a) {
  const Value fallback = a.Get("default_value", Value::String(""));
  const bool boolean = a.Get("boolean", Value::Bool(false)).Truthy();
  if (v.is_undefined() || (boolean && !v.Truthy())) return fallback;
  return v;
}

absl::StatusOr<Value> Renderer::SelectOrReject(Renderer& r, const Value& v, const Args& a) {
  const absl::string_view name = a.name();
  const bool by_attr = name == "selectattr" || name == "rejectattr";
  const bool keep = name == "selectattr" || name == "select";
  ASSIGN_OR_RETURN(ValueList items, r.Iterate(v, a.line()));
  const ValueList& args = a.positional();
  const size_t test_at = by_attr ? 1 : 0;
  const std::string attribute = by_attr && !args.empty() ? args[0].Str() : "";
  const bool has_test = args.size() > test_at;
  const std::string test = has_test ? args[test_at].Str() : "";
  CallArgs test_args;
  for (size_t i = test_at + 1; i < args.size(); ++i) test_args.positional.push_back(args[i]);
  ValueList out;
  for (const Value& item : items) {
    Value subject = item;
    if (by_attr) {
      ASSIGN_OR_RETURN(subject, r.AttrPath(item, attribute, a.line()));
    }
    bool ok = subject.Truthy();
    if (has_test) {
      ASSIGN_OR_RETURN(ok, r.Test(test, subject, test_args, a.line()));
    }
    if (ok == keep) out.push_back(item);
  }
  return Value::List(std::move(out));
}

absl::StatusOr<Value> Renderer::MinOrMax(Renderer& r, const Value& v, const Args& a) {
  ASSIGN_OR_RETURN(ValueList items, r.Iterate(v, a.line()));
  if (items.empty()) return Value::Undefined("empty sequence");
  const bool case_sensitive = a.Get("case_sensitive", Value::Bool(false)).Truthy();
  const Value attribute = a.Get("attribute", Value::None());
  const bool min = a.name() == "min";
  size_t best = 0;
  ASSIGN_OR_RETURN(Value best_key, r.SortKey(items[0], attribute, case_sensitive, a.line()));
  for (size_t i = 1; i < items.size(); ++i) {
    ASSIGN_OR_RETURN(Value key, r.SortKey(items[i], attribute, case_sensitive, a.line()));
    ASSIGN_OR_RETURN(int c, r.Order(key, best_key, a.line()));
    if (min ? c < 0 : c > 0) {
      best = i;
      best_key = key;
    }
  }
  return items[best];
}

// What sort, unique, min and max compare: the item or its attribute, strings lower-cased unless
// case_sensitive (jinja2's ignore_case).
absl::StatusOr<Value> Renderer::SortKey(const Value& item, const Value& attribute,
                                        bool case_sensitive, int line) {
  Value key = item;
  if (!attribute.is_none()) {
    ASSIGN_OR_RETURN(key, AttrPath(item, attribute.Str(), line));
  }
  if (key.is_string() && !case_sensitive) key = Value::String(MapCase(key.text(), false));
  return key;
}

}  // namespace

absl::StatusOr<Template> Template::Parse(absl::string_view source) {
  ASSIGN_OR_RETURN(NodePtr root, ParseTemplate(source));
  Template t;
  t.root_ = std::shared_ptr<const Node>(std::move(root));
  return t;
}

absl::StatusOr<std::string> Template::Render(const Value& variables, size_t max_output) const {
  std::string out;
  Renderer r(&out, max_output);
  ScopePtr globals = r.Globals();
  auto context = std::make_shared<Scope>();
  context->parent = globals;
  if (variables.is_dict()) {
    for (const auto& [k, v] : variables.dict().items) context->vars[k] = v;
  }
  auto top = std::make_shared<Scope>();
  top->parent = context;
  absl::StatusOr<Flow> f = r.RenderBody(root_->body, top);
  if (!f.ok()) return f.status();
  return out;
}

}  // namespace attnscope::jinja
