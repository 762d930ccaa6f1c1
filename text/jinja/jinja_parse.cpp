// Lexing and parsing, as jinja2 does them with trim_blocks and lstrip_blocks: whitespace control
// (`{%-`, `-%}`, `{%+`), one newline dropped after a block or comment tag, blanks before a block
// tag at the start of a line dropped, one trailing newline of the template dropped, `{% raw %}`.
#include <cctype>
#include <set>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "core/utf8.h"
#include "text/jinja/jinja_ast.h"

namespace attnscope::jinja {

bool IsPythonSpace(int32_t cp);  // jinja_render.cpp

namespace {

constexpr size_t kMaxSource = size_t{1} << 20;
constexpr int kMaxDepth = 200;

enum class Tok {
  kData,
  kVarBegin,
  kVarEnd,
  kBlockBegin,
  kBlockEnd,
  kName,
  kString,
  kInt,
  kFloat,
  kOp,
  kEnd
};

struct Token {
  Tok type;
  std::string value;
  int line;
};

// Python's str.rstrip(): Unicode whitespace.
std::string RStrip(const std::string& s) {
  size_t end = s.size();
  while (end > 0) {
    size_t start = end - 1;
    while (start > 0 && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
    size_t i = start;
    const int32_t cp = utf8::Next(s, &i);
    if (!IsPythonSpace(cp)) break;
    end = start;
  }
  return s.substr(0, end);
}

bool AllSpace(const std::string& s, size_t from) {
  if (from >= s.size()) return false;  // \s+ needs one character
  for (size_t i = from; i < s.size();) {
    if (!IsPythonSpace(utf8::Next(s, &i))) return false;
  }
  return true;
}

int CountLines(const std::string& s, size_t a, size_t b) {
  int n = 0;
  for (size_t i = a; i < b && i < s.size(); ++i) n += s[i] == '\n';
  return n;
}

absl::Status SyntaxError(int line, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("chat template line ", line, ": ", what));
}

// Python's "unicode-escape" decoding of a string literal's body (what jinja2 applies).
absl::StatusOr<std::string> Unescape(const std::string& s, int line) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '\\' || i + 1 == s.size()) {
      out += s[i];
      continue;
    }
    const char c = s[++i];
    auto hex = [&](int n) -> absl::StatusOr<uint32_t> {
      if (i + n >= s.size()) return SyntaxError(line, "truncated \\x, \\u or \\U escape");
      uint32_t v = 0;
      for (int k = 1; k <= n; ++k) {
        const char h = s[i + k];
        if (!std::isxdigit(static_cast<unsigned char>(h)))
          return SyntaxError(line, "malformed \\x, \\u or \\U escape");
        v = v * 16 +
            (std::isdigit(static_cast<unsigned char>(h)) ? h - '0' : (std::tolower(h) - 'a' + 10));
      }
      i += n;
      return v;
    };
    switch (c) {
      case 'n':
        out += '\n';
        break;
      case 't':
        out += '\t';
        break;
      case 'r':
        out += '\r';
        break;
      case '\\':
        out += '\\';
        break;
      case '\'':
        out += '\'';
        break;
      case '"':
        out += '"';
        break;
      case 'a':
        out += '\a';
        break;
      case 'b':
        out += '\b';
        break;
      case 'f':
        out += '\f';
        break;
      case 'v':
        out += '\v';
        break;
      case '\n':
        break;  // line continuation
      case 'x':
      case 'u':
      case 'U': {
        ASSIGN_OR_RETURN(const uint32_t cp, hex(c == 'x' ? 2 : c == 'u' ? 4 : 8));
        if (cp > 0x10FFFF) return SyntaxError(line, "escape outside Unicode");
        utf8::Append(cp, &out);
        break;
      }
      default:
        if (c >= '0' && c <= '7') {
          uint32_t v = c - '0';
          for (int k = 0; k < 2 && i + 1 < s.size() && s[i + 1] >= '0' && s[i + 1] <= '7'; ++k)
            v = v * 8 + (s[++i] - '0');
          utf8::Append(v, &out);
        } else {
          out += '\\';
          out += c;
        }
    }
  }
  return out;
}

class Lexer {
 public:
  explicit Lexer(std::string source) : src_(std::move(source)) {}

