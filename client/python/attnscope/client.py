"""A thin, numpy-returning wrapper around the generated gRPC stubs."""
import inspect
import json
import os
import threading
import warnings

import grpc
from google.protobuf import json_format

import numpy as np

from attnscope import shared
from attnscope.blocks import BlockAssembler, BlockKey
from attnscope.errors import ServerError, server_error
from attnscope.results import Captured
from attnscope.sample import Sample
from attnscope.v1 import attnscope_pb2 as pb
from attnscope.v1 import attnscope_pb2_grpc as pb_grpc



def _names(enum, prefix):
    """{"dense": FORM_DENSE, ...}: the names of a proto enum without its prefix, lower case (the
    spelling the C++ tables, the CLIs and stored files use). UNSPECIFIED values are left out."""
    return {name[len(prefix):].lower(): number for name, number in enum.items()
            if name.startswith(prefix) and not name.endswith("_UNSPECIFIED")}


FORMS = _names(pb.Form, "FORM_")
ELEMENT_TYPES = _names(pb.ElementType, "ELEMENT_")
PHASES = _names(pb.Phase, "PHASE_")
POOL_OPS = _names(pb.PoolOp, "POOL_")
# The statistics by their one name, in the C++ table's order (core/capture_spec.h kStatistics): the
# keyword of capture_spec() and the requests, the Statistics field, the stored kind, the CLI's item.
STATISTICS = _names(pb.Statistic, "STATISTIC_")
_STATISTIC_NAMES = {number: name for name, number in STATISTICS.items()}
# Keywords before 0.2, read for one release with a DeprecationWarning.
_OLD_STATISTIC_KEYWORDS = {"sink_tokens": "sink_mass", "local_window": "local_mass", "key_score_window": "key_score"}
_PHASE_NAMES = {number: name for name, number in PHASES.items()}
_FORM_NAMES = {number: name for name, number in FORMS.items()}
_POOL_OP_NAMES = {number: name for name, number in POOL_OPS.items()}
# safetensors dtype names of element types (the one table beside the enum: sizes and encodings).
_ELEMENT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_DTYPE_OF = {number: _ELEMENT_DTYPES[name] for name, number in ELEMENT_TYPES.items()}


class _Chunk:
    """A chunk message seen with its phase as a name (BlockAssembler's keys); `data` and `indices`
    replaced when they came through the shared ring."""

    def __init__(self, message, data=None, indices=None):
        self._m = message
        self.phase = _PHASE_NAMES.get(message.phase, str(message.phase))
        if data is not None:
            self.data, self.indices = data, indices

    def __getattr__(self, name):
        return getattr(self._m, name)


class BlockTable(dict):
    """Raw blocks keyed (phase, step, layer, query_begin) as they came; call it for the layer's
    assembled array: r.attention(layer, phase=None), r.indices(layer) (attnscope.results)."""

    def __init__(self, assemble):
        super().__init__()
        self._assemble = assemble

    def __call__(self, layer, phase=None):
        return self._assemble(layer, phase)


_ABLATION_KINDS = {"zero": pb.ABLATION_KIND_ZERO, "mean": pb.ABLATION_KIND_MEAN}


_KV_POLICY_KINDS = {"streaming_llm": pb.KV_POLICY_KIND_STREAMING_LLM, "h2o": pb.KV_POLICY_KIND_H2O,
                    "snapkv": pb.KV_POLICY_KIND_SNAPKV, "pyramidkv": pb.KV_POLICY_KIND_PYRAMIDKV}
_KV_POLICY_KEYS = ("compression_ratio", "budget", "n_sink", "window_size", "kernel_size", "beta", "recent_size",
                   "adaptive", "alpha_safeguard", "report_scores", "decode_interval")


def _add_kv_policy(field, kv_policy):
    """Fills Interventions.kv_policy from {"kind": ..., parameters...} (kvpress' names)."""
    p = dict(kv_policy)
    kind = p.pop("kind", None)
    if kind not in _KV_POLICY_KINDS:
        raise ValueError(f"kv_policy: kind {kind!r} is not one of {sorted(_KV_POLICY_KINDS)}")
    unknown = set(p) - set(_KV_POLICY_KEYS)
    if unknown:
        raise TypeError(f"kv_policy: unknown key(s) {sorted(unknown)}; keys are kind, {', '.join(_KV_POLICY_KEYS)}")
    field.kind = _KV_POLICY_KINDS[kind]
    for name, value in p.items():
        if name in ("adaptive", "report_scores"):
            setattr(field, name, bool(value))
        elif name in ("compression_ratio", "beta", "alpha_safeguard"):
            setattr(field, name, float(value))
        else:
            setattr(field, name, int(value))


def _add_interventions(field, ablate, knockout, reference_leads, kv_policy=None, capture_reference=False):
    """Fills GenerateRequest.interventions from the request's keywords."""
    for a in ablate or ():
        a = dict(a)
        unknown = set(a) - {"layer", "heads", "kind"}
        if unknown:
            raise TypeError(f"ablate: unknown key(s) {sorted(unknown)}; keys are layer, heads, kind")
        kind = a.get("kind", "zero")
        if kind not in _ABLATION_KINDS:
            raise ValueError(f"ablate: kind {kind!r} is not one of {sorted(_ABLATION_KINDS)}")
        heads = a.get("heads")
        field.ablations.add(layer=int(a["layer"]), heads=[int(h) for h in ([heads] if isinstance(heads, int) else heads)],
                            kind=_ABLATION_KINDS[kind])
    for k in knockout or ():
        k = dict(k)
        unknown = set(k) - {"layers", "heads", "keys", "queries"}
        if unknown:
            raise TypeError(f"knockout: unknown key(s) {sorted(unknown)}; keys are layers, heads, keys, queries")
        entry = field.knockouts.add(layers=[int(x) for x in k.get("layers", ())],
                                    heads=[int(x) for x in k.get("heads", ())])
        for name in ("keys", "queries"):
            for begin, end in k.get(name, ()):
                getattr(entry, name).add(begin=int(begin), end=int(end))
    field.reference_leads = bool(reference_leads)
    field.capture_reference = bool(capture_reference)
    if kv_policy:
        _add_kv_policy(field.kv_policy, kv_policy)


