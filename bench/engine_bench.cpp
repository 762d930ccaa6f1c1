// Engine throughput: prefill and decode tokens/s with capture off and with full dense capture,
// beside a bare libtorch forward pass of the same shapes (no engine, no capture machinery).
//
//   bench/attnscope-bench-engine --model_dir DIR [--prompt 512] [--new_tokens 32] [--reps 3]
// Prints a Markdown table; every row is measured in the same process, one after another.
#include <torch/torch.h>
#include <torch/version.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "bench/counting_sink.h"
#include "cli/host_memory.h"
#include "engine/engine.h"
#include "engine/rope.h"

ABSL_FLAG(std::string, model_dir, "",
          "checkpoint folder (tests/tools/checkpoint.py bench_engine DIR)");
ABSL_FLAG(int64_t, prompt, 512, "prompt tokens");
ABSL_FLAG(int64_t, new_tokens, 32, "generated tokens");
ABSL_FLAG(int, reps, 3, "repetitions per row (the median is reported)");

namespace attnscope {
namespace {

using Clock = std::chrono::steady_clock;

struct Sample {
  double prefill_ms, decode_ms;
  int64_t bytes;
};

// The bare forward pass: same math, plain libtorch calls, weights random of the engine's shapes.
class BareModel {
 public:
  explicit BareModel(const ModelInfo& info, int64_t intermediate) : info_(info) {
    torch::manual_seed(0);
    const int64_t h = info.hidden_size, q = info.num_heads * info.head_dim,
                  kv = info.num_kv_heads * info.head_dim;
    embed_ = torch::randn({info.vocab_size, h});
    head_ = torch::randn({info.vocab_size, h}) * 0.03;
    for (int64_t l = 0; l < info.num_layers; ++l) {
      layers_.push_back(
          {torch::randn({q, h}) * 0.03, torch::randn({kv, h}) * 0.03, torch::randn({kv, h}) * 0.03,
           torch::randn({h, q}) * 0.03, torch::randn({intermediate, h}) * 0.03,
           torch::randn({intermediate, h}) * 0.03, torch::randn({h, intermediate}) * 0.03});
    }
    inv_freq_ = 1.0 / torch::pow(500000.0, torch::arange(0, info.head_dim, 2).to(torch::kFloat32) /
                                               info.head_dim);
  }

  // Feeds ids at position cache_len_; returns last logits.
  torch::Tensor Step(const std::vector<int64_t>& ids) {
    const int64_t n = ids.size(), H = info_.num_heads, KV = info_.num_kv_heads, D = info_.head_dim;
    torch::Tensor x = embed_.index_select(0, torch::tensor(ids));
    torch::Tensor ang = torch::outer(torch::arange(pos_, pos_ + n).to(torch::kFloat32), inv_freq_);
    ang = torch::cat({ang, ang}, -1);
    torch::Tensor cos = ang.cos(), sin = ang.sin();
    auto rope = [&](const torch::Tensor& t) {
      auto half = D / 2;
      return t * cos + torch::cat({-t.narrow(-1, half, half), t.narrow(-1, 0, half)}, -1) * sin;
    };
    auto norm = [](const torch::Tensor& t) {
      return t * torch::rsqrt(t.pow(2).mean(-1, true) + 1e-5);
    };
    if (k_.empty()) k_.resize(layers_.size()), v_.resize(layers_.size());
    for (size_t l = 0; l < layers_.size(); ++l) {
      const auto& w = layers_[l];
      torch::Tensor h = norm(x);
      torch::Tensor q = rope(torch::matmul(h, w[0].t()).view({n, H, D}).transpose(0, 1));
      torch::Tensor k = rope(torch::matmul(h, w[1].t()).view({n, KV, D}).transpose(0, 1));
      torch::Tensor v = torch::matmul(h, w[2].t()).view({n, KV, D}).transpose(0, 1);
      k_[l] = k_[l].defined() ? torch::cat({k_[l], k}, 1) : k;
      v_[l] = v_[l].defined() ? torch::cat({v_[l], v}, 1) : v;
      torch::Tensor kk = k_[l].repeat_interleave(H / KV, 0),
                    vv = v_[l].repeat_interleave(H / KV, 0);
      torch::Tensor o;
#if TORCH_VERSION_MAJOR >= 2
      o = at::scaled_dot_product_attention(q.unsqueeze(0), kk.unsqueeze(0), vv.unsqueeze(0), {},
                                           0.0, n > 1)
              .squeeze(0);
#else
      torch::Tensor s = torch::matmul(q, kk.transpose(1, 2)) / std::sqrt(static_cast<double>(D));
      if (n > 1) s = s + torch::full({n, n}, -INFINITY).triu(1);
      o = torch::matmul(torch::softmax(s, -1), vv);
#endif
      x = x + torch::matmul(o.transpose(0, 1).reshape({n, H * D}), w[3].t());
      h = norm(x);
      x = x + torch::matmul(torch::silu(torch::matmul(h, w[4].t())) * torch::matmul(h, w[5].t()),
                            w[6].t());
    }
    pos_ += n;
    return torch::matmul(norm(x.narrow(0, n - 1, 1)), head_.t());
  }