  absl::StatusOr<std::vector<Token>> Run() {
    // Newlines normalized; one trailing newline dropped (keep_trailing_newline=False).
    std::string s;
    s.reserve(src_.size());
    for (size_t i = 0; i < src_.size(); ++i) {
      if (src_[i] == '\r') {
        s += '\n';
        if (i + 1 < src_.size() && src_[i + 1] == '\n') ++i;
      } else {
        s += src_[i];
      }
    }
    if (!s.empty() && s.back() == '\n') s.pop_back();
    src_ = std::move(s);
    bool line_starting = true;
    while (pos_ < src_.size()) {
      size_t tag = std::string::npos;
      for (size_t p = src_.find('{', pos_); p != std::string::npos; p = src_.find('{', p + 1)) {
        if (p + 1 < src_.size() &&
            (src_[p + 1] == '{' || src_[p + 1] == '%' || src_[p + 1] == '#')) {
          tag = p;
          break;
        }
      }
      if (tag == std::string::npos) {
        Emit(Tok::kData, src_.substr(pos_));
        break;
      }
      std::string text = src_.substr(pos_, tag - pos_);
      const char kind = src_[tag + 1];
      const char sign = tag + 2 < src_.size() ? src_[tag + 2] : '\0';
      // {% raw %}: everything up to {% endraw %} is text.
      size_t raw_end = 0;
      const bool raw = kind == '%' && IsRaw(tag, &raw_end);
      if (sign == '-') {
        text = RStrip(text);
      } else if (sign != '+' && kind != '{') {
        const size_t l_pos = text.rfind('\n') + 1;  // npos + 1 == 0
        if ((l_pos > 0 || line_starting) && AllSpace(text, l_pos)) text = text.substr(0, l_pos);
      }
      Emit(Tok::kData, text);
      line_ += CountLines(src_, pos_, tag);
      pos_ = tag + 2 + (sign == '-' || sign == '+' ? 1 : 0);
      if (raw) {
        RETURN_IF_ERROR(Raw(raw_end, &line_starting));
        continue;
      }
      if (kind == '#') {
        RETURN_IF_ERROR(Comment(&line_starting));
        continue;
      }
      Emit(kind == '{' ? Tok::kVarBegin : Tok::kBlockBegin, "");
      RETURN_IF_ERROR(Inside(kind == '{', &line_starting));
    }
    tokens_.push_back({Tok::kEnd, "", line_});
    return std::move(tokens_);
  }

 private:
  void Emit(Tok type, std::string value) {
    if (type == Tok::kData && value.empty()) return;
    tokens_.push_back({type, std::move(value), line_});
  }

  // After a block end: "+%}" keeps what follows, "-%}" drops all whitespace, "%}" one newline.
  void AfterEnd(char sign, size_t after, bool block, bool* line_starting) {
    size_t p = after;
    if (sign == '-') {
      while (p < src_.size()) {
        size_t q = p;
        if (!IsPythonSpace(utf8::Next(src_, &q))) break;
        p = q;
      }
    } else if (sign != '+' && block && p < src_.size() && src_[p] == '\n') {
      ++p;
    }
    line_ += CountLines(src_, pos_, p);
    *line_starting = p > pos_ && src_[p - 1] == '\n';
    pos_ = p;
  }

  bool IsRaw(size_t tag, size_t* end) {
    size_t p = tag + 2;
    if (p < src_.size() && (src_[p] == '-' || src_[p] == '+')) ++p;
    while (p < src_.size() && std::isspace(static_cast<unsigned char>(src_[p]))) ++p;
    if (src_.compare(p, 3, "raw") != 0) return false;
    p += 3;
    while (p < src_.size() && std::isspace(static_cast<unsigned char>(src_[p]))) ++p;
    if (src_.compare(p, 3, "-%}") == 0) {
      p += 3;
      while (p < src_.size() && std::isspace(static_cast<unsigned char>(src_[p]))) ++p;
    } else if (src_.compare(p, 2, "%}") == 0) {
      p += 2;
    } else {
      return false;
    }
    *end = p;
    return true;
  }

  absl::Status Raw(size_t body_start, bool* line_starting) {
    line_ += CountLines(src_, pos_, body_start);
    for (size_t p = src_.find("{%", body_start); p != std::string::npos;
         p = src_.find("{%", p + 1)) {
      size_t q = p + 2;
      const char sign = q < src_.size() ? src_[q] : '\0';
      if (sign == '-' || sign == '+') ++q;
      while (q < src_.size() && std::isspace(static_cast<unsigned char>(src_[q]))) ++q;
      if (src_.compare(q, 6, "endraw") != 0) continue;
      q += 6;
      while (q < src_.size() && std::isspace(static_cast<unsigned char>(src_[q]))) ++q;
      char end_sign = '\0';
      if (q < src_.size() && (src_[q] == '-' || src_[q] == '+')) end_sign = src_[q++];
      if (src_.compare(q, 2, "%}") != 0) continue;
      std::string text = src_.substr(body_start, p - body_start);
      if (sign == '-') {
        text = RStrip(text);
      } else if (sign != '+') {
        const size_t l_pos = text.rfind('\n') + 1;
        if (l_pos > 0 && AllSpace(text, l_pos)) text = text.substr(0, l_pos);
      }
      Emit(Tok::kData, text);
      line_ += CountLines(src_, body_start, q);
      pos_ = q;
      AfterEnd(end_sign, q + 2, true, line_starting);
      return absl::OkStatus();
    }
    return SyntaxError(line_, "missing end of raw directive");
  }

  absl::Status Comment(bool* line_starting) {
    const size_t end = src_.find("#}", pos_);
    if (end == std::string::npos) return SyntaxError(line_, "missing end of comment tag");
    const char sign =
        end > pos_ && (src_[end - 1] == '-' || src_[end - 1] == '+') ? src_[end - 1] : '\0';
    line_ += CountLines(src_, pos_, end);
    pos_ = end;
    AfterEnd(sign, end + 2, true, line_starting);
    return absl::OkStatus();
  }

