// Between the public contract (attnscope.v1) and the engine's torch-free types
// (core/capture_spec.h, core/block.h): enums, the capture spec and block headers. Used by the
// server and the C++ client alike, so a value has one conversion. Enum values convert by name: a
// row of a table in capture_spec.h named "head_mean" is FORM_HEAD_MEAN in the proto (PREFIX_ +
// upper(name)); tests/cpp/spec_test.cpp (SpecTables) checks every row has its proto value and
// back.
#pragma once

#include "absl/status/statusor.h"
#include "attnscope/v1/attnscope.pb.h"
#include "core/block.h"
#include "core/capture_spec.h"
#include "core/intervention.h"

namespace attnscope {

// The number of `prefix` + upper(`name`) in `enum_type`; -1 when it has none.
int ProtoEnumNumber(const google::protobuf::EnumDescriptor* enum_type, const char* prefix,
                    const char* name);

v1::Phase ToProto(Phase phase);
v1::Form ToProto(Form form);
v1::PoolOp ToProto(PoolOp op);
v1::ElementType ToProto(ElementType type);
v1::Statistic ToProto(StatKind kind);
v1::AblationKind ToProto(AblationKind kind);
v1::KvPolicyKind ToProto(KvPolicyKind kind);
// INVALID_ARGUMENT naming `what` for a number the table has no row for.
absl::StatusOr<Phase> FromProto(v1::Phase phase, const char* what);
absl::StatusOr<Form> FromProto(v1::Form form, const char* what);
absl::StatusOr<PoolOp> FromProto(v1::PoolOp op, const char* what);
absl::StatusOr<ElementType> FromProto(v1::ElementType type, const char* what);
absl::StatusOr<StatKind> FromProto(v1::Statistic kind, const char* what);
absl::StatusOr<AblationKind> FromProto(v1::AblationKind kind, const char* what);
absl::StatusOr<KvPolicyKind> FromProto(v1::KvPolicyKind kind, const char* what);
absl::StatusOr<StatKind> StatKindNamed(const std::string& name, const char* what);

// The capture spec of a request, its enums and fields checked (the model-dependent checks are
// the engine's Validate).
absl::StatusOr<CaptureSpec> ToCaptureSpec(const v1::CaptureSpec& proto);
// `num_layers`/`num_heads` > 0 fill in "all" as the explicit lists (the stream header's resolved
// spec); 0 leaves empty lists empty (a request).
void FillCaptureSpec(const CaptureSpec& spec, int64_t num_layers, int64_t num_heads,
                     v1::CaptureSpec* out);

// A request's interventions (the clients' direction; the server's, bounded before it copies, is
// server/convert.h ToInterventions). Optional policy parameters are set only where they differ
// from KvPolicy{}'s defaults, which are kvpress' and the server's.
void FillInterventions(const Interventions& interventions, bool reference_leads,
                       bool capture_reference, v1::Interventions* out);
// Block headers: the proto keeps AttentionChunk and StatisticChunk (compatibility), whose common
// fields are written and read here, once.
void FillBlockHeader(const BlockHeader& header, v1::AttentionChunk* out);
void FillBlockHeader(const BlockHeader& header, v1::StatisticChunk* out);
// The header a chunk describes; DATA_LOSS for enum values or kinds outside the tables.
absl::StatusOr<BlockHeader> BlockHeaderOf(const v1::AttentionChunk& chunk);
absl::StatusOr<BlockHeader> BlockHeaderOf(const v1::StatisticChunk& chunk);

}  // namespace attnscope
