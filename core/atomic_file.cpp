#include "core/atomic_file.h"

#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace attnscope {
namespace {

// The mode a plain creat() would give: 0666 less the umask (mkstemp's files are 0600).
mode_t DefaultFileMode() {
  static const mode_t mode = [] {
    const mode_t mask = umask(022);
    umask(mask);
    return static_cast<mode_t>(0666 & ~mask);
  }();
  return mode;
}

absl::Status Errno(const std::string& what, int err) {
  const std::string message = absl::StrCat(what, ": ", std::strerror(err));
  if (err == ENOSPC || err == EDQUOT) return absl::ResourceExhaustedError(message);
  if (err == EEXIST) return absl::AlreadyExistsError(message);
  return absl::PermissionDeniedError(message);
}

// fsync of a folder, so that a rename in it survives a crash.
void SyncDirectory(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

}  // namespace

std::string DirectoryOf(const std::string& path) {
  const auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

AtomicFile::AtomicFile(std::string path, std::string work_path, std::FILE* file)
    : path_(std::move(path)), work_path_(std::move(work_path)), file_(file) {}

absl::StatusOr<std::unique_ptr<AtomicFile>> AtomicFile::Create(const std::string& path) {
  const std::string suffix = ".partial";
  std::string name = absl::StrCat(path, ".XXXXXX", suffix);
  // mkstemps: O_CREAT | O_EXCL under a random name, so nothing planted is opened or followed.
  const int fd = mkostemps(name.data(), static_cast<int>(suffix.size()), O_CLOEXEC);
  if (fd < 0) return Errno(absl::StrCat("cannot create a work file beside ", path), errno);
  fchmod(fd, DefaultFileMode());
  std::FILE* file = fdopen(fd, "w+b");
  if (file == nullptr) {
    const int err = errno;
    ::close(fd);
    ::unlink(name.c_str());
    return Errno(absl::StrCat("cannot open ", name), err);
  }
  return std::unique_ptr<AtomicFile>(new AtomicFile(path, std::move(name), file));
}

int AtomicFile::fd() const { return file_ != nullptr ? fileno(file_) : -1; }

AtomicFile::~AtomicFile() {
  if (file_ != nullptr) std::fclose(file_);
  if (!published_) ::unlink(work_path_.c_str());
}

absl::Status AtomicFile::Publish(bool replace) {
  if (file_ == nullptr)
    return absl::FailedPreconditionError(absl::StrCat(path_, ": published twice"));
  absl::Status s;
  if (std::fflush(file_) != 0 || ::fsync(fileno(file_)) != 0)
    s = Errno(absl::StrCat("cannot write ", work_path_), errno);
  if (std::fclose(file_) != 0 && s.ok())
    s = Errno(absl::StrCat("cannot close ", work_path_), errno);
  file_ = nullptr;
  if (!s.ok()) return s;
  if (replace) {
    if (std::rename(work_path_.c_str(), path_.c_str()) != 0)
      return Errno(absl::StrCat("cannot rename ", work_path_, " to ", path_), errno);
  } else if (renameat2(AT_FDCWD, work_path_.c_str(), AT_FDCWD, path_.c_str(), RENAME_NOREPLACE) !=
             0) {
    int err = errno;
    if (err == EINVAL || err == ENOSYS) {  // a file system without RENAME_NOREPLACE
      err = ::link(work_path_.c_str(), path_.c_str()) == 0 ? 0 : errno;
      if (err == 0) ::unlink(work_path_.c_str());
    }
    if (err == EEXIST) {
      return absl::AlreadyExistsError(
          absl::StrCat(path_,
                       " appeared while this run wrote it (another capture into the same folder?); "
                       "it was left as it is and this copy was not stored"));
    }
    if (err != 0) return Errno(absl::StrCat("cannot rename ", work_path_, " to ", path_), err);
  }
  published_ = true;
  SyncDirectory(DirectoryOf(path_));
  return absl::OkStatus();
}

absl::StatusOr<std::FILE*> CreateScratchFile(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0) {  // a file system without O_TMPFILE: a random name, unlinked at once
    std::string name = absl::StrCat(dir, "/.attnscope-scratch-XXXXXX");
    fd = mkostemp(name.data(), O_CLOEXEC);
    if (fd < 0) return Errno(absl::StrCat("cannot create a work file in ", dir), errno);
    ::unlink(name.c_str());
  }
  std::FILE* file = fdopen(fd, "w+b");
  if (file == nullptr) {
    const int err = errno;
    ::close(fd);
    return Errno(absl::StrCat("cannot open a work file in ", dir), err);
  }
  return file;
}

}  // namespace attnscope
