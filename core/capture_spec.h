// What to capture of the model's attention (CaptureSpec) and the tables that name every value of
// its enums. No libtorch here: the server, the clients and the CLIs use this header; the engine's
// CaptureProcessor (engine/capture_processor.h) computes what it describes. Blocks are in block.h.
//
// Attention weights are softmax(q·kᵀ/sqrt(head_dim) + mask) in float32, q and k after RoPE, per
// query head (a query head reads the key/value head it shares under GQA), exactly what eager
// `transformers` returns with output_attentions=True.
//
// One concept, one spelling: each enum below has one table, and every spelling of a value derives
// from its row: the text dialect (capture_text.h) uses `name`, the proto's enum value is
// PREFIX_ + upper(name) (proto/contract.h finds it by that name), stored files write `name`, and
// the Python client derives its names from the proto's enums. A new form or statistic is its math
// in engine/capture_processor.cpp plus one row here.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace attnscope {

enum class Phase { kPrefill, kDecode };
enum class Form { kNone, kDense, kHeadMean, kHeadMax, kPooled, kTopK };
enum class PoolOp { kMean, kMax };
enum class ElementType { kFloat32, kFloat16, kBFloat16 };
enum class StatKind { kRowEntropy, kSinkMass, kLocalMass, kKeyScore, kKeyScoreVariance };

// A row of a plain name table.
template <typename E>
struct Named {
  E value;
  const char* name;
};

inline constexpr Named<Phase> kPhases[] = {{Phase::kPrefill, "prefill"},
                                           {Phase::kDecode, "decode"}};
inline constexpr Named<PoolOp> kPoolOps[] = {{PoolOp::kMean, "mean"}, {PoolOp::kMax, "max"}};

struct ElementTypeInfo {
  ElementType value;
  const char* name;
  const char* dtype;  // safetensors' name
  int64_t size;       // bytes per element
};
inline constexpr ElementTypeInfo kElementTypes[] = {
    {ElementType::kFloat32, "float32", "F32", 4},
    {ElementType::kFloat16, "float16", "F16", 2},
    {ElementType::kBFloat16, "bfloat16", "BF16", 2},
};

// The shape of one block of `rows` query rows over `keys` keys, `heads` heads selected.
using BlockShapeRule = std::array<int64_t, 3> (*)(int64_t heads, int64_t rows, int64_t keys,
                                                  int64_t pool, int64_t top_k);
inline constexpr int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The argument a form takes in the text dialect: pooled:P[:mean|max], top_k:K.
enum class FormArg { kNone, kPool, kTopK };

struct FormInfo {
  Form value;
  const char* name;
  FormArg arg;
  BlockShapeRule shape;  // nullptr: no matrices
  bool indices;          // int32 key indices beside the values
  const char* about;
};
inline constexpr FormInfo kForms[] = {
    {Form::kNone, "none", FormArg::kNone, nullptr, false, "no matrices (statistics only)"},
    {Form::kDense, "dense", FormArg::kNone,
     [](int64_t h, int64_t r, int64_t k, int64_t, int64_t) {
       return std::array<int64_t, 3>{h, r, k};
     },
     false, "probabilities [heads, queries, keys]"},
    {Form::kHeadMean, "head_mean", FormArg::kNone,
     [](int64_t, int64_t r, int64_t k, int64_t, int64_t) {
       return std::array<int64_t, 3>{1, r, k};
     },
     false, "mean over the selected heads [1, queries, keys]"},
    {Form::kHeadMax, "head_max", FormArg::kNone,
     [](int64_t, int64_t r, int64_t k, int64_t, int64_t) {
       return std::array<int64_t, 3>{1, r, k};
     },
     false, "max over the selected heads [1, queries, keys]"},
    {Form::kPooled, "pooled", FormArg::kPool,
     [](int64_t h, int64_t r, int64_t k, int64_t p, int64_t) {
       return std::array<int64_t, 3>{h, CeilDiv(r, p), CeilDiv(k, p)};
     },
     false, "P x P tiles, mean or max [heads, ceil(queries/P), ceil(keys/P)]"},
    {Form::kTopK, "top_k", FormArg::kTopK,
     [](int64_t h, int64_t r, int64_t k, int64_t, int64_t top_k) {
       return std::array<int64_t, 3>{h, r, top_k < k ? top_k : k};
     },
     true, "the K largest per row: values and int32 key indices [heads, queries, K]"},
};

// Small per-layer, per-head statistics, computed where the probabilities are. Each field is the
// parameter of one statistic and is named as it (kStatistics' `name`, the proto's Statistics field,
// the CLI's --stats item, the Python keyword): 0 is off; flags are 1 when on.
struct StatisticsSpec {
  int64_t row_entropy = 0;         // entropy (nats) of each attention row: [heads, queries]
  int64_t key_score = 0;           // W > 0: attention each key receives summed over the last W
                                   // prompt queries (SnapKV / H2O score): [heads, prompt]
  int64_t sink_mass = 0;           // K > 0: mass on positions [0, K) per row: [heads, queries]
  int64_t local_mass = 0;          // W > 0: mass on the last W positions (the query's own
                                   // included) per row: [heads, queries]
  int64_t key_score_variance = 0;  // per prompt key, variance (ddof 0) over decode steps of the
                                   // attention it receives: [heads, prompt]
  bool Any() const {
    return row_entropy != 0 || key_score > 0 || sink_mass > 0 || local_mass > 0 ||
           key_score_variance != 0;
  }
};

