// The same-host ring (shm/shared_ring.h) between a writer and a reader in one process: the
// protocol (positions, laps, waiting for the reader, reuse stream after stream) and every way a
// careless or hostile peer can break it, each refused with its message and never a crash.
#include "shm/shared_ring.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

namespace attnscope {
namespace shared_ring {
namespace {

constexpr int64_t kCap = kMinCapacity;  // 64 KiB

absl::Status NeverWait(double) { return absl::DeadlineExceededError("ring full"); }

std::string Bytes(int64_t n, char seed) {
  std::string s(static_cast<size_t>(n), '\0');
  for (int64_t i = 0; i < n; ++i) s[i] = static_cast<char>(seed + i * 7);
  return s;
}

// Writes into the region's header as a (hostile) client could.
void Poke(const Reader& r, int64_t at, const void* bytes, size_t n) {
  const int fd = shm_open(r.name().c_str(), O_RDWR, 0);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(pwrite(fd, bytes, n, at), static_cast<ssize_t>(n));
  close(fd);
}

TEST(SharedRing, Names) {
  EXPECT_TRUE(CheckName("/attnscope-1234-abcdef0123456789").ok());
  EXPECT_TRUE(CheckName("/attnscope-ABCD_efg").ok());
  for (const char* bad :
       {"", "/attnscope-", "/attnscope-short", "attnscope-12345678", "/attnscope-../../etc/passwd",
        "/attnscope-1234/5678", "/other-12345678", "/attnscope-12345678\n",
        "/attnscope-0123456789012345678901234567890123456789012345678901234567890"
        "123456789"}) {
    absl::Status s = CheckName(bad);
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << bad;
    EXPECT_NE(s.message().find("/attnscope-"), absl::string_view::npos);
  }
}

TEST(SharedRing, PiecesTravelInOrderAcrossLaps) {
  auto reader = Reader::Create(kCap);
  ASSERT_TRUE(reader.ok()) << reader.status();
  auto writer = Writer::Open((*reader)->name(), kCap, (*reader)->key(), kCap);
  ASSERT_TRUE(writer.ok()) << writer.status();
  // 10 laps of pieces that do not divide the ring: each skips to the next lap rather than wrap.
  int64_t expected_next = 0;
  for (int i = 0; i < 40; ++i) {
    const std::string values = Bytes(9000 + i, static_cast<char>(i)), indices = Bytes(100, 'x');
    auto position = (*writer)->Put(values, indices, NeverWait);
    ASSERT_TRUE(position.ok()) << position.status();
    EXPECT_GE(*position, expected_next);
    EXPECT_LE(*position % kCap + 9100 + i, kCap);
    auto view = (*reader)->View(*position, static_cast<int64_t>(values.size() + indices.size()));
    ASSERT_TRUE(view.ok()) << view.status();
    EXPECT_EQ(std::string(*view), values + indices);
    expected_next = *position + static_cast<int64_t>(values.size() + indices.size());
    ASSERT_TRUE((*reader)->Release(expected_next).ok());
  }
  EXPECT_GT(expected_next, 5 * kCap);
  // The next stream on the same region starts where this one was read to.
  auto again = Writer::Open((*reader)->name(), kCap, (*reader)->key(), kCap);
  ASSERT_TRUE(again.ok()) << again.status();
  auto position = (*again)->Put("abc", "", NeverWait);
  ASSERT_TRUE(position.ok());
  EXPECT_GE(*position, expected_next);
}

TEST(SharedRing, WriterWaitsForTheReaderAndGivesUpWhenTold) {
  auto reader = Reader::Create(kCap);
  ASSERT_TRUE(reader.ok());
  auto writer = Writer::Open((*reader)->name(), kCap, (*reader)->key(), kCap);
  ASSERT_TRUE(writer.ok());
  const std::string quarter = Bytes(kCap / 4, 'q');
  for (int i = 0; i < 4; ++i) ASSERT_TRUE((*writer)->Put(quarter, "", NeverWait).ok());
  // Full: a writer told to stop waiting says so; nothing was overwritten.
  auto refused = (*writer)->Put(quarter, "", NeverWait);
  EXPECT_TRUE(absl::IsDeadlineExceeded(refused.status())) << refused.status();
  // A reader that frees a quarter lets the next piece in; the writer saw it wait.
  std::atomic<int> waits{0};
  std::thread release([&] {
    while (waits.load() < 3) std::this_thread::yield();
    ASSERT_TRUE((*reader)->Release(kCap / 4).ok());
  });
  auto position = (*writer)->Put(quarter, "", [&](double idle_s) {
    EXPECT_GE(idle_s, 0);
    ++waits;
    return absl::OkStatus();
  });
  release.join();
  ASSERT_TRUE(position.ok()) << position.status();
  EXPECT_EQ(*position, kCap);
  EXPECT_GE(waits.load(), 3);
}

// Issue 21.C4: a reader that advances a byte at a time (a slowloris) is as stalled as one that
// reads nothing: only a whole piece's worth of reading restarts the idle clock.
TEST(SharedRing, CreepingReaderCountsAsStalled) {
  auto reader = Reader::Create(kCap);
  ASSERT_TRUE(reader.ok());
  auto writer = Writer::Open((*reader)->name(), kCap, (*reader)->key(), kCap);
  ASSERT_TRUE(writer.ok());
  const std::string quarter = Bytes(kCap / 4, 'q');
  for (int i = 0; i < 4; ++i) ASSERT_TRUE((*writer)->Put(quarter, "", NeverWait).ok());
  std::atomic<bool> stop{false};
  std::thread creep([&] {
    for (int64_t at = 1; !stop.load() && at < kCap / 4; ++at) {
      ASSERT_TRUE((*reader)->Release(at).ok());
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });
  const auto started = std::chrono::steady_clock::now();
  auto position = (*writer)->Put(quarter, "", [](double idle_s) {
    return idle_s > 0.3 ? absl::DeadlineExceededError("stalled") : absl::OkStatus();
  });
  const double waited =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  stop = true;
  creep.join();
  EXPECT_TRUE(absl::IsDeadlineExceeded(position.status())) << position.status();
  EXPECT_LT(waited, 5.0);
}

TEST(SharedRing, OpenRefusesWhatTheRequestDoesNotMatch) {
  auto reader = Reader::Create(kCap);
  ASSERT_TRUE(reader.ok());
  const std::string name = (*reader)->name(), key = (*reader)->key();
  struct Case {
    std::string name;
    int64_t capacity;
    std::string key;
    int64_t limit;
    absl::StatusCode code;
    const char* message;
  } cases[] = {
      // The region's own refusals are PERMISSION_DENIED (the server logs them, the client hears
      // one generic line); the server's limits are FAILED_PRECONDITION.
      {"/attnscope-nosuchregion", kCap, key, kCap, absl::StatusCode::kPermissionDenied,
       "another host"},
      {name, kCap, std::string(16, 'k'), kCap, absl::StatusCode::kPermissionDenied,
       "key does not match"},
      {name, kCap, "short", kCap, absl::StatusCode::kInvalidArgument, "16 bytes"},
      {name, kCap * 2, key, kCap * 4, absl::StatusCode::kPermissionDenied, "holds"},
      {name, kCap, key, kCap / 2, absl::StatusCode::kFailedPrecondition, "--max_shared_bytes"},
      {name, kCap, key, 0, absl::StatusCode::kFailedPrecondition, "--max_shared_bytes=0"},
      {name, 1024, key, kCap, absl::StatusCode::kFailedPrecondition, "outside"},
      {"/etc/passwd", kCap, key, kCap, absl::StatusCode::kInvalidArgument, "/attnscope-"},
  };
  for (const Case& c : cases) {
    auto w = Writer::Open(c.name, c.capacity, c.key, c.limit);
    ASSERT_FALSE(w.ok()) << c.name;
    EXPECT_EQ(w.status().code(), c.code) << w.status();
    EXPECT_NE(w.status().message().find(c.message), absl::string_view::npos) << w.status();
  }
  // A region whose header is not a ring's.
  Poke(**reader, kMagicAt, "NOTARING", 8);
  auto w = Writer::Open(name, kCap, key, kCap);
  EXPECT_TRUE(absl::IsPermissionDenied(w.status())) << w.status();
}

TEST(SharedRing, HostileReaderPositionsAreRefused) {
  auto reader = Reader::Create(kCap);
  ASSERT_TRUE(reader.ok());
  auto writer = Writer::Open((*reader)->name(), kCap, (*reader)->key(), kCap);
  ASSERT_TRUE(writer.ok());
  const std::string half = Bytes(kCap / 2, 'h');
  ASSERT_TRUE((*writer)->Put(half, "", NeverWait).ok());
  ASSERT_TRUE((*writer)->Put(half, "", NeverWait).ok());
  // Behind what was seen (a store caught part-way): no progress, so the writer waits.
  const uint64_t released = kCap / 2, behind = 8;
  Poke(**reader, kReadAt, &released, 8);
  ASSERT_TRUE((*writer)->Put(half, "", NeverWait).ok());
  Poke(**reader, kReadAt, &behind, 8);
  auto waited = (*writer)->Put(half, "", NeverWait);
  EXPECT_TRUE(absl::IsDeadlineExceeded(waited.status())) << waited.status();
  // A read position past what was written: the writer must not trust it and overwrite.
  const uint64_t ahead = 10 * kCap;
  Poke(**reader, kReadAt, &ahead, 8);
  auto p = (*writer)->Put(half, "", NeverWait);
  EXPECT_TRUE(absl::IsFailedPrecondition(p.status())) << p.status();
  EXPECT_NE(p.status().message().find("read position"), absl::string_view::npos);
}

TEST(SharedRing, TruncatedOrRemovedRegionCostsTheServerNothing) {
  auto reader = Reader::Create(kCap);
  ASSERT_TRUE(reader.ok());
  auto writer = Writer::Open((*reader)->name(), kCap, (*reader)->key(), kCap);
  ASSERT_TRUE(writer.ok());
  // The client shrinks its region to nothing: the writer (no mapping) is not hit by SIGBUS; its
  // writes stay inside the header and ring it was given, and a read position that reads back as
  // 0 is a client that reads nothing: the writer waits (and the stall timeout ends it).
  const int fd = shm_open((*reader)->name().c_str(), O_RDWR, 0);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, 0), 0);
  close(fd);
  const std::string quarter = Bytes(kCap / 4, 't');
  for (int i = 0; i < 4; ++i) EXPECT_TRUE((*writer)->Put(quarter, "", NeverWait).ok());
  auto p = (*writer)->Put(quarter, "", NeverWait);
  EXPECT_TRUE(absl::IsDeadlineExceeded(p.status())) << p.status();
  struct stat st;
  ASSERT_EQ(stat(("/dev/shm" + (*reader)->name()).c_str(), &st), 0);
  EXPECT_LE(st.st_size, kHeaderBytes + kCap);
  // Unlinked by the client mid-stream: the open region stays writable for the server.
  (*reader)->Unlink();
  auto other = Reader::Create(kCap);
  ASSERT_TRUE(other.ok());
  auto w2 = Writer::Open((*other)->name(), kCap, (*other)->key(), kCap);
  ASSERT_TRUE(w2.ok());
  (*other)->Unlink();
  EXPECT_TRUE((*w2)->Put(quarter, "", NeverWait).ok());
}

// Place: the writer's own callback writes straight into the mapped ring, mixed with Put's pieces,
// lap after lap.
TEST(SharedRing, PlaceWritesInPlace) {
  auto reader = Reader::Create(kCap);
  ASSERT_TRUE(reader.ok()) << reader.status();
  auto writer = Writer::Open((*reader)->name(), kCap, (*reader)->key(), kCap);
  ASSERT_TRUE(writer.ok()) << writer.status();
  EXPECT_TRUE((*writer)->mapped());
  for (int i = 0; i < 30; ++i) {
    const std::string piece = Bytes(5000 + 333 * i, static_cast<char>(i));
    auto p = i % 3 == 0
                 ? (*writer)->Put(piece, "", NeverWait)
                 : (*writer)->Place(
                       static_cast<int64_t>(piece.size()),
                       [&](char* dst) { std::memcpy(dst, piece.data(), piece.size()); }, NeverWait);
    ASSERT_TRUE(p.ok()) << p.status();
    auto view = (*reader)->View(*p, static_cast<int64_t>(piece.size()));
    ASSERT_TRUE(view.ok()) << view.status();
    EXPECT_EQ(*view, piece) << i;
    ASSERT_TRUE((*reader)->Release(*p + static_cast<int64_t>(piece.size())).ok());
  }
  // A full ring waits for the reader, as Put does.
  auto full = (*writer)->Place(
      kCap, [](char*) {}, NeverWait);
  EXPECT_TRUE(absl::IsDeadlineExceeded(full.status())) << full.status();
}

// A client that shrinks its region while the server writes into the mapping: the SIGBUS the write
// raises is absorbed (private pages take the region's place), Place says why, and the process and
// other writers carry on.
TEST(SharedRing, PlaceSurvivesARegionCutShort) {
  auto reader = Reader::Create(kCap);
  auto other = Reader::Create(kCap);
  ASSERT_TRUE(reader.ok() && other.ok());
  auto writer = Writer::Open((*reader)->name(), kCap, (*reader)->key(), kCap);
  auto healthy = Writer::Open((*other)->name(), kCap, (*other)->key(), kCap);
  ASSERT_TRUE(writer.ok() && healthy.ok());
  ASSERT_TRUE((*writer)->mapped());
  const std::string piece = Bytes(kCap / 4, 'c');
  const auto copy = [&](char* dst) { std::memcpy(dst, piece.data(), piece.size()); };
  ASSERT_TRUE((*writer)->Place(kCap / 4, copy, NeverWait).ok());
  const int fd = shm_open((*reader)->name().c_str(), O_RDWR, 0);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, 0), 0);
  close(fd);
  auto cut = (*writer)->Place(kCap / 4, copy, NeverWait);
  EXPECT_TRUE(absl::IsFailedPrecondition(cut.status())) << cut.status();
  EXPECT_NE(cut.status().message().find("cut short"), absl::string_view::npos);
  // Stays refused; the file was not written past its new size.
  EXPECT_TRUE(absl::IsFailedPrecondition((*writer)->Place(16, copy, NeverWait).status()));
  struct stat st;
  ASSERT_EQ(stat(("/dev/shm" + (*reader)->name()).c_str(), &st), 0);
  EXPECT_EQ(st.st_size, 0);
  auto fine = (*healthy)->Place(kCap / 4, copy, NeverWait);
  ASSERT_TRUE(fine.ok()) << fine.status();
  auto view = (*other)->View(*fine, kCap / 4);
  ASSERT_TRUE(view.ok());
  EXPECT_EQ(*view, piece);
}

