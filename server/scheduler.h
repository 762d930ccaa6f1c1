// Admission and engine threads: at most `max_concurrent` generations run, at most `max_queue`
// wait; beyond that a submission is refused at once (the caller answers RESOURCE_EXHAUSTED).
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace attnscope {

struct SchedulerOptions {
  int max_concurrent = 1;  // engine threads, i.e. generations running at once
  int max_queue = 16;      // generations waiting for a thread
};

class Scheduler {
 public:
  explicit Scheduler(const SchedulerOptions& options);
  ~Scheduler();  // finishes queued jobs' refusal callbacks, joins the threads

  // Queues `job` for an engine thread; false (and `job` not kept) when the queue is full or the
  // scheduler is shutting down.
  bool TrySubmit(std::function<void()> job);
  // Stops accepting; jobs already queued still run.
  void Shutdown();

  int queued() const;
  int running() const;

 private:
  void Loop();
  SchedulerOptions options_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  int running_ = 0;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace attnscope