  // Expression tokens up to the tag's end, brackets balanced.
  absl::Status Inside(bool variable, bool* line_starting) {
    std::vector<char> brackets;
    const char* close = variable ? "}}" : "%}";
    while (true) {
      while (pos_ < src_.size() && std::isspace(static_cast<unsigned char>(src_[pos_]))) {
        line_ += src_[pos_] == '\n';
        ++pos_;
      }
      if (pos_ >= src_.size()) {
        return SyntaxError(line_, variable ? "unexpected end of template: missing '}}'"
                                           : "unexpected end of template: missing '%}'");
      }
      if (brackets.empty()) {
        char sign = '\0';
        size_t at = pos_;
        if ((src_[at] == '-' || (!variable && src_[at] == '+')) &&
            src_.compare(at + 1, 2, close) == 0) {
          sign = src_[at];
          ++at;
        }
        if (src_.compare(at, 2, close) == 0) {
          Emit(variable ? Tok::kVarEnd : Tok::kBlockEnd, "");
          AfterEnd(sign, at + 2, !variable, line_starting);
          return absl::OkStatus();
        }
      }
      const char c = src_[pos_];
      if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        size_t e = pos_;
        while (e < src_.size() &&
               (std::isalnum(static_cast<unsigned char>(src_[e])) || src_[e] == '_'))
          ++e;
        Emit(Tok::kName, src_.substr(pos_, e - pos_));
        pos_ = e;
      } else if (std::isdigit(static_cast<unsigned char>(c))) {
        size_t e = pos_;
        auto digits = [&] {
          while (e < src_.size() && (std::isdigit(static_cast<unsigned char>(src_[e])) ||
                                     (src_[e] == '_' && e + 1 < src_.size() &&
                                      std::isdigit(static_cast<unsigned char>(src_[e + 1])))))
            ++e;
        };
        digits();
        bool is_float = false;
        if (e + 1 < src_.size() && src_[e] == '.' &&
            std::isdigit(static_cast<unsigned char>(src_[e + 1]))) {
          ++e;
          digits();
          is_float = true;
        }
        if (e < src_.size() && (src_[e] == 'e' || src_[e] == 'E')) {
          size_t f = e + 1;
          if (f < src_.size() && (src_[f] == '+' || src_[f] == '-')) ++f;
          if (f < src_.size() && std::isdigit(static_cast<unsigned char>(src_[f]))) {
            e = f;
            digits();
            is_float = true;
          }
        }
        std::string text;
        for (size_t i = pos_; i < e; ++i) {
          if (src_[i] != '_') text += src_[i];
        }
        Emit(is_float ? Tok::kFloat : Tok::kInt, text);
        pos_ = e;
      } else if (c == '\'' || c == '"') {
        size_t e = pos_ + 1;
        while (e < src_.size() && src_[e] != c) e += src_[e] == '\\' ? 2 : 1;
        if (e >= src_.size()) return SyntaxError(line_, "unterminated string");
        ASSIGN_OR_RETURN(std::string value, Unescape(src_.substr(pos_ + 1, e - pos_ - 1), line_));
        Emit(Tok::kString, std::move(value));
        line_ += CountLines(src_, pos_, e);
        pos_ = e + 1;
      } else {
        static const char* kOps[] = {"//", "**", "==", "!=", ">=", "<=", "+", "-", "*",
                                     "/",  "%",  "~",  "[",  "]",  "(",  ")", "{", "}",
                                     ".",  ",",  ":",  "|",  "=",  "<",  ">", ";"};
        const char* op = nullptr;
        for (const char* o : kOps) {
          if (src_.compare(pos_, std::strlen(o), o) == 0) {
            op = o;
            break;
          }
        }
        if (op == nullptr)
          return SyntaxError(line_, absl::StrCat("unexpected character '", std::string(1, c), "'"));
        if (*op == '(' || *op == '[' || *op == '{') brackets.push_back(*op);
        if (*op == ')' || *op == ']' || *op == '}') {
          const char want = *op == ')' ? '(' : *op == ']' ? '[' : '{';
          if (brackets.empty() || brackets.back() != want)
            return SyntaxError(line_, absl::StrCat("unexpected '", op, "'"));
          brackets.pop_back();
        }
        Emit(Tok::kOp, op);
        pos_ += std::strlen(op);
      }
    }
  }

  std::string src_;
  size_t pos_ = 0;
  int line_ = 1;
  std::vector<Token> tokens_;
};

const std::set<std::string>& KnownFilters() {
  static const std::set<std::string> k = {
      "abs",        "capitalize", "count",   "d",     "default", "e",      "escape",
      "first",      "float",      "indent",  "int",   "items",   "join",   "last",
      "length",     "list",       "lower",   "map",   "max",     "min",    "reject",
      "rejectattr", "replace",    "reverse", "round", "safe",    "select", "selectattr",
      "sort",       "string",     "sum",     "title", "tojson",  "trim",   "unique",
      "upper",      "wordcount",  "attr"};
  return k;
}

const std::set<std::string>& KnownTests() {
  static const std::set<std::string> k = {
      "boolean", "callable",  "defined", "divisibleby", "eq",     "equalto",     "escaped",
      "even",    "false",     "float",   "ge",          "gt",     "greaterthan", "in",
      "integer", "iterable",  "le",      "lower",       "lt",     "lessthan",    "mapping",
      "ne",      "none",      "number",  "odd",         "sameas", "sequence",    "string",
      "true",    "undefined", "upper",   "==",          "!=",     "<",           "<=",
      ">",       ">="};
  return k;
}

class Parser {
 public:
  explicit Parser(std::vector<Token> tokens) : t_(std::move(tokens)) {}