// Under AddressSanitizer the dying child would leave a report (the sanitizer's own SIGBUS handler
// is the one chained to); the plain build checks it.
#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define ATTNSCOPE_TEST_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define ATTNSCOPE_TEST_ASAN 1
#endif
#ifndef ATTNSCOPE_TEST_ASAN
TEST(SharedRing, OtherBusErrorsStillEndTheProcess) {
  auto reader = Reader::Create(kCap);
  ASSERT_TRUE(reader.ok());
  auto writer = Writer::Open((*reader)->name(), kCap, (*reader)->key(), kCap);
  ASSERT_TRUE(writer.ok() && (*writer)->mapped());  // the guard is installed
  // Sent by raise, and a real fault in a truncated mapping that is not a ring's.
  EXPECT_EXIT(raise(SIGBUS), testing::KilledBySignal(SIGBUS), "");
  EXPECT_EXIT(
      {
        const int fd = shm_open((*reader)->name().c_str(), O_RDWR, 0);
        char* p =
            static_cast<char*>(mmap(nullptr, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0));
        if (ftruncate(fd, 0) == 0) p[100] = 1;
        std::exit(0);
      },
      testing::KilledBySignal(SIGBUS), "");
}
#endif

TEST(SharedRing, ReaderRefusesPiecesOutsideTheRing) {
  auto reader = Reader::Create(kCap);
  ASSERT_TRUE(reader.ok());
  ASSERT_TRUE((*reader)->Release(1000).ok());
  struct Piece {
    int64_t position, n;
  } bad[] = {
      {999, 10},                  // before what was released
      {1000, -1},                 // negative
      {1000, kCap + 1},           // larger than the ring
      {kCap - 10, 20},            // crosses the ring's end
      {1000 + kCap, 10},          // over data not yet released
      {int64_t{1} << 62 | 1, 0},  // absurd position
      {INT64_MAX - 5, 10},        // overflow
  };
  for (const Piece& p : bad) {
    auto v = (*reader)->View(p.position, p.n);
    EXPECT_TRUE(absl::IsDataLoss(v.status())) << p.position << " " << p.n;
  }
  EXPECT_TRUE((*reader)->View(1000, 0).ok());
  EXPECT_TRUE((*reader)->View(kCap, 1000).ok());
  EXPECT_FALSE((*reader)->Release(999).ok());
}

TEST(SharedRing, RegionIsPrivateAndRemovedWithTheReader) {
  std::string path;
  {
    auto reader = Reader::Create(kCap);
    ASSERT_TRUE(reader.ok());
    path = "/dev/shm" + (*reader)->name();
    struct stat st;
    ASSERT_EQ(stat(path.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600u);
    EXPECT_EQ(st.st_size, kHeaderBytes + kCap);
  }
  struct stat st;
  EXPECT_NE(stat(path.c_str(), &st), 0);
}

TEST(SharedRing, OrphansOfDeadProcessesAreRemoved) {
  // A region left by a process that no longer exists (pid 2^22 + 1 is above pid_max's default).
  const std::string name = "/attnscope-4194305-deadbeefdeadbeef";
  const int fd = shm_open(name.c_str(), O_RDWR | O_CREAT, 0600);
  ASSERT_GE(fd, 0);
  close(fd);
  auto reader = Reader::Create(kCap);
  ASSERT_TRUE(reader.ok());
  struct stat st;
  EXPECT_NE(stat(("/dev/shm" + name).c_str(), &st), 0);
  shm_unlink(name.c_str());
}

}  // namespace
}  // namespace shared_ring
}  // namespace attnscope
