// Admission and worker threads: at most `max_concurrent` jobs run, at most `max_queue` wait;
// beyond that a submission is refused at once (the caller answers RESOURCE_EXHAUSTED). A queued
// job whose client left is withdrawn, so it gives its queue place back at once.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace attnscope {

struct SchedulerOptions {
  int max_concurrent = 1;  // worker threads, i.e. jobs running at once (1..kMaxConcurrent)
  int max_queue = 16;      // jobs waiting for a thread (0..kMaxQueue)
};

class Scheduler {
 public:
  static constexpr int kMaxConcurrent = 256;
  static constexpr int kMaxQueue = 100000;
  using Ticket = uint64_t;  // 0: refused

  explicit Scheduler(const SchedulerOptions& options);
  ~Scheduler();  // stops accepting, runs what is queued, joins the threads

  // Queues `job` for a worker thread. Returns its ticket, or 0 (and `job` not kept) when the queue
  // is full or the scheduler is shutting down.
  Ticket TrySubmit(std::function<void()> job);
  // Removes a job that has not started: true when it was still queued (it will never run), false
  // when it already started, finished or was never admitted.
  bool Withdraw(Ticket ticket);
  // Stops accepting; jobs already queued still run.
  void Shutdown();

  // A queued job's place in the queue (1: next), or 0 when it is not queued.
  int Position(Ticket ticket) const;
  int queued() const;
  int running() const;

 private:
  void Loop();
  SchedulerOptions options_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<Ticket, std::function<void()>>> queue_;
  Ticket next_ticket_ = 1;
  int running_ = 0;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace attnscope