  absl::StatusOr<NodePtr> Template() {
    auto root = std::make_unique<Node>();
    root->kind = NodeKind::kRoot;
    std::string end;
    RETURN_IF_ERROR(Subparse({}, &root->body, &end));
    return root;
  }

 private:
  const Token& Cur() const { return t_[i_]; }
  const Token& Peek(size_t k = 1) const { return t_[std::min(i_ + k, t_.size() - 1)]; }
  bool IsOp(const char* op) const { return Cur().type == Tok::kOp && Cur().value == op; }
  bool IsName(const char* name) const { return Cur().type == Tok::kName && Cur().value == name; }
  bool SkipOp(const char* op) {
    if (!IsOp(op)) return false;
    ++i_;
    return true;
  }
  bool SkipName(const char* name) {
    if (!IsName(name)) return false;
    ++i_;
    return true;
  }
  std::string Describe(const Token& t) const {
    switch (t.type) {
      case Tok::kData:
        return "text";
      case Tok::kVarBegin:
        return "'{{'";
      case Tok::kVarEnd:
        return "'}}'";
      case Tok::kBlockBegin:
        return "'{%'";
      case Tok::kBlockEnd:
        return "'%}'";
      case Tok::kEnd:
        return "end of template";
      case Tok::kString:
        return "a string";
      default:
        return "'" + t.value + "'";
    }
  }
  absl::Status Expect(Tok type, const char* value, const char* what) {
    if (Cur().type != type || (value != nullptr && Cur().value != value))
      return SyntaxError(Cur().line, absl::StrCat("expected ", what, ", found ", Describe(Cur())));
    ++i_;
    return absl::OkStatus();
  }
  absl::StatusOr<std::string> ExpectName() {
    if (Cur().type != Tok::kName)
      return SyntaxError(Cur().line, absl::StrCat("expected a name, found ", Describe(Cur())));
    return t_[i_++].value;
  }

  // Statements until one of `ends` (a block tag name); `*end` is the one found.
  absl::Status Subparse(const std::set<std::string>& ends, Body* body, std::string* end) {
    if (++depth_ > kMaxDepth)
      return absl::ResourceExhaustedError("chat template nested too deeply");
    while (true) {
      const Token& tok = Cur();
      if (tok.type == Tok::kEnd) {
        if (ends.empty()) break;
        return SyntaxError(
            tok.line, absl::StrCat("unexpected end of template; expected '", *ends.begin(), "'"));
      }
      if (tok.type == Tok::kData) {
        auto n = std::make_unique<Node>();
        n->kind = NodeKind::kText;
        n->line = tok.line;
        n->text = tok.value;
        body->push_back(std::move(n));
        ++i_;
      } else if (tok.type == Tok::kVarBegin) {
        ++i_;
        auto n = std::make_unique<Node>();
        n->kind = NodeKind::kOutput;
        n->line = tok.line;
        ASSIGN_OR_RETURN(n->expr, Tuple(true, {}));
        RETURN_IF_ERROR(Expect(Tok::kVarEnd, nullptr, "'}}'"));
        body->push_back(std::move(n));
      } else if (tok.type == Tok::kBlockBegin) {
        ++i_;
        if (Cur().type == Tok::kName && ends.count(Cur().value)) {
          *end = Cur().value;
          ++i_;
          --depth_;
          return absl::OkStatus();
        }
        ASSIGN_OR_RETURN(NodePtr n, Statement());
        if (n != nullptr) body->push_back(std::move(n));
      } else {
        return SyntaxError(tok.line, absl::StrCat("unexpected ", Describe(tok)));
      }
    }
    --depth_;
    return absl::OkStatus();
  }

