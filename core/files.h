// Reading files that a user or a checkpoint controls: only regular files (a FIFO or a device
// would block or never end), opened without blocking, and never more than a stated size.
// Header-only: the clients use it without the model library.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace attnscope {

// Opens `path` for reading if it is a regular file. NOT_FOUND when it does not exist.
inline absl::StatusOr<int> OpenRegularFile(const std::string& path, struct stat* st) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT) return absl::NotFoundError(absl::StrCat(path, " does not exist"));
    return absl::PermissionDeniedError(
        absl::StrCat("cannot open ", path, ": ", std::strerror(err)));
  }
  if (fstat(fd, st) != 0 || !S_ISREG(st->st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, " is not a regular file"));
  }
  // Back to blocking reads (a regular file never blocks, but keep the usual semantics).
  const int flags = fcntl(fd, F_GETFL);
  if (flags >= 0) fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
  return fd;
}

// The whole content of a regular file of at most `max_bytes`.
inline absl::StatusOr<std::string> ReadRegularFile(const std::string& path, int64_t max_bytes) {
  struct stat st {};
  absl::StatusOr<int> fd = OpenRegularFile(path, &st);
  if (!fd.ok()) return fd.status();
  if (st.st_size > max_bytes) {
    ::close(*fd);
    return absl::InvalidArgumentError(absl::StrCat(
        path, " is ", st.st_size, " bytes, more than the ", max_bytes, " bytes allowed for it"));
  }
  std::string out(static_cast<size_t>(st.st_size), '\0');
  size_t done = 0;
  while (done < out.size()) {
    const ssize_t n = ::read(*fd, out.data() + done, out.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
  ::close(*fd);
  out.resize(done);  // a file that shrank while read
  return out;
}

}  // namespace attnscope
