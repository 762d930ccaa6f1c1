#include "engine/cpu_matvec.h"

#include <ATen/Parallel.h>

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#define ATTNSCOPE_CPU_MATVEC 1
#include <immintrin.h>
#endif

namespace attnscope {

#ifdef ATTNSCOPE_CPU_MATVEC
namespace {

__attribute__((target("avx2,fma"))) inline float Sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// y[r] = w[r]·x for rows [r0, r1) of w (rows of `in` floats), one row at a time as one sequential
// stream (which the hardware prefetcher follows best), four accumulators hiding the FMA latency.
__attribute__((target("avx2,fma"))) void MatvecRows(const float* w, int64_t in, const float* x,
                                                    float* y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* wr = w + r * in;
    __m256 a = _mm256_setzero_ps(), b = a, c = a, d = a;
    int64_t j = 0;
    for (; j + 32 <= in; j += 32) {
      a = _mm256_fmadd_ps(_mm256_loadu_ps(wr + j), _mm256_loadu_ps(x + j), a);
      b = _mm256_fmadd_ps(_mm256_loadu_ps(wr + j + 8), _mm256_loadu_ps(x + j + 8), b);
      c = _mm256_fmadd_ps(_mm256_loadu_ps(wr + j + 16), _mm256_loadu_ps(x + j + 16), c);
      d = _mm256_fmadd_ps(_mm256_loadu_ps(wr + j + 24), _mm256_loadu_ps(x + j + 24), d);
    }
    for (; j + 8 <= in; j += 8) {
      a = _mm256_fmadd_ps(_mm256_loadu_ps(wr + j), _mm256_loadu_ps(x + j), a);
    }
    float s = Sum8(_mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d)));
    for (; j < in; ++j) s += wr[j] * x[j];
    y[r] = s;
  }
}

}  // namespace
#endif

bool CpuMatvecSupports(const torch::Tensor& x, const torch::Tensor& w) {
#ifdef ATTNSCOPE_CPU_MATVEC
  static const bool cpu = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return cpu && x.device().is_cpu() && w.device().is_cpu() && x.scalar_type() == torch::kFloat32 &&
         w.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.size(0) == 1 && w.dim() == 2 &&
         x.size(1) == w.size(1) && x.is_contiguous() && w.is_contiguous();
#else
  (void)x;
  (void)w;
  return false;
#endif
}

torch::Tensor CpuMatvec(const torch::Tensor& x, const torch::Tensor& w) {
  const int64_t out = w.size(0), in = w.size(1);
  torch::Tensor y = torch::empty({1, out}, x.options());
#ifdef ATTNSCOPE_CPU_MATVEC
  const float* W = w.data_ptr<float>();
  const float* X = x.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  // Chunks of at least 2 MiB of weights: a decode step's projections stay on the calling thread
  // and only a matrix as large as the LM head is split. Every parallel region is a rendezvous of
  // the intra-op threads, and on a server whose cores the gRPC threads and clients share, thirty
  // of them per step cost more than the projections themselves.
  const int64_t grain = std::max<int64_t>(4, (int64_t{1} << 19) / std::max<int64_t>(in, 1));
  at::parallel_for(0, out, grain,
                   [&](int64_t begin, int64_t end) { MatvecRows(W, in, X, Y, begin, end); });
#endif
  return y;
}

}  // namespace attnscope
