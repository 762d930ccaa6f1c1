#include "shm/shared_ring.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <mutex>
#include <thread>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace attnscope {
namespace shared_ring {
namespace {

constexpr absl::string_view kPrefix = "/attnscope-";

std::string Errno() { return std::strerror(errno); }

uint64_t Load64(const char* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

absl::Status RandomBytes(char* out, size_t n) {
  while (n > 0) {
    const ssize_t got = getrandom(out, n, 0);
    if (got < 0) {
      if (errno == EINTR) continue;
      return absl::InternalError(absl::StrCat("getrandom: ", Errno()));
    }
    out += got;
    n -= static_cast<size_t>(got);
  }
  return absl::OkStatus();
}

// Regions of this user's processes that died without removing them ("/attnscope-<pid>-...").
void RemoveOrphans() {
  DIR* dir = opendir("/dev/shm");
  if (dir == nullptr) return;
  while (const dirent* e = readdir(dir)) {
    const absl::string_view entry(e->d_name);
    if (entry.substr(0, kPrefix.size() - 1) != kPrefix.substr(1)) continue;
    const absl::string_view rest = entry.substr(kPrefix.size() - 1);
    long pid = 0;
    size_t i = 0;
    while (i < rest.size() && i < 9 && rest[i] >= '0' && rest[i] <= '9')
      pid = pid * 10 + (rest[i++] - '0');
    if (i == 0 || i >= rest.size() || rest[i] != '-' || pid <= 0) continue;
    if (kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH) continue;
    struct stat st;
    const std::string path = absl::StrCat("/dev/shm/", entry);
    if (lstat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode) && st.st_uid == getuid())
      shm_unlink(absl::StrCat("/", entry).c_str());
  }
  closedir(dir);
}

// The writer's mappings of client regions, guarded: a write into a page the client has cut off
// (it shrank its region, or /dev/shm ran out of room for a page) raises SIGBUS; the handler puts
// private zero pages in the region's place, the write is retried there and lands nowhere, and the
// writer sees `broken` and ends the stream (the pattern Wayland compositors use for the shared
// buffers of their clients). Lock-free, so that it is safe in a signal handler.
struct GuardSlot {
  std::atomic<int> used{0};
  std::atomic<uintptr_t> begin{0}, end{0};
  std::atomic<int> broken{0};
};
constexpr int kGuardSlots = 256;
GuardSlot g_guard[kGuardSlots];
struct sigaction g_previous_bus_action;
std::once_flag g_guard_once;
bool g_guard_installed = false;

void OnBusError(int sig, siginfo_t* info, void* context) {
  const auto addr = reinterpret_cast<uintptr_t>(info->si_addr);
  // A fault (si_code > 0) at a guarded address; one sent by kill or raise never is.
  for (GuardSlot& slot : g_guard) {
    if (info->si_code <= 0) break;
    const uintptr_t begin = slot.begin.load(std::memory_order_acquire);
    const uintptr_t end = slot.end.load(std::memory_order_acquire);
    if (begin == 0 || addr < begin || addr >= end) continue;
    if (mmap(reinterpret_cast<void*>(begin), end - begin, PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != MAP_FAILED) {
      slot.broken.store(1, std::memory_order_release);
      return;
    }
    break;
  }
  // Not a guarded region: what handled SIGBUS before (by default, the process ends as it would
  // have: a faulting access faults again under the default action).
  const struct sigaction& previous = g_previous_bus_action;
  if ((previous.sa_flags & SA_SIGINFO) != 0 && previous.sa_sigaction != nullptr) {
    previous.sa_sigaction(sig, info, context);
  } else if ((previous.sa_flags & SA_SIGINFO) == 0 && previous.sa_handler != SIG_DFL &&
             previous.sa_handler != SIG_IGN) {
    previous.sa_handler(sig);
  } else {
    signal(SIGBUS, SIG_DFL);
    if (info->si_code <= 0) raise(sig);  // sent, not a fault: delivered again once this returns
  }
}

// A guard slot for [begin, begin + bytes), or -1 (no handler, or all slots taken: the caller
// writes with pwrite instead).
int AcquireGuard(char* begin, int64_t bytes) {
  std::call_once(g_guard_once, [] {
    struct sigaction action {};
    action.sa_sigaction = OnBusError;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    g_guard_installed = sigaction(SIGBUS, &action, &g_previous_bus_action) == 0;
  });
  if (!g_guard_installed) return -1;
  const long page = sysconf(_SC_PAGESIZE);
  const uintptr_t end =
      reinterpret_cast<uintptr_t>(begin) + static_cast<uintptr_t>((bytes + page - 1) / page * page);
  for (int i = 0; i < kGuardSlots; ++i) {
    int expected = 0;
    if (!g_guard[i].used.compare_exchange_strong(expected, 1)) continue;
    g_guard[i].broken.store(0);
    g_guard[i].end.store(end, std::memory_order_release);
    g_guard[i].begin.store(reinterpret_cast<uintptr_t>(begin), std::memory_order_release);
    return i;
  }
  return -1;
}

void ReleaseGuard(int i) {
  g_guard[i].begin.store(0, std::memory_order_release);
  g_guard[i].end.store(0, std::memory_order_release);
  g_guard[i].broken.store(0);
  g_guard[i].used.store(0, std::memory_order_release);
}

}  // namespace

absl::Status CheckName(absl::string_view name) {
  const bool prefixed = name.substr(0, kPrefix.size()) == kPrefix;
  const absl::string_view rest = prefixed ? name.substr(kPrefix.size()) : absl::string_view();
  bool ok = prefixed && rest.size() >= 8 && rest.size() <= 64;
  for (char c : rest) {
    ok = ok && ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                c == '-' || c == '_');
  }
  if (ok) return absl::OkStatus();
  return absl::InvalidArgumentError(
      "shared_output.name must be \"/attnscope-\" followed by 8-64 of [A-Za-z0-9_-]");
}

// --- Writer ---------------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<Writer>> Writer::Open(const std::string& name, int64_t capacity,
                                                     const std::string& key, int64_t max_capacity) {
  if (absl::Status s = CheckName(name); !s.ok()) return s;
  if (static_cast<int64_t>(key.size()) != kKeyBytes)
    return absl::InvalidArgumentError(
        absl::StrCat("shared_output.key must be ", kKeyBytes, " bytes, not ", key.size()));
  if (max_capacity <= 0)
    return absl::FailedPreconditionError(
        "this server does not write to shared memory (--max_shared_bytes=0)");
  if (capacity < kMinCapacity || capacity > max_capacity) {
    return absl::FailedPreconditionError(absl::StrCat("shared_output.capacity ", capacity,
                                                      " is outside ", kMinCapacity, "-",
                                                      max_capacity, " (--max_shared_bytes)"));
  }
  // Refusals of the region itself (missing, not a region, wrong size, header or key) are
  // PERMISSION_DENIED with the details, which the server logs; the client is told only that the
  // region could not be used, so that no one learns about regions that are not theirs.
  // glibc's shm_open adds O_NOFOLLOW | O_CLOEXEC; O_NONBLOCK keeps a FIFO planted under the name
  // from blocking the open (fstat refuses it next).
  const int fd = shm_open(name.c_str(), O_RDWR | O_NONBLOCK, 0);
  if (fd < 0) {
    return absl::PermissionDeniedError(absl::StrCat(
        "cannot open the shared region ", name, " here: ", Errno(),
        errno == ENOENT ? " (the client is on another host, or in another IPC namespace)" : ""));
  }
  std::unique_ptr<Writer> w(new Writer(fd, capacity));
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
    return absl::PermissionDeniedError(absl::StrCat(name, " is not a shared-memory region"));
  if (st.st_size != kHeaderBytes + capacity) {
    return absl::PermissionDeniedError(absl::StrCat("the shared region ", name, " holds ",
                                                    st.st_size, " bytes, not the header and ",
                                                    capacity, " ring bytes the request says"));
  }
  char header[kReadAt + 8];
  if (pread(fd, header, sizeof(header), 0) != static_cast<ssize_t>(sizeof(header)))
    return absl::PermissionDeniedError(absl::StrCat("cannot read the header of ", name));
  uint32_t version;
  std::memcpy(&version, header + kVersionAt, 4);
  if (std::memcmp(header + kMagicAt, kMagic, 8) != 0 || version != kVersion ||
      Load64(header + kCapacityAt) != static_cast<uint64_t>(capacity)) {
    return absl::PermissionDeniedError(absl::StrCat("the shared region ", name,
                                                    " has no attnscope ring header of version ",
                                                    kVersion, " and capacity ", capacity));
  }
  // Constant time: how many leading bytes of a guess match must not show in the time taken.
  unsigned char differ = 0;
  for (int i = 0; i < kKeyBytes; ++i)
    differ |= static_cast<unsigned char>(header[kKeyAt + i] ^ key[static_cast<size_t>(i)]);
  if (differ != 0)
    return absl::PermissionDeniedError(
        absl::StrCat("the key does not match the shared region ", name));
  // A region is reused stream after stream: this stream starts where the client has read to.
  const uint64_t start = Load64(header + kReadAt);
  if (start > (uint64_t{1} << 62))
    return absl::PermissionDeniedError(
        absl::StrCat("the shared region ", name, " has a read position out of range"));
  w->read_ = w->write_ = static_cast<int64_t>(start);
  // The ring mapped for Place, under the guard; where it cannot be (pages larger than the header,
  // no guard slot), Place writes with pwrite.
  void* map = mmap(nullptr, static_cast<size_t>(capacity), PROT_READ | PROT_WRITE, MAP_SHARED, fd,
                   kHeaderBytes);
  if (map != MAP_FAILED) {
    w->guard_ = AcquireGuard(static_cast<char*>(map), capacity);
    if (w->guard_ >= 0) {
      w->map_ = static_cast<char*>(map);
    } else {
      munmap(map, static_cast<size_t>(capacity));
    }
  }
  return w;
}