def divergence_row(event):
    """A DivergenceEvent in the stored metadata's layout (client/cpp/sample_writer.cpp)."""
    return {"step": event.step, "kl": event.kl, "top1_agree": event.top1_agree, "rank": event.rank,
            "token": event.token, "logprob_full": event.logprob_full,
            "logprob_intervened": event.logprob_intervened, "lost_mass": list(event.lost_mass)}


def kv_decision_row(decision):
    """A KvDecisionEvent in the stored metadata's layout (kept bits as hex; scores are not stored)."""
    return {"step": decision.step, "layer": decision.layer, "keys": decision.keys, "kv_heads": decision.kv_heads,
            "kept": decision.kept.hex(), "kept_per_head": list(decision.kept_per_head),
            "bytes_freed": decision.bytes_freed, "cache_bytes": decision.cache_bytes}


def kv_decision_arrays(decision):
    """(kept [kv_heads, keys] bool, scores [kv_heads, keys] float32 or None) of a KvDecisionEvent."""
    n = decision.kv_heads * decision.keys
    bits = np.unpackbits(np.frombuffer(decision.kept, np.uint8), bitorder="little")[:n]
    kept = bits.astype(bool).reshape(decision.kv_heads, decision.keys)
    scores = np.array(decision.scores, np.float32).reshape(decision.kv_heads, decision.keys) if decision.scores else None
    return kept, scores


class StreamResult(Captured):
    """What a StreamAttention call returned: header, generated tokens, blocks, trailer; arrays
    through attention(layer), indices(layer), statistic(kind, layer) (attnscope.results)."""

    def __init__(self):
        self.header = None
        self.prompt = ""            # the request's text prompt ("" for token ids or chat), as stored
        self.generated_ids = []     # the generated token ids, in order
        self.generated_pieces = []  # their pieces
        self.attention = BlockTable(lambda layer, phase: Captured.attention(self, layer, phase))
        self.indices = BlockTable(lambda layer, phase: Captured.indices(self, layer, phase))
        self.statistics = {}     # (kind, phase, step, layer, query_begin) -> float32 array
        self.trailer = None
        self.messages = 0
        self.max_message_bytes = 0
        self.shared_output = False  # attention values came through shared memory
        self.divergence_events = []  # DivergenceEvent per step, for a request with interventions
        self.kv_decisions = []       # KvDecisionEvent per layer at each KV policy decision

    def __repr__(self):
        return (f"<attnscope.StreamResult: {self.form}, {len(self.attention)} attention blocks, "
                f"{len(self.statistics)} statistic blocks, {len(self.generated_ids)} tokens generated: "
                f"{self.text!r}>")

    # Captured's reading of interventions (divergence(), lost_mass(), kept(), bytes_freed()).
    @property
    def _divergence_rows(self):
        return [divergence_row(e) for e in self.divergence_events]

    @property
    def _kv_rows(self):
        return [kv_decision_row(d) for d in self.kv_decisions]

    @property
    def _model_shape(self):
        return self.header.model.num_layers, self.header.model.num_heads

    def key_scores(self, layer, step=0):
        """[kv_heads, keys] float32: the policy's key scores (requests with report_scores; not stored)."""
        self._kv_row(layer, step)  # a clear KeyError where there is no decision
        d = next(d for d in self.kv_decisions if d.layer == layer and d.step == step)
        return kv_decision_arrays(d)[1]

    # Captured's view of the blocks.
    @property
    def _attention(self):
        return {BlockKey(*k): v for k, v in self.attention.items()}

    @property
    def _indices(self):
        return {BlockKey(*k): v for k, v in self.indices.items()}

    @property
    def _statistics(self):
        return {BlockKey(*k[1:], stat=k[0]): v for k, v in self.statistics.items()}

    @property
    def capture(self):
        return self.header.capture if self.header is not None else pb.CaptureSpec()

    @property
    def form(self):
        return _FORM_NAMES.get(self.capture.form, "none")

    @property
    def pool(self):
        return self.capture.pool

    @property
    def pool_op(self):
        return _POOL_OP_NAMES.get(self.capture.pool_op, "mean")

    @property
    def prompt_token_ids(self):
        return list(self.header.prompt_token_ids) if self.header is not None else []

    @property
    def prompt_length(self):
        return len(self.prompt_token_ids)

    @property
    def layers(self):
        return list(self.capture.layers) or self.captured_layers

    @property
    def model_heads(self):
        """The model's number of attention heads."""
        return self.header.model.num_heads if self.header is not None else 0

    @property
    def heads(self):
        """The model's head number of each row of attention() and statistic() (heads=[2, 5]: [2, 5])."""
        if self.capture.heads:
            return list(self.capture.heads)
        return list(range(self.header.model.num_heads)) if self.header is not None else []

    @property
    def token_pieces(self):
        """The generated pieces (the stored metadata's name)."""
        return self.generated_pieces

    @property
    def token_ids(self):
        """Every position fed to the model: prompt ids, then generated ids but the last."""
        return self.prompt_token_ids + self.generated_ids[:-1]

    @property
    def position_pieces(self):
        """Display text of each position: prompt pieces, then generated pieces but the last."""
        prompt = list(self.header.prompt_pieces) if self.header is not None else []
        return prompt + self.generated_pieces[:-1]

    @property
    def tokens(self):
        """The piece at each position (as Sample.tokens): prompt, then generated but the last."""
        return self.position_pieces

    @property
    def text(self):
        return self.trailer.text if self.trailer is not None else ""

    @property
    def timings(self):
        t = self.trailer.timings if self.trailer is not None else pb.Timings()
        return {f.name: getattr(t, f.name) for f in pb.Timings.DESCRIPTOR.fields}

    def metadata(self):
        """The sample metadata attnscope-capture stores (attnscope.Sample.metadata)."""
        h, t = self.header, self.trailer
        if h is None or t is None:
            raise ValueError("the stream did not complete (no header or trailer)")
        return {
            "format_version": SAMPLE_FORMAT_VERSION, "model": h.model.name, "architecture": h.model.architecture,
            "prompt": self.prompt, "prompt_token_ids": list(h.prompt_token_ids), "prompt_pieces": list(h.prompt_pieces),
            "token_ids": list(t.token_ids), "generated_text": t.text,
            "finish_reason": pb.FinishReason.Name(t.finish_reason),
            "timings": {"prefill_ms": t.timings.prefill_ms, "decode_ms": t.timings.decode_ms},
            "num_layers": h.model.num_layers, "num_heads": h.model.num_heads,
            "capture": capture_json(h.capture),
            "token_pieces": list(self.generated_pieces),
            **({"divergence": self._divergence_rows} if self.divergence_events else {}),
            **({"kv_decisions": self._kv_rows} if self.kv_decisions else {}),
        }

    def to_sample(self):
        """The result as a stored sample would read (attnscope.Sample), without a file."""
        from attnscope.blocks import block_name
        tensors = {}
        for k, v in self.attention.items():
            tensors[block_name(BlockKey(*k))] = v
            if k in self.indices:
                tensors[block_name(BlockKey(*k)) + ".indices"] = self.indices[k]
        for k, v in self.statistics.items():
            tensors[block_name(BlockKey(*k[1:], stat=k[0]))] = v
        tensors["prompt_token_ids"] = np.asarray(self.prompt_token_ids, np.int64)
        tensors["token_ids"] = np.asarray(self.generated_ids, np.int64)
        return Sample(None, tensors, self.metadata())

    def save(self, path):
        """Writes the file attnscope-capture would (.safetensors; .pkl: the prototype's layout)."""
        sample = self.to_sample()
        sample.path = path
        sample.save(path)
        return path


