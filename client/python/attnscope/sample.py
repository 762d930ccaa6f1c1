"""Stored samples: `load(path)` for attnscope-capture's safetensors files and the prototype's pickles."""
import json
import pickle
import struct

import numpy as np

_NP = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32, "F64": np.float64}


def _read_safetensors(path):
    """Returns ({name: ndarray}, metadata) with numpy alone (bfloat16 widened to float32)."""
    try:
        from safetensors.numpy import load_file, safe_open  # optional, faster
        with safe_open(path, "np") as f:
            meta = f.metadata() or {}
        tensors = load_file(path)
        return tensors, meta
    except ImportError:
        pass
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        base = 8 + n
    meta = header.pop("__metadata__", {}) or {}
    data = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {}
    for name, e in header.items():
        b, end = e["data_offsets"]
        raw = data[base + b:base + end]
        if e["dtype"] == "BF16":
            arr = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = raw.view(np.dtype(_NP[e["dtype"]]).newbyteorder("<"))
        tensors[name] = arr.reshape(e["shape"])
    return tensors, meta


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
        if len(pieces) != n:
            pieces = [str(i) for i in range(n)]
        return pieces

    def attention(self, layer):
        """[heads, T, T] float32: the full lower-triangular matrix of `layer`."""
        full = self.tensors.get(f"layer.{layer}")
        if full is not None:
            return np.asarray(full, dtype=np.float32)
        return self._assemble(layer)

    def _assemble(self, layer):
        blocks = {k: v for k, v in self.tensors.items() if k.startswith("attention.") and not k.endswith(".indices")
                  and int(k.split(".")[2]) == layer}
        if not blocks:
            raise KeyError(f"layer {layer} was not captured (captured: {self.layers})")
        if self.metadata.get("capture", {}).get("form") not in (None, "FORM_DENSE"):
            raise ValueError("only dense captures assemble into full matrices; read sample.tensors directly")
        P = len(self.metadata["prompt_token_ids"])
        T = P + max(0, len(self.metadata["token_ids"]) - 1)
        heads = next(iter(blocks.values())).shape[0]
        out = np.zeros((heads, T, T), np.float32)
        for name, blk in blocks.items():
            _, phase, _, step, qb = name.split(".")
            qb = int(qb)
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


def load(path):
    """Opens a stored sample (.safetensors from attnscope-capture, or a prototype-style .pkl)."""
    if str(path).endswith(".pkl"):
        with open(path, "rb") as f:
            data = pickle.load(f)
        tensors = {f"layer.{k}": v["tensor"][0] for k, v in data.items()}
        return Sample(path, tensors, {"layers": sorted(data)})
    tensors, meta = _read_safetensors(path)
    metadata = json.loads(meta["attnscope"]) if "attnscope" in meta else {}
    return Sample(path, tensors, metadata)
