// Detached jobs: StreamAttention requests run without a stream, their samples written into a
// result store on disk (the safetensors files attnscope-capture writes, through samples/), so that
// a notebook restart or a sleeping laptop loses nothing.
//
// The store is a folder the server owns: `<id>.json` is a job's record (JobInfo as proto JSON and
// its owner), `<id>.safetensors` its result, published whole by rename (core/atomic_file.h). A job
// belongs to the owner that submitted it: a salted hash of its bearer token (the token itself is
// never stored); every other owner is told NOT_FOUND. Quotas (per owner and in all) count stored
// results and the estimates of running jobs; a completed result is deleted after its time to live.
// At start-up, jobs a previous run left unfinished are failed and their work files removed.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "attnscope/v1/attnscope.pb.h"
#include "engine/engine.h"

namespace attnscope {

struct JobOptions {
  std::string dir;                                    // empty: the server keeps no jobs
  int64_t quota_bytes_per_owner = int64_t{20} << 30;  // stored results + running estimates
  int64_t quota_bytes = int64_t{100} << 30;           // the same, all owners together
  double ttl_s = 24 * 3600;                           // a completed result's life
  int max_unfinished_per_owner = 64;                  // jobs received, queued or running
  int max_records = 10000;                            // records kept (the oldest finished go first)
  // Begins every job id ("PREFIX-<32 hex>"): a front door with several servers of one model routes
  // a job's calls (the clients' x-attnscope-job header) to the server that holds it.
  std::string id_prefix;
};

// Whether a job has ended (completed, failed or cancelled).
inline bool JobFinished(v1::JobStatus s) {
  return s == v1::JOB_COMPLETED || s == v1::JOB_FAILED || s == v1::JOB_CANCELLED;
}

// Whether `prefix` may begin job ids: [a-z0-9-], at most 63 characters.
bool ValidJobIdPrefix(const std::string& prefix);

// One job. `info` and the fields after it are guarded by `mu`.
struct DetachedJob {
  std::string id, owner;
  v1::GenerateRequest request;
  CancelToken cancel;
  std::atomic<int64_t> tokens{0}, bytes{0};  // progress, read without the lock
  std::mutex mu;
  v1::JobInfo info;
  uint64_t ticket = 0;            // the scheduler's, while queued
  bool cancel_requested = false;  // by CancelJob (not a shutdown)
  int64_t reserved = 0;           // bytes the quota holds for it while it runs
};

class JobStore {
 public:
  // Opens (creating) the folder, fails what a previous run left unfinished, removes work files and
  // expired results.
  static absl::StatusOr<std::unique_ptr<JobStore>> Open(JobOptions options);

  const JobOptions& options() const { return options_; }
  // The owner a bearer token stands for ("" without authentication: one shared owner).
  std::string OwnerOf(const std::string& token) const;
  std::string ResultPath(const std::string& id) const;

  // A new job in JOB_RECEIVED, recorded on disk. RESOURCE_EXHAUSTED when the owner's or the
  // store's quota is used up or the owner has too many unfinished jobs.
  absl::StatusOr<std::shared_ptr<DetachedJob>> Create(const std::string& owner,
                                                      v1::GenerateRequest request);
  // The owner's job, or nullptr (unknown, another owner's, or expired).
  std::shared_ptr<DetachedJob> Find(const std::string& owner, const std::string& id);
  // The owner's jobs, newest first.
  std::vector<std::shared_ptr<DetachedJob>> List(const std::string& owner);

  // Holds `bytes` of the owner's quota for a running job; RESOURCE_EXHAUSTED when they do not fit.
  absl::Status Reserve(DetachedJob& job, int64_t bytes);
  // Writes the job's record (call with job.mu held, after changing job.info).
  absl::Status Save(const DetachedJob& job);
  // Ends a job: its status, error and (completed) result size; releases its reservation; records.
  void Finish(DetachedJob& job, v1::JobStatus status, const absl::Status& error,
              int64_t result_bytes);
  // Deletes the results whose time to live has passed, and their records: at most once a second
  // (Find checks the job it returns itself).
  void Sweep();

 private:
  explicit JobStore(JobOptions options) : options_(std::move(options)) {}
  absl::Status Load();
  int64_t UsedLocked(const std::string* owner) const;       // under mu_
  bool ExpiredLocked(DetachedJob& job, int64_t now) const;  // under mu_
  void ForgetLocked(const std::string& id);                 // under mu_

  JobOptions options_;
  std::string salt_;
  std::mutex mu_;
  std::map<std::string, std::shared_ptr<DetachedJob>> jobs_;  // by id
  std::atomic<int64_t> last_sweep_ms_{0};
};

int64_t UnixMs();

}  // namespace attnscope