def _statistic_of(chunk):
    """A StatisticChunk's statistic by name: the enum (servers from 0.2 on), else the kind string."""
    return _STATISTIC_NAMES.get(chunk.statistic, chunk.kind) if chunk.statistic else chunk.kind


# The stored sample's metadata layout (client/cpp/sample_writer.h kSampleFormatVersion): 2 since 0.2.
SAMPLE_FORMAT_VERSION = 2


def capture_json(c):
    """A CaptureSpec as stored samples hold it, once: the proto's JSON mapping with its field names
    and every field, exactly what the C++ client writes (client/cpp/sample_writer.cpp CaptureJson)."""
    try:
        return json_format.MessageToDict(c, preserving_proto_field_name=True, including_default_value_fields=True)
    except TypeError:  # protobuf >= 5 renamed the option
        return json_format.MessageToDict(c, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)


def capture_spec_text(c):
    """A CaptureSpec in the dialect attnscope-capture stores (e.g. 'pooled:64:max stats=row_entropy
    layers=0,8 heads=2,5 phases=prefill element_type=float16'), as core/capture_text.cpp writes it."""
    form = _FORM_NAMES.get(c.form, "none")
    if form == "pooled":
        op = _POOL_OP_NAMES.get(c.pool_op, "mean")
        form = f"pooled:{c.pool}" + ("" if op == "mean" else f":{op}")
    elif form == "top_k":
        form = f"top_k:{c.top_k}"
    out = [form]
    stats = []
    for name in STATISTICS:  # a flag (bool field) is written bare, a parameter as name:N
        v = getattr(c.statistics, name)
        if int(v) > 0:
            stats.append(name if isinstance(v, bool) else f"{name}:{int(v)}")
    if stats:
        out.append("stats=" + ",".join(stats))
    if c.layers:
        out.append("layers=" + ",".join(map(str, c.layers)))
    if c.heads:
        out.append("heads=" + ",".join(map(str, c.heads)))
    phases = [_PHASE_NAMES[p] for p in c.phases] or ["prefill", "decode"]
    out.append("phases=" + ",".join(phases))
    if c.last_queries > 0:
        out.append(f"rows=last:{c.last_queries}")
    elif c.query_ranges:
        out.append("rows=" + ",".join(f"{r.begin}:{r.end}" for r in c.query_ranges))
    out.append("element_type=" + {v: k for k, v in ELEMENT_TYPES.items()}.get(c.element_type, "float32"))
    return " ".join(out)


# What a client accepts by default: a capture whose estimate passes it is refused before any
# attention byte is sent (max_bytes=N per call or Client(max_bytes=N) raises it; 0: no limit).
DEFAULT_MAX_BYTES = 4 << 30


class CaptureTooLarge(ValueError):
    """The server's estimate of a capture is above this client's max_bytes."""


def _too_large(estimate, limit):
    return CaptureTooLarge(
        f"the capture would produce about {estimate / 1e9:.2f} GB, over this client's max_bytes of "
        f"{limit / 1e9:.2f} GB; shrink it (fewer layers or heads, last_queries=N, form='pooled', 'top_k' or "
        f"'head_mean', statistics only, element_type='float16', fewer max_new_tokens) or raise the limit: "
        f"max_bytes=N on the call or Client(max_bytes=N) (0: none)")