 private:
  ModelInfo info_;
  torch::Tensor embed_, head_, inv_freq_;
  std::vector<std::vector<torch::Tensor>> layers_;
  std::vector<torch::Tensor> k_, v_;
  int64_t pos_ = 0;
};

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// RoPE alone, per forward pass of the model's shapes (every layer's q and k): the tensor expression
// with a table built for each pass (the engine before its table cache and CPU pass) against the
// engine's RopeTableCache and ApplyRope; best of 5 timings of many passes each.
void RopeRows(const ModelInfo& info, int64_t prompt) {
  const int64_t dim = info.hidden_size / info.num_heads;
  const torch::Tensor inv_freq = RopeInverseFrequencies(RopeConfig{}, dim);
  std::printf(
      "\n| RoPE per forward pass (%ld layers, q and k as the projections leave them) | "
      "tensor expression, a table per pass (us) | table cache + CPU pass (us) | ratio |\n",
      (long)info.num_layers);
  std::printf("| --- | ---: | ---: | ---: |\n");
  for (const int64_t n : {int64_t{1}, prompt}) {
    const torch::Tensor q = torch::randn({n, info.num_heads, dim}).transpose(0, 1);
    const torch::Tensor k = torch::randn({n, info.num_kv_heads, dim}).transpose(0, 1);
    const int passes = n == 1 ? 5000 : 100;
    double best[2] = {1e18, 1e18};
    for (int trial = 0; trial < 5; ++trial) {
      for (int variant = 0; variant < 2; ++variant) {
        RopeTableCache decode_cache;  // a decode step's row from the generation's table
        const auto t0 = Clock::now();
        for (int pass = 0; pass < passes; ++pass) {
          const int64_t pos0 = n == 1 ? prompt + pass : 0;
          torch::Tensor cos, sin;
          if (variant == 0) {
            std::tie(cos, sin) = RopeTables(inv_freq, pos0, n, torch::kFloat32);
          } else if (n == 1) {
            std::tie(cos, sin) = decode_cache.Rows(inv_freq, pos0, n, torch::kFloat32);
          } else {
            RopeTableCache prefill_cache;  // a prefill makes its generation's first table
            std::tie(cos, sin) = prefill_cache.Rows(inv_freq, pos0, n, torch::kFloat32);
          }
          for (int64_t l = 0; l < info.num_layers; ++l) {
            torch::Tensor qr = variant == 0 ? RopeExpression(q, cos, sin) : ApplyRope(q, cos, sin);
            torch::Tensor kr = variant == 0 ? RopeExpression(k, cos, sin) : ApplyRope(k, cos, sin);
          }
        }
        const double us =
            std::chrono::duration<double, std::micro>(Clock::now() - t0).count() / passes;
        best[variant] = std::min(best[variant], us);
      }
    }
    std::printf("| %s (%ld position%s) | %.1f | %.1f | %.2f |\n",
                n == 1 ? "decode step" : "prefill", (long)n, n == 1 ? "" : "s", best[0], best[1],
                best[1] / best[0]);
  }
}

int Main() {
  EngineOptions options;
  options.model_dir = absl::GetFlag(FLAGS_model_dir);
  auto engine = Engine::Load(options);
  if (!engine.ok()) {
    std::fprintf(stderr, "%s\n", engine.status().ToString().c_str());
    return 1;
  }
  const ModelInfo& info = (*engine)->info();
  const int64_t prompt = absl::GetFlag(FLAGS_prompt), new_tokens = absl::GetFlag(FLAGS_new_tokens);
  const int reps = absl::GetFlag(FLAGS_reps);
  GenerateRequest request;
  for (int64_t i = 0; i < prompt; ++i)
    request.prompt_ids.push_back((i * 7919 + 13) % info.vocab_size);
  request.max_new_tokens = new_tokens;
  request.ignore_eos = true;

  auto run_engine = [&](const CaptureSpec& spec) {
    std::vector<double> pre, dec;
    int64_t bytes = 0;
    for (int r = 0; r < reps; ++r) {
      CountingSink sink;
      auto result = (*engine)->Generate(request, spec, &sink, nullptr);
      if (!result.ok()) std::abort();
      pre.push_back(result->timings.prefill_ms);
      dec.push_back(result->timings.decode_ms / result->decode_steps);
      bytes = sink.bytes;
    }
    return Sample{Median(pre), Median(dec), bytes};
  };
  // Intermediate size is not in ModelInfo; the bench checkpoint's is 2.75 × hidden.
  BareModel bare(info, info.hidden_size * 11 / 4);
  auto run_bare = [&] {
    std::vector<double> pre, dec;
    c10::InferenceMode guard;
    for (int r = 0; r < reps; ++r) {
      BareModel model = bare;
      auto t0 = Clock::now();
      torch::Tensor logits = model.Step(request.prompt_ids);
      pre.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
      t0 = Clock::now();
      for (int64_t t = 1; t < new_tokens; ++t)
        logits = model.Step({logits.argmax(-1).item<int64_t>()});
      dec.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count() /
                    (new_tokens - 1));
    }
    return Sample{Median(pre), Median(dec), 0};
  };

