// Files that appear whole or not at all, safe in a folder other users can write to.
//
// A work file gets a fresh, unguessable name beside its final path (`<path>.XXXXXX.partial`, made
// with O_EXCL: a name or symlink planted by someone else is never opened or followed), is fsynced,
// and is published by rename; the folder is fsynced after. Without `replace`, publishing never
// replaces a file that appeared meanwhile (renameat2 RENAME_NOREPLACE, or link where the file
// system lacks it): two writers of one name cannot both believe they stored it.
#pragma once

#include <cstdio>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace attnscope {

class AtomicFile {
 public:
  static absl::StatusOr<std::unique_ptr<AtomicFile>> Create(const std::string& path);
  ~AtomicFile();  // removes the work file unless it was published
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  std::FILE* stream() const { return file_; }
  int fd() const;
  const std::string& work_path() const { return work_path_; }
  // Flushes and fsyncs the work file, closes it and renames it to the final path. Without
  // `replace`, ALREADY_EXISTS (and the work file removed) when the final path exists.
  absl::Status Publish(bool replace);

 private:
  AtomicFile(std::string path, std::string work_path, std::FILE* file);
  std::string path_, work_path_;
  std::FILE* file_ = nullptr;
  bool published_ = false;
};

// A scratch file in `dir` that has no name at all (O_TMPFILE, or created and unlinked at once):
// nobody else can open, replace or link it. Opened for reading and writing.
absl::StatusOr<std::FILE*> CreateScratchFile(const std::string& dir);

// The folder part of `path` ("." for a bare name).
std::string DirectoryOf(const std::string& path);

}  // namespace attnscope
