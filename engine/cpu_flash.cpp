#include "engine/cpu_flash.h"

#include <ATen/Parallel.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if TORCH_VERSION_MAJOR >= 2 && defined(__x86_64__) && defined(__GNUC__)
#define ATTNSCOPE_CPU_FLASH 1
#include <immintrin.h>
// The Fortran BLAS of libtorch's build (MKL in the x86 wheels), column-major, 32-bit sizes. Weak:
// a libtorch built without it leaves it null, and the kernel reports itself unsupported.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c, const int* ldc)
    __attribute__((weak));
#endif

namespace attnscope {

#ifdef ATTNSCOPE_CPU_FLASH
namespace {

// A tile stacks the query heads that share a kv head, position-major (row i·group + j: position
// first + i, head h0 + j), so that one product per key tile serves the whole group.
constexpr int64_t kRowTile = 128;  // stacked query rows per tile, at most
constexpr int64_t kKeyTile = 512;  // keys per tile

// Row-major c (m × n, row stride ldc) = alpha · a (m × k) · bᵀ (b: n × k) + beta · c.
void GemmAbt(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
             const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  // Column-major, cᵀ (n × m) = b · aᵀ: b's rows are the columns of a column-major (k × n)
  // matrix, transposed; a's rows those of a column-major (k × m) one, as they are.
  const int im = static_cast<int>(n), in = static_cast<int>(m), ik = static_cast<int>(k);
  const int ia = static_cast<int>(ldb), ib = static_cast<int>(lda), ic = static_cast<int>(ldc);
  sgemm_("T", "N", &im, &in, &ik, &alpha, b, &ia, a, &ib, &beta, c, &ic);
}

// Row-major c (m × n) = alpha · a (m × k) · b (k × n) + beta · c.
void GemmAb(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
            const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const int im = static_cast<int>(n), in = static_cast<int>(m), ik = static_cast<int>(k);
  const int ia = static_cast<int>(ldb), ib = static_cast<int>(lda), ic = static_cast<int>(ldc);
  sgemm_("N", "N", &im, &in, &ik, &alpha, b, &ia, a, &ib, &beta, c, &ic);
}

// exp(x) for x <= 0 in eight lanes: 2^j · exp(r) with j = round(x / ln 2) and |r| <= ln 2 / 2,
// exp(r) by its Taylor series to degree 7 (truncation below 5e-9 relative, under float's rounding);
// x below -87.3 (where float's exp leaves the normal range) gives exactly 0.
__attribute__((target("avx2,fma"))) inline __m256 ExpNonPositive(__m256 x) {
  const __m256 lowest = _mm256_set1_ps(-87.3f);
  const __m256 keep = _mm256_cmp_ps(x, lowest, _CMP_GE_OQ);
  x = _mm256_max_ps(x, lowest);
  const __m256 j = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - j·ln 2, with ln 2 split in two so that j·ln2_hi is exact.
  __m256 r = _mm256_fnmadd_ps(j, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(j, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  // 2^j through the exponent bits (j >= -126 after the clamp).
  const __m256i bits =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(j), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(bits)), keep);
}

__attribute__((target("avx2,fma"))) inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) inline float HorizontalMax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The largest of x[0, n).
__attribute__((target("avx2,fma"))) float RowMax(const float* x, int64_t n) {
  __m256 m0 = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), m1 = m0;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + j));
    m1 = _mm256_max_ps(m1, _mm256_loadu_ps(x + j + 8));
  }
  float m = HorizontalMax(_mm256_max_ps(m0, m1));
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// x[j] <- exp(x[j] - max) over [0, n); returns Σ exp(x - max) and adds Σ exp(x - max)·(x - max)
// to *dot (the entropy's term, read only when entropy is set).
__attribute__((target("avx2,fma"))) float ExpRow(float* x, int64_t n, float max, bool entropy,
                                                 float* dot) {
  const __m256 vmax = _mm256_set1_ps(max);
  __m256 sum0 = _mm256_setzero_ps(), sum1 = sum0, dot0 = sum0, dot1 = sum0;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(x + j), vmax);
    const __m256 d1 = _mm256_sub_ps(_mm256_loadu_ps(x + j + 8), vmax);
    const __m256 e0 = ExpNonPositive(d0), e1 = ExpNonPositive(d1);
    _mm256_storeu_ps(x + j, e0);
    _mm256_storeu_ps(x + j + 8, e1);
    sum0 = _mm256_add_ps(sum0, e0);
    sum1 = _mm256_add_ps(sum1, e1);
    if (entropy) {  // e·d, with d clamped where e is 0 so that no 0·(-inf) arises
      dot0 = _mm256_fmadd_ps(e0, _mm256_max_ps(d0, _mm256_set1_ps(-88.0f)), dot0);
      dot1 = _mm256_fmadd_ps(e1, _mm256_max_ps(d1, _mm256_set1_ps(-88.0f)), dot1);
    }
  }
  float sum = HorizontalSum(_mm256_add_ps(sum0, sum1));
  float d = HorizontalSum(_mm256_add_ps(dot0, dot1));
  for (; j < n; ++j) {
    const float dj = x[j] - max;
    const float e = dj >= -87.3f ? std::exp(dj) : 0.0f;
    x[j] = e;
    sum += e;
    d += e * std::max(dj, -88.0f);
  }
  *dot += d;
  return sum;
}