def capture_spec(form="none", layers=(), heads=(), phases=(), last_queries=0, query_ranges=(), pool=0,
                 pool_op="mean", capture_top_k=0, element_type="float32", max_bytes=0, row_entropy=False,
                 sink_mass=0, local_mass=0, key_score=0, key_score_variance=False, **deprecated):
    """Builds a CaptureSpec from plain Python values.

    form: none, dense, head_mean, head_max, pooled (tile side `pool`, `pool_op` mean or max) or top_k
    (`capture_top_k` values per row; the sampling parameter of the same idea is `top_k` on the request).
    layers, heads: model indices (empty: all). phases: ("prefill", "decode") or one of them (empty: both).
    last_queries=N or query_ranges=[(a, b), ...]: which prompt rows (default all).
    element_type: float32, float16 or bfloat16, of matrices (statistics are float32).
    Statistics, named as everywhere (CLI --stats, stored files, r.statistic(name, layer)):
    row_entropy=True, sink_mass=K (mass on the first K positions), local_mass=W (on the last W),
    key_score=W (attention each prompt key receives from the last W prompt rows), key_score_variance=True.
    The keywords before 0.2 (sink_tokens, local_window, key_score_window) still work for one release,
    with a DeprecationWarning."""
    stats = {"row_entropy": row_entropy, "sink_mass": sink_mass, "local_mass": local_mass, "key_score": key_score,
             "key_score_variance": key_score_variance}
    for name, value in deprecated.items():
        new = _OLD_STATISTIC_KEYWORDS.get(name)
        if new is None:
            raise TypeError(f"capture_spec() got an unexpected keyword {name!r}; statistics are "
                            f"{', '.join(STATISTICS)}")
        warnings.warn(f"{name}= is now {new}= (the statistic's name everywhere); {name}= goes in the next "
                      f"release", DeprecationWarning, stacklevel=3)
        if stats[new]:
            raise TypeError(f"give {new}= or its old name {name}=, not both")
        stats[new] = value
    for name, value, table in (("form", form, FORMS), ("element_type", element_type, ELEMENT_TYPES),
                               ("pool_op", pool_op, POOL_OPS)):
        if value not in table:
            raise ValueError(f"{name}={value!r}: expected one of {sorted(table)}")
    for p in phases:
        if p not in PHASES:
            raise ValueError(f"phase {p!r}: expected one of {sorted(PHASES)}")
    if form == "top_k" and capture_top_k <= 0:
        raise ValueError("form='top_k' needs capture_top_k=K (top_k is the sampling parameter)")
    if form == "pooled" and pool <= 0:
        raise ValueError("form='pooled' needs pool=P (the tile side)")
    return pb.CaptureSpec(
        layers=list(layers), heads=list(heads), phases=[PHASES[p] for p in phases], last_queries=last_queries,
        query_ranges=[pb.QueryRange(begin=a, end=b) for a, b in query_ranges], form=FORMS[form], pool=pool,
        pool_op=POOL_OPS[pool_op], top_k=capture_top_k, element_type=ELEMENT_TYPES[element_type], max_bytes=max_bytes,
        statistics=pb.Statistics(**stats))


def _capture_parameters():
    """capture_spec()'s keywords as keyword-only parameters, for the signatures that pass them on."""
    return [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in inspect.signature(capture_spec).parameters.values()
            if p.kind is not inspect.Parameter.VAR_KEYWORD]


def _keyword(name, default):
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)


def _signature(fn, *extra, head=(), keywords_only=False):
    """Sets `fn`'s signature to what a notebook's Shift-Tab should show: self and `head`,
    Client.request's parameters (a request and its capture spec, keyword by keyword), then `extra`.
    The functions themselves pass **kwargs on to Client.request, which checks them."""
    own = [p for p in inspect.signature(Client.request).parameters.values() if p.name != "max_bytes"]
    if keywords_only:
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *head, *own, *extra]
    fn.__signature__ = inspect.Signature(params)


def _tqdm():
    """tqdm's bar class where tqdm is installed; None otherwise (progress is then quiet)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm


def _progress(iterable, progress, unit):
    """tqdm over `iterable` when wanted and installed; the iterable itself otherwise."""
    tqdm = _tqdm()
    return iterable if progress is False or tqdm is None else tqdm(iterable, unit=unit)


def _check_on_error(on_error):
    if on_error not in ("raise", "return"):
        raise ValueError(f"on_error must be 'raise' or 'return', not {on_error!r}")


def _describe_input(item):
    """A short description of one stream_many input, for its error."""
    if isinstance(item, str):
        return f"prompt {item[:60]!r}" + ("..." if len(item) > 60 else "")
    if isinstance(item, dict):
        return "request " + ", ".join(f"{k}={str(v)[:40]!r}" for k, v in list(item.items())[:4])
    ids = list(item)
    return f"token_ids {ids[:8]}" + ("..." if len(ids) > 8 else "")


def _name_input(error, index, item, count):
    """Marks `error` as that of input `index` of a stream_many (its note and input_index)."""
    if isinstance(error, ServerError):
        error.input_index = index
    else:
        try:
            error.input_index = index
        except AttributeError:
            pass
    error.add_note(f"stream_many: input {index} of {count} failed ({_describe_input(item)})")


def _item_kwargs(item, kwargs):
    """stream_many's inputs: a prompt string, a dict of request keywords, or token ids."""
    kw = dict(kwargs)
    if isinstance(item, str):
        kw["prompt"] = item
    elif isinstance(item, dict):
        kw.update(item)
    else:
        kw["token_ids"] = list(item)
    return kw


