// The one place where engine errors become gRPC statuses (absl codes are gRPC's codes).
#pragma once

#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"

namespace attnscope {

inline grpc::Status ToGrpcStatus(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

}  // namespace attnscope