// The running state of one query row across its key tiles (FlashAttention's online softmax):
// with m the largest score so far, l = Σ exp(s - m), dot = Σ exp(s - m)·(s - m), and the sink and
// local sums of exp(s - m) over their keys.
struct RowState {
  float max;
  float sum;
  float dot;
  float sink;
  float local;
};

struct Problem {
  const float* q;  // (heads, n, dim) with strides q_head, q_row
  const float* k;  // (kv_heads, keys, dim) with strides k_head, k_row
  const float* v;  // likewise
  int64_t q_head, q_row, k_head, k_row, v_head, v_row;
  int64_t heads, group, n, dim, pos0, window;
  FlashStatistics stats;
  float* out;        // (n, heads, dim) contiguous
  float* lse;        // (heads, n)
  float* entropy;    // (heads, n) or null
  float* sink;       // (heads, n) or null
  float* local;      // (heads, n) or null
  float* key_score;  // (heads, keys) zeros, or null
};

// Copies the query rows of positions [r0, r0 + positions) of kv head g's query heads into qs,
// stacked position-major (row i·group + j: position r0 + i, head g·group + j), contiguous.
void StackQueries(const Problem& p, int64_t g, int64_t r0, int64_t positions, float* qs) {
  for (int64_t i = 0; i < positions; ++i) {
    for (int64_t j = 0; j < p.group; ++j) {
      const float* src = p.q + (g * p.group + j) * p.q_head + (r0 + i) * p.q_row;
      std::copy(src, src + p.dim, qs + (i * p.group + j) * p.dim);
    }
  }
}

// dst[j] += exp(s[j] - lse) over [0, n): the probabilities of one row, from its log-sum-exp.
__attribute__((target("avx2,fma"))) void AddProbabilities(const float* s, int64_t n, float lse,
                                                          float* dst) {
  const __m256 vlse = _mm256_set1_ps(lse);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = ExpNonPositive(_mm256_sub_ps(_mm256_loadu_ps(s + j), vlse));
    _mm256_storeu_ps(dst + j, _mm256_add_ps(_mm256_loadu_ps(dst + j), e));
  }
  for (; j < n; ++j) dst[j] += std::exp(s[j] - lse);
}

// Positions per tile: kRowTile stacked rows, whole groups.
int64_t TilePositions(int64_t group) { return std::max<int64_t>(1, kRowTile / group); }