// Where a statistic's values lie: one per query row, or one per prompt key.
enum class StatAxis { kRows, kPromptKeys };

struct StatisticInfo {
  StatKind value;
  // The one name: stored kind (chunks, files), the text dialect's item (name or name:N), the
  // proto's STATISTIC_ value (STATISTIC_ + upper(name)) and Statistics field, Python's keyword.
  const char* name;
  int64_t StatisticsSpec::*param;  // its parameter in the spec
  bool takes_value;                // name:N (else a flag)
  const char* value_letter;        // N's meaning in help: K (positions) or W (a window)
  StatAxis axis;
  const char* old_text;  // the text dialect's spelling before 0.2, read for one release
  const char* about;
};
inline constexpr StatisticInfo kStatistics[] = {
    {StatKind::kRowEntropy, "row_entropy", &StatisticsSpec::row_entropy, false, "", StatAxis::kRows,
     "entropy", "entropy (nats) of each attention row"},
    {StatKind::kSinkMass, "sink_mass", &StatisticsSpec::sink_mass, true, "K", StatAxis::kRows,
     "sink", "mass on the first K positions, per row"},
    {StatKind::kLocalMass, "local_mass", &StatisticsSpec::local_mass, true, "W", StatAxis::kRows,
     "local", "mass on the last W positions, per row"},
    {StatKind::kKeyScore, "key_score", &StatisticsSpec::key_score, true, "W", StatAxis::kPromptKeys,
     "", "attention each prompt key receives from the last W prompt rows"},
    {StatKind::kKeyScoreVariance, "key_score_variance", &StatisticsSpec::key_score_variance, false,
     "", StatAxis::kPromptKeys, "variance",
     "variance over decode steps of the attention each prompt key receives"},
};

// Lookups in a table: the row of a value, the row of a name (nullptr when none).
template <typename Row, size_t N, typename E>
constexpr const Row& RowOf(const Row (&table)[N], E value) {
  for (const Row& row : table) {
    if (row.value == value) return row;
  }
  return table[0];  // unreachable: every enum value has its row (tests/cpp/spec_test.cpp)
}
template <typename Row, size_t N>
const Row* RowNamed(const Row (&table)[N], absl::string_view name) {
  for (const Row& row : table) {
    if (name == row.name) return &row;
  }
  return nullptr;
}
// "a, b or c": the names of a table, for error messages.
template <typename Row, size_t N>
std::string NamesOf(const Row (&table)[N]) {
  std::string out;
  for (size_t i = 0; i < N; ++i) {
    if (i > 0) out += i + 1 == N ? " or " : ", ";
    out += table[i].name;
  }
  return out;
}

inline const char* PhaseName(Phase phase) { return RowOf(kPhases, phase).name; }
inline const char* FormName(Form form) { return RowOf(kForms, form).name; }
inline const char* ElementTypeName(ElementType type) { return RowOf(kElementTypes, type).name; }
inline int64_t ElementSize(ElementType type) { return RowOf(kElementTypes, type).size; }
inline const char* StatKindName(StatKind kind) { return RowOf(kStatistics, kind).name; }

// Half-open range [begin, end) of prompt positions.
struct QueryRange {
  int64_t begin = 0;
  int64_t end = 0;
};

struct CaptureSpec {
  std::vector<int64_t> layers;  // empty: every layer
  std::vector<int64_t> heads;   // empty: every query head
  bool prefill = true;
  bool decode = true;
  // Prompt rows (prefill). At most one of the two; both empty: every row. Decode rows are the
  // generated tokens' and are all captured when `decode` is set.
  int64_t last_queries = 0;              // > 0: the last N prompt rows (SnapKV observation window)
  std::vector<QueryRange> query_ranges;  // explicit prompt rows
  Form form = Form::kNone;               // kNone: no matrices (statistics only, or nothing)
  int64_t pool = 0;                      // tile side, kPooled
  PoolOp pool_op = PoolOp::kMean;        // kPooled
  int64_t top_k = 0;                     // kTopK
  StatisticsSpec stats;
  ElementType element_type = ElementType::kFloat32;  // of matrices; statistics are float32

  bool Enabled() const { return form != Form::kNone || stats.Any(); }
};

// The shape of a block of the spec's form (pool and top_k from the spec); {0, 0, 0} for kNone.
std::array<int64_t, 3> BlockShape(Form form, int64_t heads, int64_t rows, int64_t keys,
                                  int64_t pool, int64_t top_k);

// Checks the spec against the model: OUT_OF_RANGE for layer or head indices outside it,
// INVALID_ARGUMENT for malformed fields. `prompt_len` < 0 skips the checks that need it.
absl::Status ValidateCaptureSpec(const CaptureSpec& spec, int64_t num_layers, int64_t num_heads,
                                 int64_t prompt_len);

// Bytes of matrices and statistics that the spec produces for a prompt of `prompt_len` tokens and
// up to `max_new_tokens` generated ones (an upper bound: generation may stop earlier).
int64_t EstimateCaptureBytes(const CaptureSpec& spec, int64_t num_layers, int64_t num_heads,
                             int64_t prompt_len, int64_t max_new_tokens);

// The spec's prompt rows as sorted ranges clipped to the prompt.
std::vector<QueryRange> PromptRows(const CaptureSpec& spec, int64_t prompt_len);

}  // namespace attnscope
