"""Stored samples: `load(path)` for attnscope-capture's safetensors files and the prototype's pickles."""
import codecs
import json
import os
import pickle
import struct

import numpy as np

from attnscope.blocks import parse_block_name
from attnscope.results import Captured, form_name

_NP = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
       "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8,
       "BOOL": np.bool_}
_MAX_HEADER = 100 << 20  # safetensors headers are far smaller


def _int(value):
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _stored_capture(metadata):
    """metadata["capture"] in the layout of format version 2 (what client/cpp/sample_writer.cpp and
    StreamResult.metadata() write). Version 1 (before 0.2) stored a partial dict, with pool_op
    lower case or absent (then only in the spec text under "capture_spec")."""
    stored = metadata.get("capture")
    capture = dict(stored) if isinstance(stored, dict) else {}
    if _int(metadata.get("format_version", 1)) < 2:
        op = capture.get("pool_op")
        if op not in ("mean", "max"):
            words = str(metadata.get("capture_spec", "")).split()
            op = "max" if words and words[0].startswith("pooled:") and words[0].endswith(":max") else "mean"
        capture["pool_op"] = "POOL_" + op.upper()
    return capture


class SampleError(ValueError):
    """A sample file that is malformed or not what it claims to be."""


def _read_header(f, size, path):
    raw = f.read(8)
    if len(raw) != 8:
        raise SampleError(f"{path}: shorter than a safetensors header")
    (n,) = struct.unpack("<Q", raw)
    if n > min(_MAX_HEADER, size - 8):
        raise SampleError(f"{path}: header length {n} does not fit the {size}-byte file")
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SampleError(f"{path}: the header is not JSON ({e})") from None
    except RecursionError:
        raise SampleError(f"{path}: the header is nested too deeply to be a sample's") from None
    if not isinstance(header, dict):
        raise SampleError(f"{path}: the header is not a JSON object")
    return header, 8 + n


def _read_safetensors(path):
    """Returns ({name: ndarray}, metadata) with numpy alone (bfloat16 widened to float32). Every
    entry is checked against the file before it is read."""
    try:
        from safetensors.numpy import load_file, safe_open  # optional, faster
    except ImportError:
        pass
    else:
        try:
            with safe_open(path, "np") as f:
                meta = f.metadata() or {}
            return load_file(path), meta
        except RecursionError:
            raise SampleError(f"{path}: the header is nested too deeply to be a sample's") from None
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header, base = _read_header(f, size, path)
    meta = header.pop("__metadata__", {}) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise SampleError(f"{path}: __metadata__ must map strings to strings")
    data = np.memmap(path, dtype=np.uint8, mode="r") if size > base else np.zeros(0, np.uint8)
    tensors = {}
    for name, e in header.items():
        try:
            dtype, shape, (b, end) = e["dtype"], e["shape"], e["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise SampleError(f"{path}: tensor {name!r} lacks dtype, shape or data_offsets") from None
        if dtype != "BF16" and dtype not in _NP:
            raise SampleError(f"{path}: tensor {name!r} has dtype {dtype!r}, not one of {sorted(_NP) + ['BF16']}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise SampleError(f"{path}: tensor {name!r} has shape {shape!r}")
        if not (isinstance(b, int) and isinstance(end, int) and 0 <= b <= end <= size - base):
            raise SampleError(f"{path}: tensor {name!r} has data_offsets [{b!r}, {end!r}] outside the data")
        itemsize = 2 if dtype == "BF16" else np.dtype(_NP[dtype]).itemsize
        if int(np.prod(shape, dtype=object)) * itemsize != end - b:
            raise SampleError(f"{path}: tensor {name!r} of shape {shape} {dtype} does not fill [{b}, {end})")
        raw = data[base + b:base + end]
        if dtype == "BF16":
            arr = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = raw.view(np.dtype(_NP[dtype]).newbyteorder("<"))
        tensors[name] = arr.reshape(shape)
    return tensors, meta


def _latin1_encode(text, encoding="latin1", errors="strict"):
    """The one use numpy's protocol-2 pickles make of _codecs.encode: array bytes kept as a latin-1
    string. Any other codec (punycode is quadratic: a 400 KB pickle kept load() busy for an hour)
    is refused."""
    if str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1") or errors != "strict":
        raise pickle.UnpicklingError(f"refusing _codecs.encode with codec {encoding!r}: numpy's pickles use latin-1")
    return codecs.latin_1_encode(text)[0]


class _PrototypeUnpickler(pickle.Unpickler):
    """Admits only what the prototype's files hold: dicts, lists, ints, strings and numpy arrays.
    Any other global (os.system, builtins.eval, ...) is refused before it can run."""
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name} from a pickle: only the prototype's layout (dicts, lists, ints, "
            f"strings, numpy arrays) is read; pass allow_unsafe_pickle=True only for files you trust")