// One tile: query positions [r0, r0 + positions) of the query heads of kv head g, stacked.
// buffers: qs (kRowTile × dim), scores (kRowTile × kKeyTile), acc (kRowTile × dim), state
// (kRowTile).
__attribute__((target("avx2,fma"))) void QueryTile(const Problem& p, int64_t g, int64_t r0,
                                                   float* qs, float* scores, float* acc,
                                                   RowState* state) {
  const int64_t group = p.group, dim = p.dim;
  const int64_t positions = std::min(TilePositions(group), p.n - r0), rows = positions * group;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(dim)));
  StackQueries(p, g, r0, positions, qs);
  const float* q = qs;
  const float* k = p.k + g * p.k_head;
  const float* v = p.v + g * p.v_head;
  const int64_t first = p.pos0 + r0;  // position of the tile's first row
  // Keys the tile's rows see: [lo, hi).
  const int64_t lo = p.window > 0 ? std::max<int64_t>(0, first - p.window + 1) : 0;
  const int64_t hi = first + positions;
  for (int64_t i = 0; i < rows; ++i)
    state[i] = {-std::numeric_limits<float>::infinity(), 0, 0, 0, 0};
  std::fill(acc, acc + rows * dim, 0.0f);
  for (int64_t c0 = lo; c0 < hi; c0 += kKeyTile) {
    const int64_t cols = std::min(kKeyTile, hi - c0);
    // scores (rows × cols) = scale · q·kᵀ
    GemmAbt(rows, cols, dim, scale, q, dim, k + c0 * p.k_row, p.k_row, 0.0f, scores, cols);
    for (int64_t i = 0; i < rows; ++i) {
      float* s = scores + i * cols;
      const int64_t pos = first + i / group;
      const int64_t row_lo = p.window > 0 ? std::max<int64_t>(0, pos - p.window + 1) : 0;
      // This row's keys in the tile: columns [a, b).
      const int64_t a = std::clamp<int64_t>(row_lo - c0, 0, cols);
      const int64_t b = std::clamp<int64_t>(pos + 1 - c0, 0, cols);
      if (a >= b) {
        std::fill(s, s + cols, 0.0f);
        continue;
      }
      std::fill(s, s + a, 0.0f);
      std::fill(s + b, s + cols, 0.0f);
      RowState& st = state[i];
      const float max = std::max(st.max, RowMax(s + a, b - a));
      float dot = 0;
      const float sum = ExpRow(s + a, b - a, max, p.stats.entropy, &dot);
      float sink = 0, local = 0;
      if (p.stats.sink > 0) {  // keys [0, sink)
        for (int64_t j = a, e = std::min(b, p.stats.sink - c0); j < e; ++j) sink += s[j];
      }
      if (p.stats.local > 0) {  // keys (pos - local, pos]
        for (int64_t j = std::max(a, pos - p.stats.local + 1 - c0); j < b; ++j) local += s[j];
      }
      if (st.sum == 0) {  // the row's first keys
        st = {max, sum, dot, sink, local};
        continue;
      }
      // Rescale what came before to the new max: exp(s - max) = alpha · exp(s - old max), and
      // (s - max) = (s - old max) + (old max - max).
      const float alpha = std::exp(st.max - max);
      st.dot = alpha * (st.dot + st.sum * (st.max - max)) + dot;
      st.sum = alpha * st.sum + sum;
      st.sink = alpha * st.sink + sink;
      st.local = alpha * st.local + local;
      st.max = max;
      if (alpha != 1.0f) {
        float* o = acc + i * dim;
        for (int64_t d = 0; d < dim; ++d) o[d] *= alpha;
      }
    }
    // acc (rows × dim) += exp(s - max) · v
    GemmAb(rows, dim, cols, 1.0f, scores, cols, v + c0 * p.v_row, p.v_row, 1.0f, acc, dim);
  }
  for (int64_t i = 0; i < rows; ++i) {
    const RowState& st = state[i];
    const int64_t r = r0 + i / group, h = g * group + i % group;
    const float inv = 1.0f / st.sum;
    float* o = p.out + (r * p.heads + h) * dim;
    const float* a = acc + i * dim;
    for (int64_t d = 0; d < dim; ++d) o[d] = a[d] * inv;
    const float log_sum = std::log(st.sum);
    p.lse[h * p.n + r] = st.max + log_sum;
    // H = -Σ p·log p = log l - Σ p·(s - max), p = exp(s - max) / l.
    if (p.entropy != nullptr) p.entropy[h * p.n + r] = std::max(0.0f, log_sum - st.dot * inv);
    if (p.sink != nullptr) p.sink[h * p.n + r] = st.sink * inv;
    if (p.local != nullptr) p.local[h * p.n + r] = st.local * inv;
  }
}

// The key score's share of key tile [c0, c0 + kKeyTile) for kv head g's query heads: Σ over the
// rows [key_score_begin, key_score_end) of exp(s - lse), after the pass has every row's lse.
__attribute__((target("avx2,fma"))) void KeyScoreTile(const Problem& p, int64_t g, int64_t c0,
                                                      float* qs, float* scores) {
  const int64_t group = p.group, dim = p.dim, keys = p.pos0 + p.n;
  const int64_t cols = std::min(kKeyTile, keys - c0);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(dim)));
  const float* k = p.k + g * p.k_head;
  for (int64_t r0 = p.stats.key_score_begin; r0 < p.stats.key_score_end;) {
    const int64_t positions = std::min(TilePositions(group), p.stats.key_score_end - r0);
    const int64_t rows = positions * group;
    if (p.pos0 + r0 + positions <= c0) {  // these rows come before the tile's keys
      r0 += positions;
      continue;
    }
    StackQueries(p, g, r0, positions, qs);
    GemmAbt(rows, cols, dim, scale, qs, dim, k + c0 * p.k_row, p.k_row, 0.0f, scores, cols);
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t r = r0 + i / group, pos = p.pos0 + r, h = g * group + i % group;
      const int64_t row_lo = p.window > 0 ? std::max<int64_t>(0, pos - p.window + 1) : 0;
      const int64_t a = std::clamp<int64_t>(row_lo - c0, 0, cols);
      const int64_t b = std::clamp<int64_t>(pos + 1 - c0, 0, cols);
      if (a < b) {
        AddProbabilities(scores + i * cols + a, b - a, p.lse[h * p.n + r],
                         p.key_score + h * keys + c0 + a);
      }
    }
    r0 += positions;
  }
}

}  // namespace
#endif

