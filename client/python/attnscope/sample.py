"""Stored samples: `load(path)` for attnscope-capture's safetensors files and the prototype's pickles."""
import json
import os
import pickle
import struct

import numpy as np

from attnscope.blocks import block_name, parse_block_name

_NP = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
       "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8,
       "BOOL": np.bool_}
_MAX_HEADER = 100 << 20  # safetensors headers are far smaller


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
    if not isinstance(header, dict):
        raise SampleError(f"{path}: the header is not a JSON object")
    return header, 8 + n


def _read_safetensors(path):
    """Returns ({name: ndarray}, metadata) with numpy alone (bfloat16 widened to float32). Every
    entry is checked against the file before it is read."""
    try:
        from safetensors.numpy import load_file, safe_open  # optional, faster
        with safe_open(path, "np") as f:
            meta = f.metadata() or {}
        tensors = load_file(path)
        return tensors, meta
    except ImportError:
        pass
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


class _PrototypeUnpickler(pickle.Unpickler):
    """Admits only what the prototype's files hold: dicts, lists, ints, strings and numpy arrays.
    Any other global (os.system, builtins.eval, ...) is refused before it can run."""
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
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


class Sample:
    """One stored sample: attention per layer, tokens, and what produced them."""

    def __init__(self, path, tensors, metadata):
        self.path = path
        self.tensors = tensors
        self.metadata = metadata

    @property
    def layers(self):
        if "layers" in self.metadata:
            return list(self.metadata["layers"])
        return sorted(self.metadata.get("capture", {}).get("layers", []))

    @property
    def num_heads(self):
        a = self.attention(self.layers[0])
        return a.shape[0]

    @property
    def token_ids(self):
        """Every position fed to the model: prompt, then generated tokens except the last."""
        prompt = list(self.metadata.get("prompt_token_ids", []))
        gen = list(self.metadata.get("token_ids", []))
        return prompt + gen[:-1]

    @property
    def tokens(self):
        """Display text of each position (prompt pieces, then generated pieces but the last)."""
        pieces = list(self.metadata.get("prompt_pieces", [])) + list(self.metadata.get("token_pieces", []))[:-1]
        n = self.attention(self.layers[0]).shape[-1]
        if len(pieces) < n or not all(isinstance(p, str) for p in pieces[:n]):
            return [str(i) for i in range(n)]
        return pieces[:n]

    def attention(self, layer):
        """[heads, T, T] float32: the full lower-triangular matrix of `layer`."""
        full = self.tensors.get(f"layer.{layer}")
        if full is not None:
            return np.asarray(full, dtype=np.float32)
        return self._assemble(layer)

    def _assemble(self, layer):
        blocks = {}
        for name, blk in self.tensors.items():
            parsed = parse_block_name(name)
            if parsed is not None and parsed[0].stat is None and not parsed[1] and parsed[0].layer == layer:
                blocks[parsed[0]] = blk
        if not blocks:
            raise KeyError(f"layer {layer} was not captured (captured: {self.layers})")
        if self.metadata.get("capture", {}).get("form") not in (None, "FORM_DENSE"):
            raise ValueError("only dense captures assemble into full matrices; read sample.tensors directly")
        # The matrix side comes from the blocks themselves (metadata may claim anything), and the
        # assembled array may not be much larger than the data it is built from.
        placed = []
        for key, blk in blocks.items():
            if blk.ndim != 3:
                raise SampleError(f"{self.path}: attention block {block_name(key)!r} is malformed")
            placed.append((key.query_begin, blk))
        heads = placed[0][1].shape[0]
        T = max(max(qb + b.shape[1], b.shape[2]) for qb, b in placed)
        have = sum(b.nbytes for _, b in placed)
        if any(b.shape[0] != heads for _, b in placed):
            raise SampleError(f"{self.path}: blocks of layer {layer} disagree on the number of heads")
        if heads * T * T * 4 > 16 * have + (64 << 20):
            raise SampleError(f"{self.path}: layer {layer} would assemble to {heads} x {T} x {T} from only {have} bytes "
                              "of blocks; the file is inconsistent")
        out = np.zeros((heads, T, T), np.float32)
        for qb, blk in placed:
            out[:, qb:qb + blk.shape[1], :blk.shape[2]] = blk
        return out

    def to_pickle(self, path):
        """Writes the prototype's layout: {layer: {'shape': [1, H, T, T], 'tensor': float32 array}}."""
        data = {}
        for layer in self.layers:
            a = self.attention(layer)[None]
            data[layer] = {"shape": list(a.shape), "tensor": a}
        with open(path, "wb") as f:
            pickle.dump(data, f)


def load(path, allow_unsafe_pickle=False):
    """Opens a stored sample (.safetensors from attnscope-capture, or a prototype-style .pkl).

    Pickles are read with a restricted unpickler that admits only the prototype's layout, so a
    crafted file cannot run code; `allow_unsafe_pickle=True` lifts that for files you trust."""
    if str(path).endswith(".pkl"):
        with open(path, "rb") as f:
            data = pickle.load(f) if allow_unsafe_pickle else _PrototypeUnpickler(f).load()
        _check_prototype_layout(data, path)
        tensors = {f"layer.{k}": v["tensor"][0] for k, v in data.items()}
        return Sample(path, tensors, {"layers": sorted(data)})
    tensors, meta = _read_safetensors(path)
    try:
        metadata = json.loads(meta["attnscope"]) if "attnscope" in meta else {}
    except json.JSONDecodeError as e:
        raise SampleError(f"{path}: the attnscope metadata is not JSON ({e})") from None
    if not isinstance(metadata, dict):
        raise SampleError(f"{path}: the attnscope metadata is not a JSON object")
    return Sample(path, tensors, metadata)
