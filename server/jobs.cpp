#include "server/jobs.h"

#include <dirent.h>
#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <random>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/atomic_file.h"
#include "core/files.h"
#include "core/status_macros.h"
#include "google/protobuf/util/json_util.h"
#include "server/convert.h"

namespace attnscope {
namespace {

constexpr int64_t kMaxRecordBytes = 1 << 20;

std::string RandomHex(int bytes) {
  std::random_device rd;
  static const char* kHex = "0123456789abcdef";
  std::string out;
  for (int i = 0; i < bytes; ++i) {
    const unsigned v = rd() & 0xff;
    out += kHex[v >> 4];
    out += kHex[v & 15];
  }
  return out;
}

// 64-bit FNV-1a of `salt` then `text`.
uint64_t Fnv(const std::string& salt, const std::string& text) {
  uint64_t h = 1469598103934665603ull;
  for (const std::string* s : {&salt, &text}) {
    for (unsigned char c : *s) {
      h ^= c;
      h *= 1099511628211ull;
    }
  }
  return h;
}

bool PrefixChar(char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-'; }

// A job id: [PREFIX-]32 hex digits, nothing else (ids name files).
bool ValidId(const std::string& id) {
  if (id.size() < 32) return false;
  const std::string hex = id.substr(id.size() - 32);
  for (char c : hex)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  if (id.size() == 32) return true;
  const std::string prefix = id.substr(0, id.size() - 33);
  return id[id.size() - 33] == '-' && !prefix.empty() && ValidJobIdPrefix(prefix);
}

absl::Status WriteWhole(const std::string& path, const std::string& text) {
  ASSIGN_OR_RETURN(auto file, AtomicFile::Create(path));
  if (std::fwrite(text.data(), 1, text.size(), file->stream()) != text.size())
    return absl::InternalError(absl::StrCat("cannot write ", path));
  return file->Publish(/*replace=*/true);
}

}  // namespace

bool ValidJobIdPrefix(const std::string& prefix) {
  if (prefix.size() > 63) return false;
  for (char c : prefix)
    if (!PrefixChar(c)) return false;
  return true;
}

int64_t UnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

absl::StatusOr<std::unique_ptr<JobStore>> JobStore::Open(JobOptions options) {
  if (options.dir.empty()) return absl::InvalidArgumentError("--jobs_dir is empty");
  if (!ValidJobIdPrefix(options.id_prefix))
    return absl::InvalidArgumentError("--jobs_id_prefix must be [a-z0-9-], at most 63 characters");
  if (mkdir(options.dir.c_str(), 0700) != 0 && errno != EEXIST)
    return absl::PermissionDeniedError(absl::StrCat("cannot create --jobs_dir ", options.dir));
  struct stat st {};
  if (stat(options.dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    return absl::FailedPreconditionError(
        absl::StrCat("--jobs_dir ", options.dir, " is not a folder"));
  std::unique_ptr<JobStore> store(new JobStore(std::move(options)));
  RETURN_IF_ERROR(store->Load());
  store->Sweep();
  return store;
}

std::string JobStore::OwnerOf(const std::string& token) const {
  if (token.empty()) return "";
  char out[33];
  std::snprintf(out, sizeof(out), "%016llx%016llx",
                static_cast<unsigned long long>(Fnv(salt_ + "a", token)),
                static_cast<unsigned long long>(Fnv(salt_ + "b", token)));
  return out;
}

std::string JobStore::ResultPath(const std::string& id) const {
  return absl::StrCat(options_.dir, "/", id, ".safetensors");
}

absl::Status JobStore::Load() {
  // The salt of owner hashes: made once per store, so that owners survive a restart.
  const std::string salt_path = options_.dir + "/owner_salt";
  auto salt = ReadRegularFile(salt_path, 4096);
  if (salt.ok() && salt->size() == 32) {
    salt_ = *salt;
  } else {
    salt_ = RandomHex(16);
    RETURN_IF_ERROR(WriteWhole(salt_path, salt_));
  }
  DIR* dir = opendir(options_.dir.c_str());
  if (dir == nullptr)
    return absl::PermissionDeniedError(absl::StrCat("cannot read ", options_.dir));
  std::vector<std::string> names;
  while (dirent* e = readdir(dir)) names.emplace_back(e->d_name);
  closedir(dir);
  int interrupted = 0;
  for (const std::string& name : names) {
    const std::string path = options_.dir + "/" + name;
    if (absl::EndsWith(name, ".partial")) {  // a work file a stopped run left
      unlink(path.c_str());
      continue;
    }
    if (!absl::EndsWith(name, ".json")) continue;
    const std::string id = name.substr(0, name.size() - 5);
    auto text = ReadRegularFile(path, kMaxRecordBytes);
    const nlohmann::json record =
        text.ok() ? nlohmann::json::parse(*text, nullptr, false) : nlohmann::json();
    auto job = std::make_shared<DetachedJob>();
    job->id = id;
    if (!ValidId(id) || !record.is_object() || !record.contains("owner") ||
        !record["owner"].is_string() || !record.contains("info") ||
        !google::protobuf::util::JsonStringToMessage(record["info"].dump(), &job->info).ok()) {
      spdlog::warn("jobs: {} is not a job record; left alone", path);
      continue;
    }
    job->owner = record["owner"].get<std::string>();
    if (!JobFinished(job->info.status())) {
      // The job was running (or waiting) when the previous server stopped: it cannot go on.
      job->info.set_status(v1::JOB_FAILED);
      job->info.set_error_code(static_cast<int>(absl::StatusCode::kAborted));
      job->info.set_error_message("interrupted: the server stopped before the job finished");
      job->info.set_finished_unix_ms(UnixMs());
      job->info.set_queue_position(0);
      unlink(ResultPath(id).c_str());
      RETURN_IF_ERROR(Save(*job));
      ++interrupted;
    } else if (job->info.status() == v1::JOB_COMPLETED) {
      struct stat rs {};
      if (stat(ResultPath(id).c_str(), &rs) != 0 || rs.st_size != job->info.result_bytes()) {
        spdlog::warn("jobs: the result of job {} is missing or changed; the job is failed", id);
        job->info.set_status(v1::JOB_FAILED);
        job->info.set_error_code(static_cast<int>(absl::StatusCode::kDataLoss));
        job->info.set_error_message("the stored result is missing or changed");
        job->info.set_result_bytes(0);
        RETURN_IF_ERROR(Save(*job));
      }
    }
    jobs_[id] = std::move(job);
  }
  spdlog::info("jobs: {} in {} ({} interrupted by the last stop)", jobs_.size(), options_.dir,
               interrupted);
  return absl::OkStatus();
}

int64_t JobStore::UsedLocked(const std::string* owner) const {
  int64_t used = 0;
  for (const auto& [id, job] : jobs_) {
    if (owner != nullptr && job->owner != *owner) continue;
    std::lock_guard<std::mutex> lock(job->mu);
    used += job->reserved;
    if (job->info.status() == v1::JOB_COMPLETED) used += job->info.result_bytes();
  }
  return used;
}

absl::StatusOr<std::shared_ptr<DetachedJob>> JobStore::Create(const std::string& owner,
                                                              v1::GenerateRequest request) {
  Sweep();
  auto job = std::make_shared<DetachedJob>();
  {
    std::lock_guard<std::mutex> lock(mu_);
    int unfinished = 0;
    for (const auto& [id, other] : jobs_) {
      if (other->owner != owner) continue;
      std::lock_guard<std::mutex> job_lock(other->mu);
      unfinished += JobFinished(other->info.status()) ? 0 : 1;
    }
    if (unfinished >= options_.max_unfinished_per_owner) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "this token has ", unfinished, " unfinished jobs, the most the server allows (",
          options_.max_unfinished_per_owner, "); wait for some to end or cancel them"));
    }
    const int64_t mine = UsedLocked(&owner), all = UsedLocked(nullptr);
    if (mine >= options_.quota_bytes_per_owner) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "this token's results fill its quota (", mine, " of ", options_.quota_bytes_per_owner,
          " bytes, --jobs_token_quota_bytes); results are deleted after their time to live"));
    }
    if (all >= options_.quota_bytes) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "the server's result store is full (", all, " of ", options_.quota_bytes,
          " bytes, --jobs_quota_bytes); results are deleted after their time to live"));
    }
    if (static_cast<int>(jobs_.size()) >= options_.max_records) {
      // The oldest finished records make room; never an unfinished one.
      std::vector<std::pair<int64_t, std::string>> finished;
      for (const auto& [id, other] : jobs_) {
        std::lock_guard<std::mutex> job_lock(other->mu);
        if (JobFinished(other->info.status()))
          finished.emplace_back(other->info.finished_unix_ms(), id);
      }
      std::sort(finished.begin(), finished.end());
      for (size_t i = 0;
           i < finished.size() && static_cast<int>(jobs_.size()) >= options_.max_records; ++i)
        ForgetLocked(finished[i].second);
      if (static_cast<int>(jobs_.size()) >= options_.max_records)
        return absl::ResourceExhaustedError("the server holds as many unfinished jobs as it can");
    }
    do {
      job->id = options_.id_prefix.empty() ? RandomHex(16)
                                           : absl::StrCat(options_.id_prefix, "-", RandomHex(16));
    } while (jobs_.count(job->id) != 0);
    job->owner = owner;
    job->request = std::move(request);
    job->info.set_job_id(job->id);
    job->info.set_status(v1::JOB_RECEIVED);
    job->info.set_submitted_unix_ms(UnixMs());
    job->info.set_max_new_tokens(job->request.has_max_new_tokens()
                                     ? job->request.max_new_tokens()
                                     : static_cast<int32_t>(kDefaultMaxNewTokens));
    jobs_[job->id] = job;
  }
  std::lock_guard<std::mutex> job_lock(job->mu);
  if (absl::Status saved = Save(*job); !saved.ok()) {
    std::lock_guard<std::mutex> lock(mu_);
    jobs_.erase(job->id);
    return saved;
  }
  return job;
}

