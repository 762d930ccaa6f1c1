// The host allocator for a process that runs the engine. A CPU capture allocates and frees blocks
// of tens of MiB per query block (probabilities, scores, captured rows); glibc's defaults hand
// such blocks back to the kernel on free (munmap, heap trimming) and the next allocation faults in
// fresh zeroed pages: about 15-18 % of a CPU capture's time at 4k tokens (BENCHMARKS.md, "Same-host
// output").
#pragma once

#include <cstdint>

namespace attnscope {

constexpr int64_t kDefaultRetainedHostBytes = int64_t{512} << 20;

// Keeps up to `bytes` of freed memory per allocator arena for reuse: blocks up to 32 MiB (glibc's
// ceiling) come from the heap instead of their own mappings, and the heap is trimmed only past
// `bytes`. 0 or less: glibc's defaults (and its MALLOC_* environment) stay. A no-op elsewhere than
// glibc. Call once, before the engine runs.
void RetainFreedHostMemory(int64_t bytes);

}  // namespace attnscope