def _check_prototype_layout(data, path):
    if not isinstance(data, dict):
        raise SampleError(f"{path}: not the prototype's layout {{layer: {{'shape': [...], 'tensor': array}}}}")
    for k, v in data.items():
        if not (isinstance(k, int) and isinstance(v, dict) and isinstance(v.get("tensor"), np.ndarray)):
            raise SampleError(f"{path}: entry {k!r} is not {{'shape': [...], 'tensor': array}}")
        t = v["tensor"]
        if t.dtype.kind not in "fiu" or t.ndim != 4:
            raise SampleError(f"{path}: layer {k} holds a {t.dtype} array of {t.ndim} dimensions, not [1, H, T, T]")


class Sample(Captured):
    """One stored sample: its blocks assembled into arrays (attnscope.results), tokens, and what
    produced them."""

    def __init__(self, path, tensors, metadata):
        self.path = path
        self.tensors = tensors
        self.metadata = metadata
        self._attention, self._indices, self._statistics = {}, {}, {}
        for name, blk in tensors.items():
            parsed = parse_block_name(name)
            if parsed is None:
                continue
            key, is_indices = parsed
            if getattr(blk, "ndim", 0) not in (2, 3):
                raise SampleError(f"{path}: block {name!r} has {getattr(blk, 'ndim', 0)} dimensions")
            table = self._statistics if key.stat is not None else (self._indices if is_indices else self._attention)
            table[key] = blk

    def __repr__(self):
        return (f"<attnscope.Sample {os.path.basename(str(self.path))}: {self.form}, layers {self.layers}, "
                f"{len(self.token_ids)} positions{', statistics ' + ', '.join(self.statistic_kinds) if self.statistic_kinds else ''}>")

    def release_pages(self):
        """Gives back the memory of the file's pages this process has read (a memory-mapped
        sample reads them again when needed), so that a pass over a large sample holds one layer
        at a time: the viewer's page calls it after each layer."""
        import mmap
        done = set()
        for arr in self.tensors.values():
            m = getattr(arr, "_mmap", None) if isinstance(arr, np.memmap) else None
            if m is not None and id(m) not in done and hasattr(m, "madvise"):
                done.add(id(m))
                m.madvise(mmap.MADV_DONTNEED)

    @property
    def capture(self):
        """The resolved capture spec as stored: the proto's JSON mapping (field names, enum names such
        as "FORM_POOLED", int64 values as strings); a version-1 file's partial record read into it."""
        return _stored_capture(self.metadata)

    @property
    def form(self):
        return form_name(self.capture.get("form"))

    @property
    def pool(self):
        return _int(self.capture.get("pool"))

    @property
    def pool_op(self):
        """mean or max."""
        return "max" if self.capture.get("pool_op") == "POOL_MAX" else "mean"

    @property
    def prompt_length(self):
        return len(self.metadata.get("prompt_token_ids", []))

    @property
    def layers(self):
        if "layers" in self.metadata:
            return list(self.metadata["layers"])
        captured = self.captured_layers
        return captured if captured else sorted(self.capture.get("layers", []))

    @property
    def num_heads(self):
        a = self.attention(self.layers[0])
        return a.shape[0]

    @property
    def model_heads(self):
        """The model's number of attention heads (where the metadata says)."""
        return int(self.metadata.get("num_heads", 0) or 0)

    @property
    def heads(self):
        """The model's head number of each row of attention() and statistic() (heads=[2, 5]: [2, 5])."""
        captured = list(self.capture.get("heads", []) or [])
        if captured:
            return [int(h) for h in captured]
        if self.model_heads:
            return list(range(self.model_heads))
        if self.layers:
            return list(range(self.attention(self.layers[0]).shape[0]))
        return []

    # Captured's reading of interventions (divergence(), lost_mass(), kept(), bytes_freed()).
    @property
    def _divergence_rows(self):
        return list(self.metadata.get("divergence", []) or [])

    @property
    def _kv_rows(self):
        return list(self.metadata.get("kv_decisions", []) or [])

    @property
    def _model_shape(self):
        return int(self.metadata.get("num_layers", 0) or 0), self.model_heads

    @property
    def text(self):
        return self.metadata.get("generated_text", "")

    @property
    def timings(self):
        return dict(self.metadata.get("timings", {}))

    @property
    def token_ids(self):
        """Every position fed to the model: prompt, then generated tokens except the last."""
        prompt = list(self.metadata.get("prompt_token_ids", []))
        gen = list(self.metadata.get("token_ids", []))
        return prompt + gen[:-1]

    @property
    def position_pieces(self):
        """Display text of each position (prompt pieces, then generated pieces but the last)."""
        pieces = list(self.metadata.get("prompt_pieces", [])) + list(self.metadata.get("token_pieces", []))[:-1]
        return [p if isinstance(p, str) else str(p) for p in pieces]

    @property
    def tokens(self):
        """position_pieces for the positions of the matrices (their numbers where pieces are missing)."""
        if self.form in ("dense", "head_mean", "head_max") or "layers" in self.metadata:
            n = self.attention(self.layers[0]).shape[-1]
        else:
            n = len(self.token_ids)
        pieces = self.position_pieces
        if len(pieces) < n:
            return [str(i) for i in range(n)]
        return pieces[:n]

    def attention(self, layer, phase=None):
        """The layer's attention (attnscope.results): dense [heads, T, T] float32, the reduced forms
        in their own shapes."""
        full = self.tensors.get(f"layer.{layer}")
        if full is not None:
            return np.asarray(full, dtype=np.float32)
        try:
            return Captured.attention(self, layer, phase)
        except ValueError as e:
            raise SampleError(f"{self.path}: {e}") from None

    def to_pickle(self, path):
        """Writes the prototype's layout: {layer: {'shape': [1, H, T, T], 'tensor': float32 array}}
        (dense captures)."""
        if self.form != "dense" and "layers" not in self.metadata:
            raise ValueError(f"the prototype's pickle holds dense matrices; this sample is {self.form!r}")
        data = {}
        for layer in self.layers:
            a = self.attention(layer)[None]
            data[layer] = {"shape": list(a.shape), "tensor": a}
        with open(path, "wb") as f:
            pickle.dump(data, f)

    def save(self, path):
        """Writes the sample as attnscope-capture does (.safetensors, or .pkl: the prototype's)."""
        if str(path).endswith(".pkl"):
            return self.to_pickle(path)
        write_safetensors(path, self.tensors, {"attnscope": json.dumps(self.metadata), "format": "pt"})