std::shared_ptr<DetachedJob> JobStore::Find(const std::string& owner, const std::string& id) {
  Sweep();
  std::lock_guard<std::mutex> lock(mu_);
  auto it = jobs_.find(id);
  if (it == jobs_.end() || it->second->owner != owner) return nullptr;
  if (ExpiredLocked(*it->second, UnixMs())) {  // exact, whenever the last sweep ran
    ForgetLocked(id);
    return nullptr;
  }
  return it->second;
}

std::vector<std::shared_ptr<DetachedJob>> JobStore::List(const std::string& owner) {
  Sweep();
  std::vector<std::pair<int64_t, std::shared_ptr<DetachedJob>>> mine;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [id, job] : jobs_) {
      if (job->owner != owner) continue;
      std::lock_guard<std::mutex> job_lock(job->mu);
      mine.emplace_back(job->info.submitted_unix_ms(), job);
    }
  }
  std::stable_sort(mine.begin(), mine.end(),
                   [](const auto& a, const auto& b) { return a.first > b.first; });
  std::vector<std::shared_ptr<DetachedJob>> out;
  for (auto& [t, job] : mine) out.push_back(std::move(job));
  return out;
}

absl::Status JobStore::Reserve(DetachedJob& job, int64_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t mine = UsedLocked(&job.owner), all = UsedLocked(nullptr);
  if (mine + bytes > options_.quota_bytes_per_owner) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the capture would take about ", bytes, " bytes; this token has ",
                     std::max<int64_t>(0, options_.quota_bytes_per_owner - mine),
                     " left of its quota (--jobs_token_quota_bytes)"));
  }
  if (all + bytes > options_.quota_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the capture would take about ", bytes, " bytes; the result store has ",
        std::max<int64_t>(0, options_.quota_bytes - all), " left (--jobs_quota_bytes)"));
  }
  std::lock_guard<std::mutex> job_lock(job.mu);
  job.reserved = bytes;
  return absl::OkStatus();
}

