// The one place where absl statuses become gRPC statuses (absl codes are gRPC's codes). Nothing
// else in server/ builds a grpc::Status.
#pragma once

#include <grpcpp/grpcpp.h>

#include <string>

#include "absl/status/status.h"

namespace attnscope {

// Longest status message sent; longer ones (a message quoting user input) are cut.
constexpr size_t kMaxStatusMessageBytes = 1024;

inline grpc::Status ToGrpcStatus(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  std::string message(s.message().substr(0, kMaxStatusMessageBytes));
  if (s.message().size() > kMaxStatusMessageBytes) message += "...";
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), message);
}

}  // namespace attnscope