class _Receiver:
    """Turns one stream's messages into a StreamResult (blocking and asyncio clients alike): chunks
    reassembled into blocks, shared-memory pieces copied out of the ring, progress shown."""

    def __init__(self, client, ring, progress, max_bytes=0):
        self.client, self.ring, self.progress, self.max_bytes = client, ring, progress, max_bytes
        self.result = StreamResult()
        self.blocks = BlockAssembler(lambda number: _DTYPE_OF[number])
        self.bar = None

    def _start_bar(self, header):
        if self.progress is False:
            return
        tqdm = _tqdm()
        if tqdm is None or (self.progress is None and header.estimated_bytes < (64 << 20)):
            return
        self.bar = tqdm(total=header.estimated_bytes or None, unit="B", unit_scale=True, desc="attention")

    def feed(self, msg):
        result = self.result
        result.messages += 1
        result.max_message_bytes = max(result.max_message_bytes, msg.ByteSize())
        kind = msg.WhichOneof("event")
        if kind == "header":
            if self.max_bytes and msg.header.estimated_bytes > self.max_bytes:
                raise _too_large(msg.header.estimated_bytes, self.max_bytes)
            result.header = msg.header
            result.shared_output = msg.header.shared_output
            if result.shared_output and self.ring is None:
                raise ValueError("malformed stream from the server: shared output nobody asked for")
            if self.ring is not None and not result.shared_output:
                self.client.shared_refused = msg.header.shared_output_refused
            self._start_bar(msg.header)
        elif kind == "token":
            result.generated_ids.append(msg.token.id)
            result.generated_pieces.append(msg.token.piece)
            if self.bar is not None:
                self.bar.set_postfix(tokens=len(result.generated_ids), refresh=False)
        elif kind in ("attention", "statistic"):
            chunk = getattr(msg, kind)
            if kind == "attention" and result.shared_output:
                wrapped = _Chunk(chunk, *self.ring.take(chunk))
            elif kind == "attention" and (chunk.shared_bytes or chunk.shared_index_bytes):
                raise ValueError("malformed stream from the server: a shared piece without shared output")
            else:
                wrapped = _Chunk(chunk)
            if self.bar is not None:
                self.bar.update(len(wrapped.data) + len(getattr(wrapped, "indices", b"") or b""))
            done = self.blocks.add(wrapped, stat=_statistic_of(chunk) if kind == "statistic" else None)
            if done is None:
                return
            key, values, indices = done
            if key.stat is None:
                result.attention[key[:4]] = values
                if indices is not None:
                    result.indices[key[:4]] = indices
            else:
                result.statistics[(key.stat,) + key[:4]] = values
        elif kind == "divergence":
            result.divergence_events.append(msg.divergence)
        elif kind == "kv_decision":
            result.kv_decisions.append(msg.kv_decision)
        elif kind == "trailer":
            result.trailer = msg.trailer

    def request_id(self):
        """The id the server gave the stream in its header (None before it arrived)."""
        header = self.result.header
        return header.request_id if header is not None and header.request_id else None

    def fail(self):
        if self.bar is not None:
            self.bar.close()
        if self.ring is not None:
            self.ring.close()  # the failed stream's server job may still be writing into it

    def finish(self):
        if self.bar is not None:
            self.bar.close()
        if self.ring is not None:
            self.client._give_ring(self.ring)
        return self.result


MODEL_HEADER = "x-attnscope-model"
DEFAULT_SERVER = "127.0.0.1:50051"


HEAD_KINDS = ("previous_token", "duplicate_token", "induction", "sink")  # DetectHeadsResponse's columns