  absl::StatusOr<NodePtr> Statement() {
    const Token& tok = Cur();
    if (tok.type != Tok::kName)
      return SyntaxError(tok.line, "expected a statement name after '{%'");
    const std::string name = tok.value;
    const int line = tok.line;
    ++i_;
    auto n = std::make_unique<Node>();
    n->line = line;
    std::string end;
    if (name == "if") {
      n->kind = NodeKind::kIf;
      while (true) {
        ASSIGN_OR_RETURN(ExprPtr cond, Tuple(false, {}));
        RETURN_IF_ERROR(Expect(Tok::kBlockEnd, nullptr, "'%}'"));
        n->conditions.push_back(std::move(cond));
        n->bodies.emplace_back();
        RETURN_IF_ERROR(Subparse({"elif", "else", "endif"}, &n->bodies.back(), &end));
        if (end == "elif") continue;
        if (end == "else") {
          RETURN_IF_ERROR(Expect(Tok::kBlockEnd, nullptr, "'%}'"));
          n->bodies.emplace_back();
          RETURN_IF_ERROR(Subparse({"endif"}, &n->bodies.back(), &end));
        }
        break;
      }
      RETURN_IF_ERROR(Expect(Tok::kBlockEnd, nullptr, "'%}'"));
    } else if (name == "for") {
      n->kind = NodeKind::kFor;
      RETURN_IF_ERROR(Targets(&n->targets));
      RETURN_IF_ERROR(Expect(Tok::kName, "in", "'in'"));
      ASSIGN_OR_RETURN(n->expr, Tuple(false, {"recursive", "if"}));
      if (IsName("recursive")) return Unsupported(Cur().line, "recursive for loops");
      if (SkipName("if")) {
        ASSIGN_OR_RETURN(n->cond, Expression(true));
      }
      RETURN_IF_ERROR(Expect(Tok::kBlockEnd, nullptr, "'%}'"));
      ++loops_;
      RETURN_IF_ERROR(Subparse({"endfor", "else"}, &n->body, &end));
      --loops_;
      if (end == "else") {
        RETURN_IF_ERROR(Expect(Tok::kBlockEnd, nullptr, "'%}'"));
        RETURN_IF_ERROR(Subparse({"endfor"}, &n->else_body, &end));
      }
      RETURN_IF_ERROR(Expect(Tok::kBlockEnd, nullptr, "'%}'"));
    } else if (name == "set") {
      RETURN_IF_ERROR(Targets(&n->targets, /*allow_attr=*/true, &n->text));
      if (SkipOp("=")) {
        n->kind = NodeKind::kSet;
        ASSIGN_OR_RETURN(n->expr, Tuple(true, {}));
        RETURN_IF_ERROR(Expect(Tok::kBlockEnd, nullptr, "'%}'"));
        return n;
      }
      if (n->targets.size() != 1 || !n->text.empty())
        return SyntaxError(line, "a block set assigns one name");
      n->kind = NodeKind::kSetBlock;
      while (SkipOp("|")) {
        auto f = std::make_unique<Expr>();
        f->kind = ExprKind::kFilter;
        f->line = Cur().line;
        ASSIGN_OR_RETURN(f->name, ExpectName());
        if (!KnownFilters().count(f->name)) return Unsupported(f->line, "filter '" + f->name + "'");
        f->args.push_back(nullptr);
        if (IsOp("(")) RETURN_IF_ERROR(CallArgs(f.get()));
        n->filters.push_back(std::move(f));
      }
    } else if (name == "macro") {
      n->kind = NodeKind::kMacro;
      ASSIGN_OR_RETURN(n->text, ExpectName());
      RETURN_IF_ERROR(Params(n.get()));
    } else if (name == "call") {
      n->kind = NodeKind::kCallBlock;
      if (IsOp("(")) RETURN_IF_ERROR(Params(n.get()));
      ASSIGN_OR_RETURN(n->expr, Expression(true));
      if (n->expr->kind != ExprKind::kCall)
        return SyntaxError(line, "expected a call after 'call'");
    } else if (name == "break" || name == "continue") {
      if (loops_ == 0) return SyntaxError(line, absl::StrCat("'", name, "' outside a loop"));
      n->kind = name == "break" ? NodeKind::kBreak : NodeKind::kContinue;
      RETURN_IF_ERROR(Expect(Tok::kBlockEnd, nullptr, "'%}'"));
      return n;
    } else if (name == "generation") {
      n->kind = NodeKind::kGeneration;
    } else {
      return Unsupported(line, absl::StrCat("the '", name, "' statement"));
    }
    if (n->kind == NodeKind::kIf || n->kind == NodeKind::kFor) return n;
    RETURN_IF_ERROR(Expect(Tok::kBlockEnd, nullptr, "'%}'"));
    if (n->kind == NodeKind::kSetBlock) {
      RETURN_IF_ERROR(Subparse({"endset"}, &n->body, &end));
    } else if (n->kind == NodeKind::kMacro) {
      const int saved = loops_;
      loops_ = 0;
      RETURN_IF_ERROR(Subparse({"endmacro"}, &n->body, &end));
      loops_ = saved;
    } else if (n->kind == NodeKind::kCallBlock) {
      RETURN_IF_ERROR(Subparse({"endcall"}, &n->body, &end));
    } else if (n->kind == NodeKind::kGeneration) {
      RETURN_IF_ERROR(Subparse({"endgeneration"}, &n->body, &end));
    }
    RETURN_IF_ERROR(Expect(Tok::kBlockEnd, nullptr, "'%}'"));  // the end tag closes
    return n;
  }

  static absl::Status Unsupported(int line, const std::string& what) {
    return absl::UnimplementedError(absl::StrCat("chat template line ", line, ": ", what,
                                                 " is not supported by attnscope's renderer"));
  }

  // `name`, `a, b`, `(a, b)`, or (set) `ns.attr`.
  absl::Status Targets(std::vector<std::string>* out, bool allow_attr = false,
                       std::string* attr = nullptr) {
    const bool paren = SkipOp("(");
    while (true) {
      ASSIGN_OR_RETURN(std::string name, ExpectName());
      if (allow_attr && out->empty() && IsOp(".")) {
        ++i_;
        ASSIGN_OR_RETURN(*attr, ExpectName());
        out->push_back(name);
        return absl::OkStatus();
      }
      out->push_back(name);
      if (!SkipOp(",")) break;
      if (paren && IsOp(")")) break;
    }
    if (paren) RETURN_IF_ERROR(Expect(Tok::kOp, ")", "')'"));
    return absl::OkStatus();
  }

  absl::Status Params(Node* n) {
    RETURN_IF_ERROR(Expect(Tok::kOp, "(", "'('"));
    while (!IsOp(")")) {
      if (!n->targets.empty()) RETURN_IF_ERROR(Expect(Tok::kOp, ",", "','"));
      if (IsOp(")")) break;
      ASSIGN_OR_RETURN(std::string name, ExpectName());
      n->targets.push_back(name);
      if (SkipOp("=")) {
        ASSIGN_OR_RETURN(ExprPtr d, Expression(true));
        n->defaults.push_back(std::move(d));
      } else {
        n->defaults.push_back(nullptr);
      }
    }
    ++i_;
    return absl::OkStatus();
  }