absl::Status JobStore::Save(const DetachedJob& job) {
  std::string info;
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  if (!google::protobuf::util::MessageToJsonString(job.info, &info, options).ok())
    return absl::InternalError("cannot encode a job record");
  const nlohmann::json record = {{"owner", job.owner},
                                 {"info", nlohmann::json::parse(info, nullptr, false)}};
  return WriteWhole(absl::StrCat(options_.dir, "/", job.id, ".json"), record.dump());
}

void JobStore::Finish(DetachedJob& job, v1::JobStatus status, const absl::Status& error,
                      int64_t result_bytes) {
  std::lock_guard<std::mutex> lock(mu_);  // the quota sees the reservation and the result at once
  std::lock_guard<std::mutex> job_lock(job.mu);
  job.reserved = 0;
  job.ticket = 0;
  job.request = v1::GenerateRequest();  // up to the request size limit each: not kept past the end
  job.info.set_status(status);
  job.info.set_queue_position(0);
  job.info.set_tokens(job.tokens.load());
  job.info.set_bytes(job.bytes.load());
  job.info.set_finished_unix_ms(UnixMs());
  if (status == v1::JOB_COMPLETED) {
    job.info.set_result_bytes(result_bytes);
    job.info.set_expires_unix_ms(job.info.finished_unix_ms() +
                                 static_cast<int64_t>(options_.ttl_s * 1000));
  } else {
    job.info.set_error_code(static_cast<int>(error.code()));
    job.info.set_error_message(std::string(error.message()));
    unlink(ResultPath(job.id).c_str());
  }
  if (absl::Status saved = Save(job); !saved.ok())
    spdlog::error("jobs: cannot record job {}: {}", job.id, std::string(saved.message()));
}

void JobStore::ForgetLocked(const std::string& id) {
  unlink(ResultPath(id).c_str());
  unlink(absl::StrCat(options_.dir, "/", id, ".json").c_str());
  jobs_.erase(id);
}

bool JobStore::ExpiredLocked(DetachedJob& job, int64_t now) const {
  std::lock_guard<std::mutex> job_lock(job.mu);
  if (!JobFinished(job.info.status())) return false;
  const int64_t end =
      job.info.status() == v1::JOB_COMPLETED
          ? job.info.expires_unix_ms()
          : job.info.finished_unix_ms() + static_cast<int64_t>(options_.ttl_s * 1000);
  return end <= now;
}

void JobStore::Sweep() {
  const int64_t now = UnixMs();
  int64_t last = last_sweep_ms_.load();
  if (now - last < 1000 || !last_sweep_ms_.compare_exchange_strong(last, now)) return;
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::string> expired;
  for (const auto& [id, job] : jobs_)
    if (ExpiredLocked(*job, now)) expired.push_back(id);
  for (const std::string& id : expired) ForgetLocked(id);
}

}  // namespace attnscope
