#include "engine/rope.h"

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

torch::Tensor ApplyRope(const torch::Tensor& x, const torch::Tensor& cos,
                        const torch::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  // rotate_half(x) = [-x2, x1]
  torch::Tensor rotated = torch::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return x * cos + rotated * sin;
}

}  // namespace attnscope
