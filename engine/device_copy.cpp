#include "engine/device_copy.h"

#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <thread>

namespace attnscope {

DeviceEvent::DeviceEvent(torch::Device device) {
  if (!device.is_cuda()) return;
  event_ = std::make_unique<c10::Event>(device.type());
  event_->record(c10::impl::getDeviceGuardImpl(device.type())->getStream(device));
}

bool DeviceEvent::Done() const { return event_ == nullptr || event_->query(); }

void DeviceEvent::Wait() const {
  // Polled rather than blocking on the event: a blocking wait spins or sleeps per the device's
  // flags, which the engine does not own.
  while (!Done()) std::this_thread::yield();
}

torch::Tensor HostCopyQueued(const torch::Tensor& t) {
  if (!t.device().is_cuda()) return t.clone(at::MemoryFormat::Contiguous);
  torch::Tensor host =
      torch::empty(t.sizes(), torch::TensorOptions().dtype(t.scalar_type()).pinned_memory(true));
  host.copy_(t, /*non_blocking=*/true);
  return host;
}

void WaitForDevice(torch::Device device) { DeviceEvent(device).Wait(); }

}  // namespace attnscope
