#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace attnscope {

int64_t Sampler::Next(const torch::Tensor& logits) {
  torch::Tensor cpu = logits.to(torch::kCPU, torch::kFloat32).contiguous();
  const float* l = cpu.data_ptr<float>();
  const int64_t n = cpu.numel();
  if (params_.temperature <= 0.0) return std::max_element(l, l + n) - l;

  // Scaled logits, then the top-k and top-p filters, as transformers applies them.
  std::vector<double> z(n);
  for (int64_t i = 0; i < n; ++i) z[i] = static_cast<double>(l[i]) / params_.temperature;
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return z[a] > z[b]; });
  int64_t keep = n;
  if (params_.top_k > 0 && params_.top_k < n) {
    // Ties with the k-th value stay in.
    const double kth = z[order[params_.top_k - 1]];
    keep = params_.top_k;
    while (keep < n && z[order[keep]] == kth) ++keep;
  }
  std::vector<double> p(keep);
  const double zmax = z[order[0]];
  double total = 0;
  for (int64_t i = 0; i < keep; ++i) total += p[i] = std::exp(z[order[i]] - zmax);
  for (double& v : p) v /= total;
  if (params_.top_p < 1.0) {
    // Drop the least likely tokens whose cumulative mass is <= 1 - top_p; keep at least one.
    double tail = 0;
    int64_t kept = keep;
    for (int64_t i = keep - 1; i >= 1; --i) {
      tail += p[i];
      if (tail > 1.0 - params_.top_p) break;
      kept = i;
    }
    keep = kept;
    p.resize(keep);
    total = std::accumulate(p.begin(), p.end(), 0.0);
    for (double& v : p) v /= total;
  }
  const double u = static_cast<double>(rng_() >> 11) * 0x1.0p-53;  // uniform in [0, 1), 53 bits
  double acc = 0;
  for (int64_t i = 0; i < keep; ++i) {
    acc += p[i];
    if (u < acc) return order[i];
  }
  return order[keep - 1];
}

}  // namespace attnscope