bool CpuFlashSupports(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
#ifdef ATTNSCOPE_CPU_FLASH
  static const bool cpu = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return cpu && sgemm_ != nullptr && q.device().is_cpu() && q.scalar_type() == torch::kFloat32 &&
         k.scalar_type() == torch::kFloat32 && v.scalar_type() == torch::kFloat32 &&
         q.size(2) == k.size(2) && k.size(2) == v.size(2) && q.stride(2) == 1 && k.stride(2) == 1 &&
         v.stride(2) == 1 && q.size(0) % k.size(0) == 0;
#else
  (void)q;
  (void)k;
  (void)v;
  return false;
#endif
}

FlashResult CpuFlashAttention(const torch::Tensor& q, const torch::Tensor& k,
                              const torch::Tensor& v, int64_t pos0, int64_t window,
                              const FlashStatistics& stats) {
  FlashResult result;
#ifdef ATTNSCOPE_CPU_FLASH
  const int64_t heads = q.size(0), n = q.size(1), dim = q.size(2);
  auto f32 = q.options().dtype(torch::kFloat32);
  torch::Tensor out = torch::empty({n, heads, dim}, f32);  // the layout the output projection reads
  result.lse = torch::empty({heads, n}, f32);
  if (stats.entropy) result.entropy = torch::empty({heads, n}, f32);
  if (stats.sink > 0) result.sink = torch::empty({heads, n}, f32);
  if (stats.local > 0) result.local = torch::empty({heads, n}, f32);
  const bool key_score = stats.key_score_end > stats.key_score_begin;
  const int64_t keys = pos0 + n;
  if (key_score) result.key_score = torch::zeros({heads, keys}, f32);
  Problem p{q.data_ptr<float>(),
            k.data_ptr<float>(),
            v.data_ptr<float>(),
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            heads,
            heads / k.size(0),
            n,
            dim,
            pos0,
            window,
            stats,
            out.data_ptr<float>(),
            result.lse.data_ptr<float>(),
            stats.entropy ? result.entropy.data_ptr<float>() : nullptr,
            stats.sink > 0 ? result.sink.data_ptr<float>() : nullptr,
            stats.local > 0 ? result.local.data_ptr<float>() : nullptr,
            key_score ? result.key_score.data_ptr<float>() : nullptr};
  const int64_t kv_heads = k.size(0), per_tile = TilePositions(p.group);
  const int64_t tiles = (n + per_tile - 1) / per_tile;
  // Work items in pairs of an early (short) and a late (long) tile of every kv head, so that each
  // thread's contiguous share of them costs about the same.
  at::parallel_for(0, kv_heads * tiles, 1, [&](int64_t begin, int64_t end) {
    const int64_t rows = per_tile * p.group;
    std::vector<float> qs(rows * dim), scores(rows * kKeyTile), acc(rows * dim);
    std::vector<RowState> state(rows);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t j = w / kv_heads;
      const int64_t tile = j % 2 == 0 ? j / 2 : tiles - 1 - j / 2;
      QueryTile(p, w % kv_heads, tile * per_tile, qs.data(), scores.data(), acc.data(),
                state.data());
    }
  });
  if (key_score) {  // a second pass over key tiles, for the rows of the key score only
    const int64_t key_tiles = (keys + kKeyTile - 1) / kKeyTile;
    at::parallel_for(0, kv_heads * key_tiles, 1, [&](int64_t begin, int64_t end) {
      const int64_t rows = per_tile * p.group;
      std::vector<float> qs(rows * dim), scores(rows * kKeyTile);
      for (int64_t w = begin; w < end; ++w) {
        KeyScoreTile(p, w % kv_heads, (w / kv_heads) * kKeyTile, qs.data(), scores.data());
      }
    });
  }
  result.out = out.permute({1, 0, 2});
#else
  (void)q;
  (void)k;
  (void)v;
  (void)pos0;
  (void)window;
  (void)stats;
#endif
  return result;
}

}  // namespace attnscope