_DTYPE_NAMES = {np.dtype(v).str.lstrip("<>|="): k for k, v in _NP.items()}


def write_safetensors(path, tensors, metadata):
    """A safetensors file from numpy arrays (little-endian, in the given order), written to a
    temporary name and renamed into place."""
    header, offset, arrays = {"__metadata__": metadata}, 0, []
    for name, arr in tensors.items():
        a = np.ascontiguousarray(arr)
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        dtype = _DTYPE_NAMES.get(a.dtype.str.lstrip("<>|="))
        if dtype is None:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} has no safetensors name")
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = f"{path}.partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays:
            f.write(a.tobytes())
    os.replace(tmp, path)


def load(path, allow_unsafe_pickle=False):
    """Opens a stored sample (.safetensors from attnscope-capture, or a prototype-style .pkl).

    Pickles are read with a restricted unpickler that admits only the prototype's layout, so a
    crafted file cannot run code; `allow_unsafe_pickle=True` lifts that for files you trust."""
    if str(path).endswith(".pkl"):
        with open(path, "rb") as f:
            try:
                data = pickle.load(f) if allow_unsafe_pickle else _PrototypeUnpickler(f).load()
            except RecursionError:
                raise SampleError(f"{path}: the pickle is nested too deeply to be a sample's") from None
        _check_prototype_layout(data, path)
        tensors = {f"layer.{k}": v["tensor"][0] for k, v in data.items()}
        return Sample(path, tensors, {"layers": sorted(data)})
    tensors, meta = _read_safetensors(path)
    try:
        metadata = json.loads(meta["attnscope"]) if "attnscope" in meta else {}
    except json.JSONDecodeError as e:
        raise SampleError(f"{path}: the attnscope metadata is not JSON ({e})") from None
    except RecursionError:
        raise SampleError(f"{path}: the attnscope metadata is nested too deeply to be a sample's") from None
    if not isinstance(metadata, dict):
        raise SampleError(f"{path}: the attnscope metadata is not a JSON object")
    return Sample(path, tensors, metadata)