Writer::~Writer() {
  // The guard goes first: once unmapped, the addresses may be mapped again by anyone else.
  if (guard_ >= 0) ReleaseGuard(guard_);
  if (map_ != nullptr) munmap(map_, static_cast<size_t>(capacity_));
  close(fd_);
}

absl::StatusOr<int64_t> Writer::ReadPosition() {
  // Two equal reads in a row: a value the client stored, never a torn mix of two.
  uint64_t previous = ~uint64_t{0};
  for (int attempt = 0; attempt < 16; ++attempt) {
    char bytes[8];
    if (pread(fd_, bytes, 8, kReadAt) != 8)
      return absl::FailedPreconditionError("the shared region was truncated by the client");
    const uint64_t v = Load64(bytes);
    if (v == previous) {
      // Behind the last value seen: no progress (a client's store seen part-way), not an error.
      if (v < static_cast<uint64_t>(read_)) return read_;
      if (v > static_cast<uint64_t>(write_)) {
        return absl::FailedPreconditionError(
            absl::StrCat("the shared region's read position ", v, " is outside the data written (",
                         read_, "-", write_, "): the client broke the ring protocol"));
      }
      read_ = static_cast<int64_t>(v);
      return read_;
    }
    previous = v;
  }
  return absl::FailedPreconditionError("the shared region's read position does not settle");
}

