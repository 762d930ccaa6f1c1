#include "server/scheduler.h"

#include <algorithm>

namespace attnscope {

Scheduler::Scheduler(const SchedulerOptions& options) : options_(options) {
  options_.max_concurrent = std::clamp(options_.max_concurrent, 1, kMaxConcurrent);
  options_.max_queue = std::clamp(options_.max_queue, 0, kMaxQueue);
  for (int i = 0; i < options_.max_concurrent; ++i) threads_.emplace_back([this] { Loop(); });
}

Scheduler::~Scheduler() {
  Shutdown();
  for (auto& t : threads_) t.join();
}

Scheduler::Ticket Scheduler::TrySubmit(std::function<void()> job) {
  Ticket ticket = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return 0;
    // A free thread takes the job at once; otherwise it must fit in the waiting queue.
    const int waiting_after =
        static_cast<int>(queue_.size()) + 1 - (options_.max_concurrent - running_);
    if (waiting_after > options_.max_queue) return 0;
    ticket = next_ticket_++;
    queue_.emplace_back(ticket, std::move(job));
  }
  cv_.notify_one();
  return ticket;
}

bool Scheduler::Withdraw(Ticket ticket) {
  std::function<void()> job;  // destroyed outside the lock
  std::lock_guard<std::mutex> lock(mu_);
  auto it =
      std::find_if(queue_.begin(), queue_.end(), [&](const auto& q) { return q.first == ticket; });
  if (it == queue_.end()) return false;
  job = std::move(it->second);
  queue_.erase(it);
  return true;
}

void Scheduler::Shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
}

int Scheduler::queued() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int>(queue_.size());
}

int Scheduler::running() const {
  std::lock_guard<std::mutex> lock(mu_);
  return running_;
}

void Scheduler::Loop() {
  for (;;) {
    std::function<void()> job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping and drained
      job = std::move(queue_.front().second);
      queue_.pop_front();
      ++running_;
    }
    job();
    job = nullptr;
    std::lock_guard<std::mutex> lock(mu_);
    --running_;
  }
}

int Scheduler::Position(Ticket ticket) const {
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t i = 0; i < queue_.size(); ++i)
    if (queue_[i].first == ticket) return static_cast<int>(i) + 1;
  return 0;
}

}  // namespace attnscope
