#include "engine/rope.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace attnscope {

torch::Tensor RopeInverseFrequencies(const RopeConfig& rope, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  std::vector<float> inv(half);
  for (int64_t i = 0; i < half; ++i) {
    // θ_i = base^(-2i/d)
    double f =
        1.0 / std::pow(rope.theta, static_cast<double>(2 * i) / static_cast<double>(head_dim));
    if (rope.scaling == RopeScaling::kLinear) {
      f /= rope.factor;
    } else if (rope.scaling == RopeScaling::kLlama3) {
      // Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
      const double wavelen = 2.0 * M_PI / f;
      const double low_freq_wavelen = rope.original_max_positions / rope.low_freq_factor;
      const double high_freq_wavelen = rope.original_max_positions / rope.high_freq_factor;
      if (wavelen > low_freq_wavelen) {
        f /= rope.factor;
      } else if (wavelen >= high_freq_wavelen) {
        const double smooth = (rope.original_max_positions / wavelen - rope.low_freq_factor) /
                              (rope.high_freq_factor - rope.low_freq_factor);
        f = (1.0 - smooth) * f / rope.factor + smooth * f;
      }
    }
    inv[i] = static_cast<float>(f);
  }
  return torch::tensor(inv, torch::dtype(torch::kFloat32));
}

std::pair<torch::Tensor, torch::Tensor> RopeTables(const torch::Tensor& inv_freq, int64_t pos0,
                                                   int64_t n, torch::ScalarType dtype) {
  torch::Tensor pos = torch::arange(pos0, pos0 + n, inv_freq.options());  // (n) float32
  torch::Tensor freqs = torch::outer(pos, inv_freq);                      // (n, head_dim / 2)
  torch::Tensor angles = torch::cat({freqs, freqs}, -1);                  // (n, head_dim)
  return {angles.cos().to(dtype), angles.sin().to(dtype)};
}

// What every other device and type runs, and what the CPU pass equals.
torch::Tensor RopeExpression(const torch::Tensor& x, const torch::Tensor& cos,
                             const torch::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  // rotate_half(x) = [-x2, x1]
  torch::Tensor rotated = torch::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return x * cos + rotated * sin;
}

torch::Tensor ApplyRope(const torch::Tensor& x, const torch::Tensor& cos,
                        const torch::Tensor& sin) {
  const bool cpu_float = x.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu() &&
                         x.scalar_type() == torch::kFloat32 &&
                         cos.scalar_type() == torch::kFloat32 &&
                         sin.scalar_type() == torch::kFloat32;
  if (!cpu_float || x.dim() != 3 || x.stride(2) != 1 || x.size(2) % 2 != 0 || cos.dim() != 2 ||
      cos.sizes() != sin.sizes() || cos.size(0) != x.size(1) || cos.size(1) != x.size(2)) {
    return RopeExpression(x, cos, sin);
  }
  const int64_t heads = x.size(0), n = x.size(1), dim = x.size(2), half = dim / 2;
  const torch::Tensor c = cos.contiguous(), s = sin.contiguous();
  // x's layout (a transposed projection stays one; anything else comes out contiguous).
  torch::Tensor out = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), os0 = out.stride(0), os1 = out.stride(1);
  // Rows (head, position) split among threads; a decode step's few rows run on the caller's.
  const int64_t grain = std::max<int64_t>(1, 16384 / dim);
  at::parallel_for(0, heads * n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t h = row / n, i = row % n;
      const float* xr = xp + h * xs0 + i * xs1;
      const float* cr = cp + i * dim;
      const float* sr = sp + i * dim;
      float* o = op + h * os0 + i * os1;
      // Each product rounded on its own, then the sum (this file is compiled without contraction
      // into fused multiply-adds): the expression's x·cos + rotated·sin, bit for bit.
      for (int64_t j = 0; j < half; ++j) o[j] = xr[j] * cr[j] + (-xr[j + half]) * sr[j];
      for (int64_t j = half; j < dim; ++j) o[j] = xr[j] * cr[j] + xr[j - half] * sr[j];
    }
  });
  return out;
}

std::pair<torch::Tensor, torch::Tensor> RopeTableCache::Rows(const torch::Tensor& inv_freq,
                                                             int64_t pos0, int64_t n,
                                                             torch::ScalarType dtype) {
  if (!cos_.defined() || dtype != dtype_ || pos0 < begin_ || pos0 + n > end_) {
    begin_ = pos0;
    end_ = pos0 + n + kAhead;
    dtype_ = dtype;
    std::tie(cos_, sin_) = RopeTables(inv_freq, begin_, end_ - begin_, dtype);
    ++tables_made_;
  }
  return {cos_.narrow(0, pos0 - begin_, n), sin_.narrow(0, pos0 - begin_, n)};
}

}  // namespace attnscope