  bool TupleEnd(const std::set<std::string>& extra) const {
    const Token& t = Cur();
    if (t.type == Tok::kVarEnd || t.type == Tok::kBlockEnd || t.type == Tok::kEnd) return true;
    if (t.type == Tok::kOp && t.value == ")") return true;
    return t.type == Tok::kName && extra.count(t.value) > 0;
  }

  absl::StatusOr<ExprPtr> Tuple(bool with_cond, const std::set<std::string>& extra,
                                bool explicit_parens = false) {
    const int line = Cur().line;
    std::vector<ExprPtr> items;
    bool is_tuple = false;
    while (true) {
      if (!items.empty()) RETURN_IF_ERROR(Expect(Tok::kOp, ",", "','"));
      if (TupleEnd(extra)) break;
      ASSIGN_OR_RETURN(ExprPtr e, Expression(with_cond));
      items.push_back(std::move(e));
      if (IsOp(",")) {
        is_tuple = true;
      } else {
        break;
      }
    }
    if (!is_tuple) {
      if (!items.empty()) return std::move(items[0]);
      if (!explicit_parens)
        return SyntaxError(line, absl::StrCat("expected an expression, found ", Describe(Cur())));
    }
    auto e = std::make_unique<Expr>();
    e->kind = ExprKind::kTuple;
    e->line = line;
    e->args = std::move(items);
    return e;
  }

  absl::StatusOr<ExprPtr> Expression(bool with_cond) {
    if (++depth_ > kMaxDepth)
      return absl::ResourceExhaustedError("chat template nested too deeply");
    ASSIGN_OR_RETURN(ExprPtr e, Or());
    while (with_cond && IsName("if")) {
      const int line = Cur().line;
      ++i_;
      auto c = std::make_unique<Expr>();
      c->kind = ExprKind::kCond;
      c->line = line;
      ASSIGN_OR_RETURN(ExprPtr test, Or());
      c->args.push_back(std::move(test));
      c->args.push_back(std::move(e));
      if (SkipName("else")) {
        ASSIGN_OR_RETURN(ExprPtr other, Expression(true));
        c->args.push_back(std::move(other));
      } else {
        c->args.push_back(nullptr);
      }
      e = std::move(c);
    }
    --depth_;
    return e;
  }

  static ExprPtr Make(ExprKind kind, int line, ExprPtr a, ExprPtr b = nullptr,
                      std::string name = "") {
    auto e = std::make_unique<Expr>();
    e->kind = kind;
    e->line = line;
    e->name = std::move(name);
    e->args.push_back(std::move(a));
    if (b != nullptr) e->args.push_back(std::move(b));
    return e;
  }

  // One left-associative level of binary operators: next (op next)*, `ops` being operator tokens
  // or keyword names; kBinary nodes keep the operator as their name.
  template <typename Next>
  absl::StatusOr<ExprPtr> LeftAssoc(std::initializer_list<const char*> ops, ExprKind kind,
                                    Next next) {
    ASSIGN_OR_RETURN(ExprPtr e, next());
    while (true) {
      const char* op = nullptr;
      for (const char* o : ops) {
        if (IsOp(o) || IsName(o)) op = o;
      }
      if (op == nullptr) return e;
      const int line = Cur().line;
      ++i_;
      ASSIGN_OR_RETURN(ExprPtr r, next());
      e = Make(kind, line, std::move(e), std::move(r), kind == ExprKind::kBinary ? op : "");
    }
  }
  absl::StatusOr<ExprPtr> Or() {
    return LeftAssoc({"or"}, ExprKind::kOr, [this] { return And(); });
  }
  absl::StatusOr<ExprPtr> And() {
    return LeftAssoc({"and"}, ExprKind::kAnd, [this] { return Not(); });
  }
  absl::StatusOr<ExprPtr> Not() {
    if (IsName("not")) {
      const int line = Cur().line;
      ++i_;
      ASSIGN_OR_RETURN(ExprPtr e, Not());
      return Make(ExprKind::kNot, line, std::move(e));
    }
    return Compare();
  }
  absl::StatusOr<ExprPtr> Compare() {
    const int line = Cur().line;
    ASSIGN_OR_RETURN(ExprPtr first, Math1());
    std::vector<ExprPtr> operands;
    std::vector<std::string> ops;
    operands.push_back(std::move(first));
    while (true) {
      std::string op;
      if (Cur().type == Tok::kOp &&
          (Cur().value == "==" || Cur().value == "!=" || Cur().value == "<" ||
           Cur().value == "<=" || Cur().value == ">" || Cur().value == ">=")) {
        op = Cur().value;
        ++i_;
      } else if (IsName("in")) {
        op = "in";
        ++i_;
      } else if (IsName("not") && Peek().type == Tok::kName && Peek().value == "in") {
        op = "notin";
        i_ += 2;
      } else {
        break;
      }
      ASSIGN_OR_RETURN(ExprPtr r, Math1());
      ops.push_back(op);
      operands.push_back(std::move(r));
    }
    if (ops.empty()) return std::move(operands[0]);
    auto e = std::make_unique<Expr>();
    e->kind = ExprKind::kCompare;
    e->line = line;
    e->args = std::move(operands);
    e->ops = std::move(ops);
    return e;
  }
  // jinja2's precedence: + - below ~ below * / // % below **.
  absl::StatusOr<ExprPtr> Math1() {
    return LeftAssoc({"+", "-"}, ExprKind::kBinary, [this] { return Concat(); });
  }
  absl::StatusOr<ExprPtr> Concat() {
    return LeftAssoc({"~"}, ExprKind::kBinary, [this] { return Math2(); });
  }
  absl::StatusOr<ExprPtr> Math2() {
    return LeftAssoc({"*", "/", "//", "%"}, ExprKind::kBinary, [this] { return Pow(); });
  }
  absl::StatusOr<ExprPtr> Pow() {
    return LeftAssoc({"**"}, ExprKind::kBinary, [this] { return Unary(true); });
  }
  absl::StatusOr<ExprPtr> Unary(bool with_filter) {
    if (++depth_ > kMaxDepth)
      return absl::ResourceExhaustedError("chat template nested too deeply");
    const int line = Cur().line;
    ExprPtr e;
    if (IsOp("-") || IsOp("+")) {
      const bool neg = Cur().value == "-";
      ++i_;
      ASSIGN_OR_RETURN(ExprPtr x, Unary(false));
      e = Make(neg ? ExprKind::kNeg : ExprKind::kPos, line, std::move(x));
    } else {
      ASSIGN_OR_RETURN(e, Primary());
    }
    ASSIGN_OR_RETURN(e, Postfix(std::move(e)));
    if (with_filter) {
      ASSIGN_OR_RETURN(e, FilterExpr(std::move(e)));
    }
    --depth_;
    return e;
  }

