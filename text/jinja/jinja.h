// A Jinja renderer for chat templates, with the semantics of Python's jinja2 as `transformers`
// configures it for apply_chat_template: ImmutableSandboxedEnvironment(trim_blocks=True,
// lstrip_blocks=True, extensions=[loopcontrols]), `tojson` as json.dumps(ensure_ascii=False, ...),
// globals raise_exception and strftime_now, the default (lenient) Undefined. It covers the subset
// real chat templates use; anything else is an UNIMPLEMENTED error naming the construct and its
// line, never a silent difference. No gRPC, no libtorch.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json_fwd.hpp"

namespace attnscope::jinja {

class Value;
using ValueList = std::vector<Value>;

// Python dict: insertion-ordered, string keys (what JSON and chat templates use).
struct Dict {
  std::vector<std::pair<std::string, Value>> items;
  std::unordered_map<std::string, size_t> index;
  bool is_namespace = false;  // namespace(): attributes assignable with `set ns.x = ...`
  const Value* Find(const std::string& key) const;
  void Set(const std::string& key, Value value);
};

struct CallArgs {
  ValueList positional;
  std::vector<std::pair<std::string, Value>> keywords;
};

// A callable: a builtin global, a bound string/dict method, a macro, `loop.cycle`.
struct Function {
  std::string name;
  std::function<absl::StatusOr<Value>(CallArgs&)> call;
};

// A Python value as templates see it.
class Value {
 public:
  enum class Kind { kUndefined, kNone, kBool, kInt, kFloat, kString, kList, kDict, kFunction };

  Value() = default;  // undefined
  static Value Undefined(std::string name = "") {
    Value v;
    v.text_ = std::move(name);
    return v;
  }
  static Value None() { return Value(Kind::kNone); }
  static Value Bool(bool b) {
    Value v(Kind::kBool);
    v.int_ = b;
    return v;
  }
  static Value Int(int64_t i) {
    Value v(Kind::kInt);
    v.int_ = i;
    return v;
  }
  static Value Float(double f) {
    Value v(Kind::kFloat);
    v.float_ = f;
    return v;
  }
  static Value String(std::string s) {
    Value v(Kind::kString);
    v.text_ = std::move(s);
    return v;
  }
  static Value List(ValueList items, bool tuple = false) {
    Value v(Kind::kList);
    v.list_ = std::make_shared<ValueList>(std::move(items));
    v.tuple_ = tuple;
    return v;
  }
  static Value MakeDict(std::shared_ptr<Dict> dict) {
    Value v(Kind::kDict);
    v.dict_ = std::move(dict);
    return v;
  }
  static Value MakeDict() { return MakeDict(std::make_shared<Dict>()); }
  static Value MakeFunction(std::string name, std::function<absl::StatusOr<Value>(CallArgs&)> f) {
    Value v(Kind::kFunction);
    v.function_ = std::make_shared<Function>(Function{std::move(name), std::move(f)});
    return v;
  }
  // JSON (messages, template variables) as Python values: objects keep their key order.
  static Value FromJson(const nlohmann::ordered_json& json);

  Kind kind() const { return kind_; }
  bool is_undefined() const { return kind_ == Kind::kUndefined; }
  bool is_none() const { return kind_ == Kind::kNone; }
  bool is_string() const { return kind_ == Kind::kString; }
  bool is_number() const { return kind_ == Kind::kInt || kind_ == Kind::kFloat; }
  bool is_list() const { return kind_ == Kind::kList; }
  bool is_tuple() const { return kind_ == Kind::kList && tuple_; }
  bool is_dict() const { return kind_ == Kind::kDict; }
  bool is_function() const { return kind_ == Kind::kFunction; }
  bool as_bool() const { return int_ != 0; }
  int64_t as_int() const { return int_; }
  double as_double() const { return kind_ == Kind::kFloat ? float_ : static_cast<double>(int_); }
  const std::string& text() const { return text_; }  // strings; the name of an undefined
  const ValueList& list() const { return *list_; }
  ValueList& mutable_list() { return *list_; }
  const Dict& dict() const { return *dict_; }
  Dict& mutable_dict() const { return *dict_; }
  const std::shared_ptr<Dict>& dict_ptr() const { return dict_; }
  const Function& function() const { return *function_; }

  // Python's truthiness, str(), repr(), ==.
  bool Truthy() const;
  std::string Str() const;
  std::string Repr() const;
  bool Equals(const Value& other) const;
  // Python's type name, for messages: 'str', 'int', 'list', ...
  const char* TypeName() const;

 private:
  explicit Value(Kind kind) : kind_(kind) {}
  Kind kind_ = Kind::kUndefined;
  int64_t int_ = 0;
  double float_ = 0;
  bool tuple_ = false;
  std::string text_;
  std::shared_ptr<ValueList> list_;
  std::shared_ptr<Dict> dict_;
  std::shared_ptr<Function> function_;
};

// json.dumps with Python's defaults as transformers' tojson calls it: ensure_ascii=False,
// `indent` < 0 for none, separators ", " and ": " (",", ": " with an indent) unless given.
absl::StatusOr<std::string> ToJson(const Value& value, int indent, const std::string& item_sep,
                                   const std::string& key_sep, bool sort_keys);

struct Node;  // the parsed template (jinja_ast.h)

class Template {
 public:
  // INVALID_ARGUMENT for a syntax error, UNIMPLEMENTED for a construct this renderer lacks; both
  // name the line. Templates are bounded: 1 MiB of source.
  static absl::StatusOr<Template> Parse(absl::string_view source);

  // Renders with `variables` as the context (a dict). A raise_exception() in the template is a
  // FAILED_PRECONDITION whose message is the template's; rendering stops past `max_output` bytes
  // or too deep a recursion (RESOURCE_EXHAUSTED).
  absl::StatusOr<std::string> Render(const Value& variables,
                                     size_t max_output = size_t{16} << 20) const;

 private:
  std::shared_ptr<const Node> root_;
};

}  // namespace attnscope::jinja
