// Rotary position embeddings, with Llama 3 and linear frequency scaling.
#pragma once

#include <torch/torch.h>

#include "engine/checkpoint/config.h"

namespace attnscope {

// Inverse frequencies, float32 (head_dim / 2), after the configuration's scaling.
torch::Tensor RopeInverseFrequencies(const RopeConfig& rope, int64_t head_dim);

// cos and sin tables for positions [pos0, pos0 + n): each (n, head_dim) in `dtype`.
std::pair<torch::Tensor, torch::Tensor> RopeTables(const torch::Tensor& inv_freq, int64_t pos0,
                                                   int64_t n, torch::ScalarType dtype);

// x: (heads, n, head_dim) rotated into a new tensor: x·cos + rotate_half(x)·sin. On the CPU in
// float32 one pass over x (no rotated copy, no products in between), bit for bit the tensor
// expression (each product rounded, then the sum); elsewhere that expression.
torch::Tensor ApplyRope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin);

// That tensor expression itself, on any device and type (the bench's baseline).
torch::Tensor RopeExpression(const torch::Tensor& x, const torch::Tensor& cos,
                             const torch::Tensor& sin);

// The cos and sin tables of one generation, kept from one forward pass to the next: each table is
// made for the positions asked for and kAhead more, so the decode steps after it take their rows
// from it instead of building a one-row table each (five small operations, each a kernel launch on
// a GPU). Rows for positions a table holds are views of it; a generation only moves forward, so a
// table is replaced (never grown) when a pass asks for positions it does not hold.
class RopeTableCache {
 public:
  static constexpr int64_t kAhead = 64;

  // cos and sin for positions [pos0, pos0 + n), each (n, head_dim) in `dtype`.
  std::pair<torch::Tensor, torch::Tensor> Rows(const torch::Tensor& inv_freq, int64_t pos0,
                                               int64_t n, torch::ScalarType dtype);
  int64_t tables_made() const { return tables_made_; }

 private:
  torch::Tensor cos_, sin_;  // positions [begin_, end_)
  int64_t begin_ = 0, end_ = 0;
  torch::ScalarType dtype_ = torch::kFloat32;
  int64_t tables_made_ = 0;
};

}  // namespace attnscope
