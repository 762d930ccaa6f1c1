// The bounds on attention probabilities materialized at once, written once: EngineOptions
// (engine.h), ForwardOptions (transformer.h) and AttentionShape (attention.h) default to them, and
// the flags of attnscope-server and attnscope-run default to EngineOptions.
#pragma once

#include <cstdint>

namespace attnscope {

inline constexpr int64_t kQueryBlock = 128;  // query rows of probabilities at once, at most
inline constexpr int64_t kBlockElements = int64_t{1} << 24;  // and heads × rows × keys (64 MiB f32)

}  // namespace attnscope