  absl::StatusOr<ExprPtr> Primary() {
    const Token tok = Cur();
    auto e = std::make_unique<Expr>();
    e->line = tok.line;
    switch (tok.type) {
      case Tok::kName:
        ++i_;
        if (tok.value == "true" || tok.value == "True") {
          e->literal = Value::Bool(true);
        } else if (tok.value == "false" || tok.value == "False") {
          e->literal = Value::Bool(false);
        } else if (tok.value == "none" || tok.value == "None") {
          e->literal = Value::None();
        } else {
          e->kind = ExprKind::kName;
          e->name = tok.value;
        }
        return e;
      case Tok::kString: {
        std::string s;
        while (Cur().type == Tok::kString) s += t_[i_++].value;  // adjacent strings join
        e->literal = Value::String(std::move(s));
        return e;
      }
      case Tok::kInt: {
        ++i_;
        int64_t v = 0;
        for (char c : tok.value) {
          if (v > (INT64_MAX - 9) / 10)
            return Unsupported(tok.line, "an integer literal this large");
          v = v * 10 + (c - '0');
        }
        e->literal = Value::Int(v);
        return e;
      }
      case Tok::kFloat:
        ++i_;
        e->literal = Value::Float(std::strtod(tok.value.c_str(), nullptr));
        return e;
      case Tok::kOp:
        if (tok.value == "(") {
          ++i_;
          ASSIGN_OR_RETURN(ExprPtr inner, Tuple(true, {}, /*explicit_parens=*/true));
          RETURN_IF_ERROR(Expect(Tok::kOp, ")", "')'"));
          return inner;
        }
        if (tok.value == "[") {
          ++i_;
          e->kind = ExprKind::kList;
          while (!IsOp("]")) {
            if (!e->args.empty()) RETURN_IF_ERROR(Expect(Tok::kOp, ",", "','"));
            if (IsOp("]")) break;
            ASSIGN_OR_RETURN(ExprPtr item, Expression(true));
            e->args.push_back(std::move(item));
          }
          ++i_;
          return e;
        }
        if (tok.value == "{") {
          ++i_;
          e->kind = ExprKind::kDict;
          while (!IsOp("}")) {
            if (!e->args.empty()) RETURN_IF_ERROR(Expect(Tok::kOp, ",", "','"));
            if (IsOp("}")) break;
            ASSIGN_OR_RETURN(ExprPtr key, Expression(true));
            RETURN_IF_ERROR(Expect(Tok::kOp, ":", "':'"));
            ASSIGN_OR_RETURN(ExprPtr value, Expression(true));
            e->args.push_back(std::move(key));
            e->args.push_back(std::move(value));
          }
          ++i_;
          return e;
        }
        break;
      default:
        break;
    }
    return SyntaxError(tok.line, absl::StrCat("unexpected ", Describe(tok)));
  }

  absl::Status CallArgs(Expr* e) {
    RETURN_IF_ERROR(Expect(Tok::kOp, "(", "'('"));
    bool first = true;
    while (!IsOp(")")) {
      if (!first) {
        RETURN_IF_ERROR(Expect(Tok::kOp, ",", "','"));
        if (IsOp(")")) break;
      }
      first = false;
      if (IsOp("*") || IsOp("**")) return Unsupported(Cur().line, "*args and **kwargs in calls");
      if (Cur().type == Tok::kName && Peek().type == Tok::kOp && Peek().value == "=") {
        e->kwnames.push_back(Cur().value);
        i_ += 2;
        ASSIGN_OR_RETURN(ExprPtr v, Expression(true));
        e->kwargs.push_back(std::move(v));
      } else {
        if (!e->kwargs.empty())
          return SyntaxError(Cur().line, "a positional argument after a keyword argument");
        ASSIGN_OR_RETURN(ExprPtr v, Expression(true));
        e->args.push_back(std::move(v));
      }
    }
    ++i_;
    return absl::OkStatus();
  }

