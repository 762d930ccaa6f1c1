// Private to text/jinja/: the parsed form of a template.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "text/jinja/jinja.h"

namespace attnscope::jinja {

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

enum class ExprKind {
  kLiteral,  // literal
  kName,     // name
  kAttr,     // args[0].name
  kItem,     // args[0][args[1]]
  kSlice,    // args[0][args[1]:args[2]:args[3]] (null parts omitted)
  kCall,     // args[0](args[1:], kwargs)
  kFilter,   // args[0] | name(args[1:], kwargs)
  kTest,     // args[0] is [not] name(args[1:], kwargs)
  kNeg,
  kPos,
  kNot,
  kBinary,  // args[0] name args[1]: + - * / // % ** ~
  kAnd,
  kOr,
  kCompare,  // args[0] ops[0] args[1] ops[1] args[2] ...
  kCond,     // args[1] if args[0] else args[2] (args[2] may be null)
  kList,
  kTuple,
  kDict,  // keys args[0], args[2], ...; values args[1], args[3], ...
};

struct Expr {
  ExprKind kind = ExprKind::kLiteral;
  int line = 0;
  Value literal;
  std::string name;
  bool negated = false;
  std::vector<ExprPtr> args;
  std::vector<std::string> kwnames;
  std::vector<ExprPtr> kwargs;
  std::vector<std::string> ops;
};

struct Node;
using NodePtr = std::unique_ptr<Node>;
using Body = std::vector<NodePtr>;

enum class NodeKind {
  kRoot,       // body
  kText,       // text
  kOutput,     // {{ expr }}
  kIf,         // conditions[i] -> bodies[i]; a last body without condition is the else
  kFor,        // for targets in expr [if cond]: body, else_body
  kSet,        // set targets = expr, or set targets[0].attr = expr
  kSetBlock,   // set targets[0] %}body{% endset (then filters)
  kMacro,      // macro name(targets with defaults): body
  kCallBlock,  // call(targets) expr: body is the caller
  kBreak,
  kContinue,
  kGeneration,  // transformers' {% generation %}: renders its body
};

struct Node {
  NodeKind kind = NodeKind::kText;
  int line = 0;
  std::string text;                  // kText; kMacro name; kSet attribute
  ExprPtr expr;                      // kOutput, kFor iterable, kSet value, kCallBlock call
  ExprPtr cond;                      // kFor filter
  std::vector<std::string> targets;  // kFor, kSet, kSetBlock, kMacro params, kCallBlock params
  std::vector<ExprPtr> defaults;     // kMacro, kCallBlock: per param (null: none)
  std::vector<ExprPtr> conditions;   // kIf
  std::vector<Body> bodies;          // kIf
  std::vector<ExprPtr> filters;      // kSetBlock: filters applied to the captured text
  Body body, else_body;
};

}  // namespace attnscope::jinja
