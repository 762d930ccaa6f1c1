// The unary calls (Generate, Tokenize, Detokenize, DetectHeads): one reactor whose work, a
// function of the request, runs on a scheduler thread.
#pragma once

#include <grpcpp/grpcpp.h>

#include <functional>

#include "absl/status/status.h"
#include "server/call.h"
#include "server/grpc_status.h"
#include "server/scheduler.h"
#include "server/service.h"

namespace attnscope {

// A unary call whose work runs on a scheduler thread. A client that leaves while the call is
// queued frees its place at once; one that leaves while it runs cancels it (the work sees
// `cancel`).
template <typename Request, typename Response>
class JobReactor : public grpc::ServerUnaryReactor {
 public:
  using Work = std::function<absl::Status(const Request& request, Response* response,
                                          const CancelToken& cancel)>;

  JobReactor(AttentionServiceImpl* service, grpc::CallbackServerContext* context,
             const char* method, Scheduler* scheduler, const grpc::ByteBuffer* raw_request,
             grpc::ByteBuffer* raw_response, Work work)
      : service_(service),
        method_(method),
        scheduler_(scheduler),
        received_(Clock::now()),
        raw_response_(raw_response),
        work_(std::move(work)) {
    absl::Status admitted = service_->Admit(context);
    if (admitted.ok()) admitted = Decode(raw_request, &request_);
    if (!admitted.ok()) {
      FinishAndRecord(admitted);
      return;
    }
    ticket_ = scheduler_->TrySubmit([this] { Run(); });
    if (ticket_ == 0) {
      ++service_->metrics_.rejected_busy;
      FinishAndRecord(BusyError());
    }
  }

  void OnCancel() override {
    cancel_.Cancel();
    if (scheduler_->Withdraw(ticket_)) {
      ++service_->metrics_.withdrawn;
      FinishAndRecord(absl::CancelledError("the client left while the request was queued"));
    }
  }

  void OnDone() override { delete this; }

 private:
  void Run() {
    service_->Register(&cancel_);
    absl::Status status = cancel_.cancelled() ? CancelledStatus(service_->accepting())
                                              : work_(request_, &response_, cancel_);
    service_->Unregister(&cancel_);
    if (status.ok()) status = Encode(response_, raw_response_);
    FinishAndRecord(status);
  }

  void FinishAndRecord(const absl::Status& status) {
    service_->metrics_.RecordRequest(method_, static_cast<int>(status.code()),
                                     MsBetween(received_, Clock::now()) / 1e3);
    Finish(ToGrpcStatus(status));
  }

  AttentionServiceImpl* service_;
  const char* method_;
  Scheduler* scheduler_;
  const Clock::time_point received_;
  grpc::ByteBuffer* raw_response_;  // gRPC's, valid until OnDone
  Work work_;
  Request request_;
  Response response_;
  CancelToken cancel_;
  Scheduler::Ticket ticket_ = 0;
};

}  // namespace attnscope