  absl::StatusOr<ExprPtr> Postfix(ExprPtr e) {
    while (true) {
      const int line = Cur().line;
      if (IsOp(".")) {
        ++i_;
        if (Cur().type == Tok::kName) {
          e = Make(ExprKind::kAttr, line, std::move(e), nullptr, t_[i_++].value);
        } else if (Cur().type == Tok::kInt) {
          auto key = std::make_unique<Expr>();
          int64_t index = 0;
          if (!absl::SimpleAtoi(t_[i_++].value, &index))
            return Unsupported(line, "an integer attribute this large");
          key->literal = Value::Int(index);
          e = Make(ExprKind::kItem, line, std::move(e), std::move(key));
        } else {
          return SyntaxError(line, "expected an attribute name after '.'");
        }
      } else if (IsOp("[")) {
        ++i_;
        ExprPtr parts[3];
        bool slice = false;
        for (int k = 0; k < 3; ++k) {
          if (!IsOp(":") && !IsOp("]")) {
            ASSIGN_OR_RETURN(parts[k], Expression(true));
          }
          if (k < 2 && SkipOp(":")) {
            slice = true;
            continue;
          }
          break;
        }
        RETURN_IF_ERROR(Expect(Tok::kOp, "]", "']'"));
        if (slice) {
          auto s = std::make_unique<Expr>();
          s->kind = ExprKind::kSlice;
          s->line = line;
          s->args.push_back(std::move(e));
          for (auto& p : parts) s->args.push_back(std::move(p));
          e = std::move(s);
        } else {
          if (parts[0] == nullptr) return SyntaxError(line, "expected a subscript");
          e = Make(ExprKind::kItem, line, std::move(e), std::move(parts[0]));
        }
      } else if (IsOp("(")) {
        auto c = std::make_unique<Expr>();
        c->kind = ExprKind::kCall;
        c->line = line;
        c->args.push_back(std::move(e));
        RETURN_IF_ERROR(CallArgs(c.get()));
        e = std::move(c);
      } else {
        return e;
      }
    }
  }

  absl::StatusOr<ExprPtr> FilterExpr(ExprPtr e) {
    while (true) {
      const int line = Cur().line;
      if (IsOp("|")) {
        ++i_;
        auto f = std::make_unique<Expr>();
        f->kind = ExprKind::kFilter;
        f->line = line;
        ASSIGN_OR_RETURN(f->name, ExpectName());
        if (!KnownFilters().count(f->name)) return Unsupported(line, "filter '" + f->name + "'");
        f->args.push_back(std::move(e));
        if (IsOp("(")) RETURN_IF_ERROR(CallArgs(f.get()));
        e = std::move(f);
      } else if (IsName("is")) {
        ++i_;
        auto t = std::make_unique<Expr>();
        t->kind = ExprKind::kTest;
        t->line = line;
        t->negated = SkipName("not");
        if (Cur().type == Tok::kName) {
          t->name = t_[i_++].value;
        } else if (Cur().type == Tok::kOp && KnownTests().count(Cur().value)) {
          t->name = t_[i_++].value;
        } else {
          return SyntaxError(line, "expected a test name after 'is'");
        }
        if (!KnownTests().count(t->name)) return Unsupported(line, "test '" + t->name + "'");
        t->args.push_back(std::move(e));
        if (IsOp("(")) {
          RETURN_IF_ERROR(CallArgs(t.get()));
        } else if ((Cur().type == Tok::kName || Cur().type == Tok::kString ||
                    Cur().type == Tok::kInt || Cur().type == Tok::kFloat || IsOp("(") ||
                    IsOp("[") || IsOp("{")) &&
                   !IsName("else") && !IsName("or") && !IsName("and")) {
          if (IsName("is")) return SyntaxError(line, "you cannot chain multiple tests with is");
          ASSIGN_OR_RETURN(ExprPtr arg, Primary());
          ASSIGN_OR_RETURN(arg, Postfix(std::move(arg)));
          t->args.push_back(std::move(arg));
        }
        e = std::move(t);
      } else if (IsOp("(")) {
        auto c = std::make_unique<Expr>();
        c->kind = ExprKind::kCall;
        c->line = line;
        c->args.push_back(std::move(e));
        RETURN_IF_ERROR(CallArgs(c.get()));
        e = std::move(c);
      } else {
        return e;
      }
    }
  }

  std::vector<Token> t_;
  size_t i_ = 0;
  int depth_ = 0;
  int loops_ = 0;
};

}  // namespace

absl::StatusOr<NodePtr> ParseTemplate(absl::string_view source) {
  if (source.size() > kMaxSource) {
    return absl::InvalidArgumentError(
        absl::StrCat("chat template of ", source.size(), " bytes: more than 1 MiB"));
  }
  Lexer lexer{std::string(source)};
  ASSIGN_OR_RETURN(std::vector<Token> tokens, lexer.Run());
  Parser parser(std::move(tokens));
  return parser.Template();
}

}  // namespace attnscope::jinja
