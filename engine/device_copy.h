// Copies from the engine's device to the host that do not stop the device: on CUDA a copy into
// pinned memory queued behind the work so far, with an event the host polls or waits on; work
// queued after it keeps the device busy meanwhile. On the CPU the same calls copy at once.
#pragma once

#include <c10/core/Event.h>
#include <torch/torch.h>

#include <memory>

namespace attnscope {

// Marks the point reached on the device's current stream. On the CPU there is nothing to wait
// for: Done() is true at once.
class DeviceEvent {
 public:
  DeviceEvent() = default;
  explicit DeviceEvent(torch::Device device);  // recorded now, on the device's current stream
  bool Done() const;
  void Wait() const;

 private:
  std::unique_ptr<c10::Event> event_;  // CUDA only
};

// A host copy of `t` (contiguous, the same type), valid once an event recorded after the call is
// Done. On CUDA it lands in pinned memory without waiting; on the CPU it is a clone (the source
// may be a buffer the next block reuses).
torch::Tensor HostCopyQueued(const torch::Tensor& t);

// Waits until the device has done all the work queued on its current stream (no-op on the CPU).
void WaitForDevice(torch::Device device);

}  // namespace attnscope
