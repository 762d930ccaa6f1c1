#include "cli/host_memory.h"

#include <algorithm>
#include <climits>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace attnscope {

void RetainFreedHostMemory(int64_t bytes) {
#if defined(__GLIBC__)
  if (bytes <= 0) return;
  const int64_t trim = std::min<int64_t>(bytes, INT_MAX);
  mallopt(M_MMAP_THRESHOLD, static_cast<int>(std::min<int64_t>(trim, int64_t{32} << 20)));
  mallopt(M_TRIM_THRESHOLD, static_cast<int>(trim));
#else
  (void)bytes;
#endif
}

}  // namespace attnscope