absl::Status Writer::WriteAt(int64_t ring_offset, absl::string_view bytes) {
  const char* p = bytes.data();
  int64_t left = static_cast<int64_t>(bytes.size());
  int64_t at = kHeaderBytes + ring_offset;
  while (left > 0) {
    const ssize_t n = pwrite(fd_, p, static_cast<size_t>(left), at);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      return absl::ResourceExhaustedError(
          absl::StrCat("cannot write to the shared region: ", n < 0 ? Errno() : "no progress"));
    }
    p += n;
    left -= n;
    at += n;
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> Writer::Reserve(int64_t n, const KeepWaiting& keep_waiting) {
  if (n > capacity_)
    return absl::InternalError(absl::StrCat("a piece of ", n, " bytes exceeds the ring"));
  int64_t position = write_;
  if (position % capacity_ + n > capacity_) position += capacity_ - position % capacity_;
  using Clock = std::chrono::steady_clock;
  Clock::time_point moved = Clock::now();
  auto pause = std::chrono::microseconds(20);
  // Real progress only: the idle clock restarts when the reader has freed a whole piece's worth
  // (this one's size, at most a quarter of the ring) since it last restarted. A reader that
  // creeps a byte at a time holds the slot no longer than one that reads nothing.
  const int64_t progress_bytes = std::max<int64_t>(1, std::min(n, capacity_ / 4));
  int64_t last_read = read_;
  while (position + n - read_ > capacity_) {
    auto read = ReadPosition();
    if (!read.ok()) return read.status();
    if (position + n - *read <= capacity_) break;
    const auto now = Clock::now();
    if (*read - last_read >= progress_bytes) {
      last_read = *read;
      moved = now;
    }
    if (absl::Status s = keep_waiting(std::chrono::duration<double>(now - moved).count());
        !s.ok()) {
      return s;
    }
    std::this_thread::sleep_for(pause);
    // A reader that is moving frees room within about a piece's read time: look again soon (a
    // long sleep here idles the engine). One that has not moved for a while: back off to 2 ms.
    const bool recent = now - moved < std::chrono::milliseconds(50);
    pause = std::min(pause * 2, std::chrono::microseconds(recent ? 100 : 2000));
  }
  return position;
}

absl::StatusOr<int64_t> Writer::Put(absl::string_view a, absl::string_view b,
                                    const KeepWaiting& keep_waiting) {
  const int64_t n = static_cast<int64_t>(a.size() + b.size());
  ASSIGN_OR_RETURN(const int64_t position, Reserve(n, keep_waiting));
  const int64_t offset = position % capacity_;
  RETURN_IF_ERROR(WriteAt(offset, a));
  RETURN_IF_ERROR(WriteAt(offset + static_cast<int64_t>(a.size()), b));
  write_ = position + n;
  return position;
}

absl::StatusOr<int64_t> Writer::Place(int64_t n, const std::function<void(char* dst)>& fill,
                                      const KeepWaiting& keep_waiting) {
  if (n < 0) return absl::InternalError("a piece of negative size");
  ASSIGN_OR_RETURN(const int64_t position, Reserve(n, keep_waiting));
  const int64_t offset = position % capacity_;
  if (map_ != nullptr) {
    if (g_guard[guard_].broken.load(std::memory_order_acquire) == 0) fill(map_ + offset);
    if (g_guard[guard_].broken.load(std::memory_order_acquire) != 0) {
      return absl::FailedPreconditionError(
          "the shared region was cut short during the stream (the client shrank it, or /dev/shm "
          "is full): the stream was stopped");
    }
  } else {
    std::string buffer(static_cast<size_t>(n), '\0');
    fill(buffer.data());
    RETURN_IF_ERROR(WriteAt(offset, buffer));
  }
  write_ = position + n;
  return position;
}

// --- Reader ---------------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<Reader>> Reader::Create(int64_t capacity) {
  if (capacity < kMinCapacity)
    return absl::InvalidArgumentError(
        absl::StrCat("a shared ring needs at least ", kMinCapacity, " bytes"));
  RemoveOrphans();
  std::unique_ptr<Reader> r(new Reader());
  char random[8 + kKeyBytes];
  if (absl::Status s = RandomBytes(random, sizeof(random)); !s.ok()) return s;
  r->name_ = absl::StrCat(kPrefix, getpid(), "-", absl::BytesToHexString({random, 8}));
  r->key_.assign(random + 8, kKeyBytes);
  r->capacity_ = capacity;
  r->map_size_ = kHeaderBytes + capacity;
  const int fd = shm_open(r->name_.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
  if (fd < 0) return absl::UnavailableError(absl::StrCat("shm_open ", r->name_, ": ", Errno()));
  r->linked_ = true;
  void* map = MAP_FAILED;
  if (ftruncate(fd, r->map_size_) == 0)
    map = mmap(nullptr, r->map_size_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const std::string error = Errno();
  close(fd);
  if (map == MAP_FAILED)
    return absl::UnavailableError(absl::StrCat("cannot map ", r->name_, ": ", error));
  r->map_ = static_cast<char*>(map);
  std::memcpy(r->map_ + kMagicAt, kMagic, 8);
  std::memcpy(r->map_ + kVersionAt, &kVersion, 4);
  const uint64_t cap = static_cast<uint64_t>(capacity);
  std::memcpy(r->map_ + kCapacityAt, &cap, 8);
  std::memcpy(r->map_ + kKeyAt, r->key_.data(), kKeyBytes);
  return r;
}

Reader::~Reader() {
  if (map_ != nullptr) munmap(map_, map_size_);
  Unlink();
}

void Reader::Unlink() {
  if (linked_) shm_unlink(name_.c_str());
  linked_ = false;
}

absl::StatusOr<absl::string_view> Reader::View(int64_t position, int64_t n) const {
  if (position < released_ || n < 0 || n > capacity_ || position > (int64_t{1} << 62) ||
      position + n - released_ > capacity_ || position % capacity_ + n > capacity_) {
    return absl::DataLossError(absl::StrCat(
        "malformed stream from the server: a shared piece at ", position, " of ", n,
        " bytes is outside the ring (capacity ", capacity_, ", released up to ", released_, ")"));
  }
  return absl::string_view(map_ + kHeaderBytes + position % capacity_, static_cast<size_t>(n));
}

absl::Status Reader::Release(int64_t end) {
  if (end < released_)
    return absl::InternalError("the shared ring's read position cannot go backwards");
  released_ = end;
  __atomic_store_n(reinterpret_cast<uint64_t*>(map_ + kReadAt), static_cast<uint64_t>(end),
                   __ATOMIC_RELEASE);
  return absl::OkStatus();
}

}  // namespace shared_ring
}  // namespace attnscope