  CaptureSpec off;
  CaptureSpec full;
  full.form = Form::kDense;
  run_engine(off);  // warm-up
  const Sample bare_s = run_bare();
  const Sample off_s = run_engine(off);
  const Sample full_s = run_engine(full);
  std::printf(
      "model: %ld layers, hidden %ld, %ld heads / %ld kv heads, vocab %ld; prompt %ld, %ld new "
      "tokens; "
      "libtorch %s, median of %d\n\n",
      (long)info.num_layers, (long)info.hidden_size, (long)info.num_heads, (long)info.num_kv_heads,
      (long)info.vocab_size, (long)prompt, (long)new_tokens, TORCH_VERSION, reps);
  std::printf(
      "| run | prefill tok/s | decode tok/s | prefill vs bare | decode vs bare | captured MB |\n");
  std::printf("| --- | ---: | ---: | ---: | ---: | ---: |\n");
  auto row = [&](const char* name, const Sample& s) {
    std::printf("| %s | %.0f | %.1f | %.3f | %.3f | %.1f |\n", name, prompt / (s.prefill_ms / 1e3),
                1e3 / s.decode_ms, bare_s.prefill_ms / s.prefill_ms, bare_s.decode_ms / s.decode_ms,
                s.bytes / 1e6);
  };
  row("bare libtorch forward", bare_s);
  row("engine, capture off", off_s);
  row("engine, full dense capture", full_s);
  std::printf("\ncapture on / off: prefill %.3f, decode %.3f (throughput ratio)\n",
              off_s.prefill_ms / full_s.prefill_ms, off_s.decode_ms / full_s.decode_ms);
  RopeRows(info, prompt);
  return 0;
}

}  // namespace
}  // namespace attnscope

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  attnscope::RetainFreedHostMemory(attnscope::kDefaultRetainedHostBytes);  // as the server
  return attnscope::Main();
}
