// One row times a weight matrix on the CPU in float32, for the decode step's projections and the
// LM head: MKL's sgemv reads the weights far below memory bandwidth on processors it has no tuned
// path for (about 8 GB/s on the AMD EPYC of BENCHMARKS.md, where a plain sum of the same matrix
// reads 45), and at one token per step the weights' read is the step. This kernel streams each
// weight row once with AVX2 FMA, the rows split across the intra-op threads.
#pragma once

#include <torch/torch.h>

namespace attnscope {

// Whether CpuMatvec runs for these tensors here: x (1, in) and w (out, in) float32 on the CPU,
// contiguous, and a processor with AVX2 and FMA.
bool CpuMatvecSupports(const torch::Tensor& x, const torch::Tensor& w);

// x·wᵀ: (1, out) float32. Requires CpuMatvecSupports(x, w).
torch::Tensor CpuMatvec(const torch::Tensor& x, const torch::Tensor& w);

}  // namespace attnscope