class HeadScores:
    """What DetectHeads answered: `scores[kind]` is a [layers, heads] numpy array per kind of
    HEAD_KINDS (rows: the model's layer numbers, columns: its head numbers), `probe_ids` the probe
    that ran, `compute_ms` the server's time."""

    def __init__(self, response):
        self.probe_ids = list(response.probe_ids)
        self.compute_ms = response.compute_ms
        layers = 1 + max((h.layer for h in response.heads), default=-1)
        heads = 1 + max((h.head for h in response.heads), default=-1)
        self.scores = {k: np.full((layers, heads), np.nan) for k in HEAD_KINDS}
        for h in response.heads:
            for k in HEAD_KINDS:
                self.scores[k][h.layer, h.head] = getattr(h, k)

    def __getitem__(self, kind):
        return self.scores[kind]

    def top(self, kind, n=3):
        """The n (layer, head, score) with the highest `kind` score, best first."""
        a = self.scores[kind]
        order = np.argsort(-a, axis=None, kind="stable")[:n]
        return [(int(i // a.shape[1]), int(i % a.shape[1]), float(a.flat[i])) for i in order]

    def table(self):
        """One row per (layer, head), a column per kind. Needs pandas."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("table() needs pandas (Debian: python3-pandas)") from None
        layers, heads = self.scores[HEAD_KINDS[0]].shape
        rows = [dict(layer=l, head=h, **{k: float(self.scores[k][l, h]) for k in HEAD_KINDS})
                for l in range(layers) for h in range(heads)]
        return pd.DataFrame(rows, columns=["layer", "head", *HEAD_KINDS])

    def __repr__(self):
        best = ", ".join(f"{k} L{l}H{h} {v:.2f}" for k in HEAD_KINDS for l, h, v in self.top(k, 1))
        return f"HeadScores({len(self.probe_ids)}-token probe; best: {best})"


def _with_model(client, request):
    """The request with the client's default model, and the call's metadata (the model header)."""
    if not request.model and client.model:
        request.model = client.model
    metadata = [m for m in client.metadata if m[0] != MODEL_HEADER]
    if _routable(request.model):
        metadata.append((MODEL_HEADER, request.model))
    return request, metadata


def _routable(model):
    """A model name fit for a header (printable ASCII, at most 256 characters); any other name goes
    to the server unrouted, which answers NOT_FOUND for it."""
    return bool(model) and len(model) <= 256 and all(" " <= ch <= "~" for ch in model)


class Client:
    """Connects to an attnscope server: `target` (default: $ATTNSCOPE_SERVER, else 127.0.0.1:50051).
    `token`: bearer token (default: $ATTNSCOPE_TOKEN); `root_certificates`: PEM bytes for TLS.
    `shared_memory`: ring bytes for same-host output (stream_attention's values come through shared
    memory when the server is on this host, the wire otherwise); 0: always the wire. A call the
    server refuses raises attnscope.ServerError (its status, message and request id)."""

    def __init__(self, target=None, token=None, root_certificates=None, timeout=None,
                 shared_memory=16 << 20, model="", max_bytes=DEFAULT_MAX_BYTES):
        target = target or os.environ.get("ATTNSCOPE_SERVER") or DEFAULT_SERVER
        token = token if token is not None else os.environ.get("ATTNSCOPE_TOKEN") or None
        self.target = target
        options = [("grpc.max_receive_message_length", 256 << 20)]
        channels = self._channels()
        if root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self.channel = channels.secure_channel(target, creds, options=options)
        else:
            self.channel = channels.insecure_channel(target, options=options)
        self.stub = pb_grpc.AttentionServiceStub(self.channel)
        self.token, self.root_certificates = token, root_certificates
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        # `model`: the default model of requests, also sent as the x-attnscope-model header that a
        # multi-model front door (deploy/gpus.py's Envoy) routes by.
        self.model = model
        if _routable(model):
            self.metadata.append((MODEL_HEADER, model))
        self.timeout = timeout
        # Captures whose estimate passes this are refused before any attention byte is sent (the
        # request carries it as capture.max_bytes); a call's max_bytes= replaces it; 0: no limit.
        self.max_bytes = int(max_bytes or 0)
        self.shared_memory = shared_memory if shared.available() else 0
        self.shared_refused = None  # why the server could not use shared memory, once it said so
        self._rings = []            # idle rings; a stream takes one and gives it back when it ends well
        self._rings_lock = threading.Lock()

    @staticmethod
    def _channels():
        return grpc

    def _close_rings(self):
        with self._rings_lock:
            rings, self._rings = self._rings, []
        for ring in rings:
            ring.close()

    def close(self):
        self._close_rings()
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _give_ring(self, ring):
        with self._rings_lock:
            self._rings.append(ring)

    def _take_ring(self):
        if not self.shared_memory or self.shared_refused is not None:
            return None
        with self._rings_lock:
            if self._rings:
                return self._rings.pop()
        try:
            return shared.SharedRing(self.shared_memory)
        except OSError as e:
            self.shared_refused = f"cannot create a shared-memory region: {e}"
            return None

    # Each RPC once: its request and how its response reads. _unary calls it (AsyncClient's awaits it).
    def _unary(self, method, request, read=None, metadata=None):
        try:
            response = getattr(self.stub, method)(request, metadata=self.metadata if metadata is None else metadata,
                                                  timeout=self.timeout)
        except grpc.RpcError as e:
            raise server_error(e, method) from None  # gRPC's call object and debug string stay out
        return response if read is None else read(response)

    def model_info(self):
        return self._unary("GetModelInfo", pb.GetModelInfoRequest())

    def tokenize(self, text, add_special_tokens=True):
        """(ids, pieces) of `text`."""
        return self._unary("Tokenize", pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens),
                           lambda r: (list(r.ids), list(r.pieces)))

    def detokenize(self, ids, skip_special_tokens=False):
        return self._unary("Detokenize", pb.DetokenizeRequest(ids=list(ids), skip_special_tokens=skip_special_tokens),
                           lambda r: r.text)

    def detect_heads(self, span=None, seed=0, probe_ids=None, exclude_bos=False, exclude_current_token=False,
                     model=""):
        """Scores every (layer, head) of the served model as a previous-token, duplicate-token,
        induction and sink head from the attention of a probe the server runs: `probe_ids` as
        given, else BOS, `span` random ids (default 32, seeded) and the same ids again
        (TransformerLens' detect_head definitions; the proto's DetectHeadsResponse says each).
        Returns a HeadScores table (`.table()`: a pandas DataFrame; `.top(kind)`)."""
        req = pb.DetectHeadsRequest(model=model, probe_ids=[int(i) for i in (probe_ids or ())], seed=int(seed),
                                    exclude_bos=exclude_bos, exclude_current_token=exclude_current_token)
        if span is not None:
            req.span = int(span)
        req, metadata = _with_model(self, req)
        return self._unary("DetectHeads", req, HeadScores, metadata=metadata)

    # -- detached jobs ---------------------------------------------------------------------------
    def submit(self, *args, **kwargs):
        """Submits a StreamAttention request (the same keywords) as a detached job on a server
        started with --jobs_dir; returns a Job at once. The server runs it under the same scheduler
        and limits and stores the sample; the job survives this client, the notebook and the
        connection. Only this bearer token sees it."""
        request, _ = self._limited_request(args, kwargs)
        request, metadata = _with_model(self, request)
        return self._unary("SubmitJob", request, lambda info: Job(self, info), metadata=metadata)

    def job(self, job_id):
        """The Job of that id (this token's; NOT_FOUND otherwise)."""
        return self._unary("GetJob", pb.JobRequest(job_id=job_id), lambda info: Job(self, info),
                           metadata=_job_metadata(self, job_id))

    def jobs(self):
        """This token's jobs on the server, newest first."""
        return self._unary("ListJobs", pb.ListJobsRequest(), lambda r: [Job(self, i) for i in r.jobs])

    @staticmethod
    def request(prompt=None, token_ids=None, max_new_tokens=16, temperature=0.0, top_k=0, top_p=0.0, seed=0,
                stop_token_ids=(), ignore_eos=False, max_length=0, model="", capture=None, chat=None,
                chat_template_kwargs=None, ablate=(), knockout=(), reference_leads=False, kv_policy=None,
                capture_reference=False, **capture_args):
        """A GenerateRequest. The input is `prompt` (text), `token_ids`, or `chat`: a list of
        {"role": ..., "content": ...} rendered by the checkpoint's chat template, with
        `chat_template_kwargs` (a dict) as its variables.

        Interventions (the unmodified model then runs beside the intervened one on the same tokens
        and every step's divergence comes back, `r.divergence()`): `ablate` a list of
        {"layer": L, "heads": [...], "kind": "zero" | "mean"}; `knockout` a list of
        {"layers": [...], "heads": [...], "keys": [(begin, end), ...], "queries": [(begin, end), ...]}
        (empty layers or heads: all; empty queries: every row; a row never loses its own position);
        `reference_leads`: the unmodified model chooses the tokens; `capture_reference`: the captures
        are of the unmodified model's run (default: the intervened one's); `kv_policy` a KV-cache eviction
        policy with kvpress' parameters, e.g. {"kind": "snapkv", "compression_ratio": 0.5,
        "window_size": 8, "adaptive": True} (kinds streaming_llm, h2o, snapkv, pyramidkv; decisions
        in r.kv_decisions, r.kept(layer), r.key_scores(layer), r.bytes_freed())."""
        # max_new_tokens=0 is a forward pass over the prompt (prefill captures, no token); None: the
        # server's default.
        req = pb.GenerateRequest(model=model, **({} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}),
                                 sampling=pb.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                                            seed=seed),
                                 stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos, max_length=max_length,
                                 capture=capture if capture is not None else capture_spec(**capture_args))
        _add_interventions(req.interventions, ablate, knockout, reference_leads, kv_policy, capture_reference)
        if sum(x is not None for x in (prompt, token_ids, chat)) > 1:
            raise ValueError("give one input: prompt, token_ids or chat")
        if chat_template_kwargs is not None and chat is None:
            raise ValueError("chat_template_kwargs needs chat=[...]")
        if chat is not None:
            for m in chat:
                req.chat.messages.add(role=m["role"], content=m["content"])
            if chat_template_kwargs:
                req.chat.chat_template_kwargs = json.dumps(chat_template_kwargs)
        elif token_ids is not None:
            req.token_ids.ids.extend(int(i) for i in token_ids)
        elif prompt is not None:
            req.text = prompt
        return req

    def _limited_request(self, args, kwargs):
        """The request, with this client's byte limit unless the call gave max_bytes (0: none)."""
        limit = kwargs.pop("max_bytes", None)
        limit = self.max_bytes if limit is None else int(limit or 0)
        request = self.request(*args, **kwargs)
        if limit and not request.capture.max_bytes:
            request.capture.max_bytes = limit
        return request, request.capture.max_bytes

    def generate(self, *args, **kwargs):
        request, _ = self._limited_request(args, kwargs)
        request, metadata = _with_model(self, request)
        return self._unary("Generate", request, metadata=metadata)

    def _start_stream(self, args, kwargs, progress):
        """A StreamAttention call and the receiver its messages go to (blocking and asyncio alike)."""
        request, limit = self._limited_request(args, kwargs)
        receiver = self._receiver(request, progress, limit)
        return receiver, self.stream_raw(request)

    def stream_attention(self, *args, progress=None, **kwargs):
        """Runs a StreamAttention call; returns a StreamResult whose blocks assemble into arrays
        (r.attention(layer), r.statistic(kind, layer)). `progress`: a tqdm bar of the bytes and
        tokens received (None: shown for captures above 64 MB when tqdm is installed).
        `max_bytes`: refuse a capture whose estimate passes it (default: the client's, 4 GiB)."""
        receiver, call = self._start_stream(args, kwargs, progress)
        try:
            for msg in call:
                receiver.feed(msg)
        except BaseException as e:
            call.cancel()  # the server stops within a step
            receiver.fail()
            if isinstance(e, grpc.RpcError):
                raise server_error(e, "StreamAttention", receiver.request_id()) from None
            raise
        return receiver.finish()

    def stream_many(self, inputs, progress=None, on_error="raise", **kwargs):
        """One stream per input (a prompt string, a list of token ids, or a dict of request keywords),
        in order, with a progress bar over the samples (tqdm when installed); returns the results.
        `on_error="raise"`: the first input that fails raises its error, which names the input
        (`input_index`, a note) and carries `results` (the finished ones; None for the rest);
        `"return"`: every input runs and the list holds each one's result or error."""
        _check_on_error(on_error)
        inputs = list(inputs)
        results = [None] * len(inputs)
        for index, item in enumerate(_progress(inputs, progress, "samples")):
            try:
                results[index] = self.stream_attention(progress=False, **_item_kwargs(item, kwargs))
            except Exception as e:  # noqa: BLE001 - each input's error is the caller's to see
                _name_input(e, index, item, len(inputs))
                if on_error == "raise":
                    e.results = results
                    raise
                results[index] = e
        return results

    def _receiver(self, request, progress, max_bytes=0):
        ring = self._take_ring()
        if ring is not None:
            request.shared_output.CopyFrom(ring.request_field())
        receiver = _Receiver(self, ring, progress, max_bytes)
        receiver.result.prompt = request.text  # "" unless the input is text, as attnscope-capture stores it
        return receiver

    def stream_raw(self, request):
        request, metadata = _with_model(self, request)
        return self.stub.StreamAttention(request, metadata=metadata, timeout=self.timeout)


Client.request.__signature__ = inspect.Signature(
    [p for p in inspect.signature(Client.request).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    + _capture_parameters())
_LIMIT = _keyword("max_bytes", None)  # per call; None: the client's limit (default 4 GiB), 0: none


def _sign_calls(cls, concurrency=False):
    _signature(cls.generate, _LIMIT)
    _signature(cls.stream_attention, _keyword("progress", None), _LIMIT)
    inputs = inspect.Parameter("inputs", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    extra = [_keyword("progress", None)] + ([_keyword("concurrency", 4)] if concurrency else []) + [
        _keyword("on_error", "raise")]
    _signature(cls.stream_many, *extra, _LIMIT, head=(inputs,), keywords_only=True)


_sign_calls(Client)


JOB_HEADER = "x-attnscope-job"


def _job_metadata(client, job_id):
    """The client's metadata and the job's id, which a front door with several servers of a model
    routes a job's calls by (deploy/gpus.py; the server's --jobs_id_prefix)."""
    routable = 0 < len(job_id) <= 128 and all(ch.isascii() and (ch.isalnum() or ch == "-") for ch in job_id)
    return list(client.metadata) + ([(JOB_HEADER, job_id.lower())] if routable else [])


JOB_STATUSES = {number: name[len("JOB_"):].lower() for name, number in pb.JobStatus.items()
                if name.startswith("JOB_") and not name.endswith("UNSPECIFIED")}
_JOB_DONE = ("completed", "failed", "cancelled")


class Job:
    """A detached job (Client.submit): `id`, `status()` ("received", "queued", "running",
    "completed", "failed", "cancelled"), `info()` (everything GetJob says: queue position, tokens
    and bytes so far, the estimate, error, times), `wait(progress=True)`, `result()` (the stored
    sample, fetched and resumed where a transfer broke off), `cancel()`."""

    def __init__(self, client, info):
        # An AsyncClient's jobs are polled and fetched with one blocking client of the same server.
        if isinstance(client, AsyncClient):
            if getattr(client, "_blocking", None) is None:
                client._blocking = Client(client.target, token=client.token,
                                          root_certificates=client.root_certificates, timeout=client.timeout,
                                          shared_memory=0, model=client.model)
            client = client._blocking
        self.client, self.id, self._info = client, info.job_id, info
        self._metadata = _job_metadata(client, self.id)

    def __repr__(self):
        i = self._info
        return f"<attnscope.Job {self.id}: {JOB_STATUSES.get(i.status, '?')}, {i.tokens}/{i.max_new_tokens} tokens>"

    def _refresh(self):
        self._info = self.client._unary("GetJob", pb.JobRequest(job_id=self.id), metadata=self._metadata)
        return self._info

    def status(self):
        return JOB_STATUSES.get(self._refresh().status, "unknown")

    def info(self):
        """The job's record as a dict (JobInfo's fields; status as in status())."""
        info = self._refresh()
        d = {f.name: getattr(info, f.name) for f in info.DESCRIPTOR.fields}
        d["status"] = JOB_STATUSES.get(info.status, "unknown")
        return d

    def cancel(self):
        self._info = self.client._unary("CancelJob", pb.JobRequest(job_id=self.id), metadata=self._metadata)
        return JOB_STATUSES.get(self._info.status, "unknown")

    def wait(self, progress=None, poll=0.5, timeout=None):
        """Polls until the job ends; returns the job. A failed or cancelled job raises its
        ServerError. `progress`: a tqdm bar of the tokens (None: when tqdm is installed)."""
        import time
        tqdm = _tqdm()
        bar = None
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                info = self._refresh()
                name = JOB_STATUSES.get(info.status, "unknown")
                if bar is None and progress is not False and tqdm is not None:
                    bar = tqdm(total=info.max_new_tokens or None, unit="tok", desc=f"job {self.id[:8]}")
                if bar is not None:
                    bar.n = info.tokens
                    bar.set_postfix_str(name + (f", queue {info.queue_position}" if info.queue_position else ""))
                    bar.refresh()
                if name in _JOB_DONE:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {self.id} is still {name} after {timeout} s")
                time.sleep(poll)
        finally:
            if bar is not None:
                bar.close()
        if name != "completed":
            code = next((c for c in grpc.StatusCode if c.value[0] == info.error_code), grpc.StatusCode.UNKNOWN)
            raise ServerError(code, info.error_message or name, method="job", request_id=self.id)
        return self

    def result(self, path=None, retries=5):
        """The stored sample (attnscope.Sample), written to `path` (default: a temporary file),
        after waiting for the job. A broken transfer resumes from the bytes already written."""
        import tempfile
        self.wait(progress=False)
        if path is None:
            fd, path = tempfile.mkstemp(prefix=f"attnscope-job-{self.id[:8]}-", suffix=".safetensors")
            os.close(fd)
        total = None
        with open(path, "wb") as f:
            for attempt in range(retries + 1):
                try:
                    for chunk in self.client.stub.FetchResult(pb.FetchResultRequest(job_id=self.id, offset=f.tell()),
                                                              metadata=self._metadata,
                                                              timeout=self.client.timeout):
                        if chunk.offset != f.tell():
                            raise ValueError(f"job {self.id}: a chunk at {chunk.offset}, expected {f.tell()}")
                        f.write(chunk.data)
                        total = chunk.total_bytes
                    break
                except grpc.RpcError as e:
                    if attempt == retries or e.code() not in (grpc.StatusCode.UNAVAILABLE,
                                                              grpc.StatusCode.DEADLINE_EXCEEDED):
                        raise server_error(e, "FetchResult", self.id) from None
            if total is None or f.tell() != total:
                raise ValueError(f"job {self.id}: fetched {f.tell()} of {total} bytes")
        from attnscope.sample import load
        return load(path)


class AsyncClient(Client):
    """The client over grpc.aio, for notebooks that run several requests at once (same keywords
    and results as Client):

        async with attnscope.AsyncClient("127.0.0.1:50051") as c:
            a, b = await asyncio.gather(c.stream_attention(prompt="one", form="dense"),
                                        c.stream_attention(prompt="two", row_entropy=True))
    """

    @staticmethod
    def _channels():
        return grpc.aio

    # model_info, tokenize, detokenize, detect_heads and generate are Client's: they return what _unary returns,
    # here a coroutine to await.
    async def _unary(self, method, request, read=None, metadata=None):
        try:
            response = await getattr(self.stub, method)(
                request, metadata=self.metadata if metadata is None else metadata, timeout=self.timeout)
        except grpc.RpcError as e:
            raise server_error(e, method) from None
        return response if read is None else read(response)

    async def stream_attention(self, *args, progress=None, **kwargs):
        receiver, call = self._start_stream(args, kwargs, progress)
        try:
            async for msg in call:
                receiver.feed(msg)
        except BaseException as e:
            call.cancel()  # the server stops within a step
            receiver.fail()
            if isinstance(e, grpc.RpcError):
                raise server_error(e, "StreamAttention", receiver.request_id()) from None
            raise
        return receiver.finish()

    async def stream_many(self, inputs, progress=None, concurrency=4, on_error="raise", **kwargs):
        """Up to `concurrency` streams at once, results in input order, a bar over the samples.
        `on_error="raise"`: the first input that fails cancels the others (on the server too) and
        raises its error, naming the input and carrying the finished `results` (None for the rest);
        `"return"`: every input runs and the list holds each one's result or error."""
        import asyncio
        _check_on_error(on_error)
        inputs = list(inputs)
        gate = asyncio.Semaphore(concurrency)
        tqdm = _tqdm()
        bar = None if progress is False or tqdm is None else tqdm(total=len(inputs), unit="samples")

        async def one(index, item):
            try:
                async with gate:
                    r = await self.stream_attention(progress=False, **_item_kwargs(item, kwargs))
            except Exception as e:  # noqa: BLE001 - each input's error is the caller's to see
                _name_input(e, index, item, len(inputs))
                if on_error == "raise":
                    raise
                r = e
            if bar is not None:
                bar.update(1)
            return r

        # With on_error="raise", one stream failing ends them all: the others are cancelled (on the
        # shared server too), never left running with their results dropped.
        tasks = [asyncio.ensure_future(one(i, item)) for i, item in enumerate(inputs)]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
            if failed:
                error = failed[0].exception()
                error.results = [t.result() if t.done() and not t.cancelled() and t.exception() is None
                                 else None for t in tasks]
                raise error
            return [t.result() for t in tasks]
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if bar is not None:
                bar.close()

    async def close(self):
        self._close_rings()
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


_sign_calls(AsyncClient, concurrency=True)
