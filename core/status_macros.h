// Status helpers shared by the engine: errors are values (absl::Status), never exceptions.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define ATTNSCOPE_CONCAT_INNER(a, b) a##b
#define ATTNSCOPE_CONCAT(a, b) ATTNSCOPE_CONCAT_INNER(a, b)

// Returns from the enclosing function when `expr` yields a non-OK status.
#define RETURN_IF_ERROR(expr)                              \
  do {                                                     \
    ::absl::Status _attnscope_status = (expr);             \
    if (!_attnscope_status.ok()) return _attnscope_status; \
  } while (0)

// `ASSIGN_OR_RETURN(auto x, FunctionReturningStatusOr());`
#define ASSIGN_OR_RETURN(lhs, rexpr) \
  ASSIGN_OR_RETURN_IMPL(ATTNSCOPE_CONCAT(_attnscope_statusor_, __LINE__), lhs, rexpr)

#define ASSIGN_OR_RETURN_IMPL(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                          \
  if (!statusor.ok()) return statusor.status();     \
  lhs = std::move(statusor).value()
