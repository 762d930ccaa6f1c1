// The shared-memory ring (shm/shared_ring.h) under what a hostile peer controls. The input's
// first byte picks the side; the rest is read as little-endian words:
//  - server side: a request (name: the real region's or from the input; capacity; key; the
//    server's limit), the region's header bytes as the client wrote them, then pieces to put
//    between read positions the client publishes;
//  - client side: pieces a server announces (position, size) and releases.
// No input may crash, read or write outside the region, or wait.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <string>

#include "shm/shared_ring.h"
#include "tests/fuzz/fuzz_target.h"

namespace {

using attnscope::shared_ring::Reader;
using attnscope::shared_ring::Writer;
namespace sr = attnscope::shared_ring;

class Input {
 public:
  Input(const uint8_t* data, size_t size) : p_(data), end_(data + size) {}
  bool empty() const { return p_ >= end_; }
  uint64_t Word() {
    uint64_t v = 0;
    const size_t n = std::min<size_t>(8, static_cast<size_t>(end_ - p_));
    std::memcpy(&v, p_, n);
    p_ += n;
    return v;
  }
  std::string Bytes(size_t n) {
    n = std::min(n, static_cast<size_t>(end_ - p_));
    std::string s(reinterpret_cast<const char*>(p_), n);
    p_ += n;
    return s;
  }

 private:
  const uint8_t* p_;
  const uint8_t* end_;
};

void Poke(const std::string& name, int64_t at, const std::string& bytes) {
  const int fd = shm_open(name.c_str(), O_RDWR, 0);
  if (fd < 0) return;
  if (pwrite(fd, bytes.data(), bytes.size(), at) < 0) {
  }
  close(fd);
}

absl::Status NeverWait(double) { return absl::DeadlineExceededError("full"); }

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  Input in(data + 1, size - 1);
  auto reader = Reader::Create(sr::kMinCapacity);
  if (!reader.ok()) return 0;
  const int64_t cap = sr::kMinCapacity;
  if (data[0] & 1) {  // client side
    for (int i = 0; i < 64 && !in.empty(); ++i) {
      const int64_t position = static_cast<int64_t>(in.Word());
      const int64_t n = static_cast<int64_t>(in.Word() % (2 * cap + 2)) - 1;
      auto view = (*reader)->View(position, n);
      attnscope::fuzz::Record(view.status());
      if (view.ok()) {
        volatile char sink = 0;
        for (char c : *view) sink = static_cast<char>(sink ^ c);
        attnscope::fuzz::Record((*reader)->Release(position + n));
      }
    }
    return 0;
  }
  // Server side.
  const uint64_t flags = in.Word();
  const std::string name = (flags & 1) ? (*reader)->name() : in.Bytes(flags >> 56);
  const int64_t capacity = (flags & 2) ? cap : static_cast<int64_t>(in.Word() % (4 * cap));
  const std::string key = (flags & 4) ? (*reader)->key() : in.Bytes(16 + (flags >> 8) % 3 - 1);
  const int64_t limit = (flags & 8) ? cap : static_cast<int64_t>(in.Word() % (4 * cap));
  if (flags & 16) Poke((*reader)->name(), static_cast<int64_t>((flags >> 16) % 128), in.Bytes(80));
  auto writer = Writer::Open(name, capacity, key, limit);
  attnscope::fuzz::Record(writer.status());
  if (!writer.ok()) return 0;
  static const std::string kPiece(sr::kMinCapacity, 'p');
  for (int i = 0; i < 64 && !in.empty(); ++i) {
    const uint64_t op = in.Word();
    if (op & 1) {  // the client publishes a read position (any value)
      const uint64_t read = in.Word();
      Poke((*reader)->name(), sr::kReadAt, std::string(reinterpret_cast<const char*>(&read), 8));
    } else if (op & 2) {  // the client shrinks or grows its region
      const int fd = shm_open((*reader)->name().c_str(), O_RDWR, 0);
      if (fd >= 0) {
        if (ftruncate(fd, static_cast<off_t>((op >> 8) % (2 * (sr::kHeaderBytes + cap)))) != 0) {
        }
        close(fd);
      }
    } else if (op & 4) {  // the engine writes in place, into a region that may have shrunk
      const int64_t n = static_cast<int64_t>((op >> 8) % (cap + 1));
      auto place = (*writer)->Place(
          n, [n](char* dst) { std::memcpy(dst, kPiece.data(), static_cast<size_t>(n)); },
          NeverWait);
      attnscope::fuzz::Record(place.status());
    } else {
      const size_t a = (op >> 8) % (cap + 1), b = (op >> 32) % (cap / 4);
      auto put = (*writer)->Put(absl::string_view(kPiece).substr(0, a),
                                absl::string_view(kPiece).substr(0, std::min<size_t>(b, cap - a)),
                                NeverWait);
      attnscope::fuzz::Record(put.status());
    }
  }
  return 0;
}
