// Same-host output without the wire: a POSIX shared-memory ring the client creates and the server
// writes attention values into (the proto's SharedOutput). Torn-free, bounded, and safe against a
// hostile peer on either side:
//
//   region = [header: kHeaderBytes][ring: capacity bytes]
//   header = magic "ATTNRING" @0, version u32 @8, capacity u64 @16, key[16] @24,
//            read position u64 @64 (the client's; little-endian, 8-byte aligned)
//
// Positions are byte counts since the stream began; a piece of `n` bytes at position p lives at
// ring offset p % capacity and never wraps (the writer skips to the next lap when it would). The
// writer reads the client's position with pread, never through a mapping; it maps only the ring,
// which Place fills in place (the engine writes attention values straight into it), under a
// SIGBUS guard: a client that shrinks or unlinks its region cannot crash the server (the faulting
// writes land in private pages and the stream ends), and nothing outside [header, header +
// capacity) of the region the request named is ever written. Put writes with pwrite.
// The key, random and readable only by whoever can open the region, keeps one client from naming
// another's region. A client reuses its region for its streams one after another (each starts at
// the read position the last one left); it removes the name when done, and Create removes the
// names its dead processes left behind.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace attnscope {
namespace shared_ring {

constexpr int64_t kHeaderBytes = 4096;
constexpr int64_t kKeyBytes = 16;
constexpr int64_t kMinCapacity = int64_t{1} << 16;  // 64 KiB
constexpr uint32_t kVersion = 1;
constexpr int64_t kMagicAt = 0, kVersionAt = 8, kCapacityAt = 16, kKeyAt = 24, kReadAt = 64;
inline constexpr char kMagic[9] = "ATTNRING";

// "/attnscope-" followed by 8-64 of [A-Za-z0-9_-]: no path, nothing but our own regions.
absl::Status CheckName(absl::string_view name);

// The server's side of one stream's region.
class Writer {
 public:
  // Opens the region the request names and checks it against the request (size, magic, version,
  // capacity, key) and the server's limit. InvalidArgument for a malformed name or key;
  // FailedPrecondition for everything the client's environment decides (no such region here, no
  // permission, over the limit, a mismatch): the caller falls back to the wire, saying why.
  static absl::StatusOr<std::unique_ptr<Writer>> Open(const std::string& name, int64_t capacity,
                                                      const std::string& key, int64_t max_capacity);
  ~Writer();
  Writer(const Writer&) = delete;
  Writer& operator=(const Writer&) = delete;

  int64_t capacity() const { return capacity_; }

  // Called while the ring is full, with the seconds since the reader last moved; a non-OK status
  // gives up (cancelled stream, stall timeout).
  using KeepWaiting = std::function<absl::Status(double idle_s)>;

  // Writes `a` then `b` (either may be empty) contiguously at the next position that has room,
  // waiting for the reader as needed; returns the position. a.size() + b.size() <= capacity.
  absl::StatusOr<int64_t> Put(absl::string_view a, absl::string_view b,
                              const KeepWaiting& keep_waiting);

  // Reserves `n` <= capacity bytes at the next position with room (waiting as Put does), has
  // `fill` write them in place (into the mapped ring; where the ring is not mapped, into a buffer
  // then pwrite), and returns the position. FailedPrecondition once the client has cut its region
  // short: what `fill` wrote then went to private pages, never to the server's own memory.
  absl::StatusOr<int64_t> Place(int64_t n, const std::function<void(char* dst)>& fill,
                                const KeepWaiting& keep_waiting);
  bool mapped() const { return map_ != nullptr; }

 private:
  Writer(int fd, int64_t capacity) : fd_(fd), capacity_(capacity) {}
  absl::StatusOr<int64_t> Reserve(int64_t n, const KeepWaiting& keep_waiting);
  // The client's read position, checked: never past what was written (an error); a value behind
  // the last one seen counts as no progress.
  absl::StatusOr<int64_t> ReadPosition();
  absl::Status WriteAt(int64_t ring_offset, absl::string_view bytes);

  int fd_;
  int64_t capacity_;
  char* map_ = nullptr;  // the ring, mapped and guarded, or null
  int guard_ = -1;
  int64_t write_ = 0;  // end of the last piece
  int64_t read_ = 0;   // the client's position as last seen
};

// The client's side: creates the region (mode 0600, a fresh random name and key), hands out views
// of the pieces the server announces, and publishes how far it has read.
class Reader {
 public:
  static absl::StatusOr<std::unique_ptr<Reader>> Create(int64_t capacity);
  ~Reader();  // unmaps and removes the name
  Reader(const Reader&) = delete;
  Reader& operator=(const Reader&) = delete;

  const std::string& name() const { return name_; }
  const std::string& key() const { return key_; }
  int64_t capacity() const { return capacity_; }

  // Removes the name (the server has opened it, or will not); the mapping stays. Idempotent.
  void Unlink();
  // The piece [position, position + n), checked against the ring and what was released: a piece
  // out of order, overlapping unreleased data or crossing the ring's end is an error (a broken or
  // hostile server), never a read outside the mapping.
  absl::StatusOr<absl::string_view> View(int64_t position, int64_t n) const;
  // Everything before `end` has been copied out; the server may reuse it.
  absl::Status Release(int64_t end);

 private:
  Reader() = default;
  std::string name_, key_;
  int64_t capacity_ = 0;
  char* map_ = nullptr;
  int64_t map_size_ = 0;
  int64_t released_ = 0;
  bool linked_ = false;
};

}  // namespace shared_ring
}  // namespace attnscope
