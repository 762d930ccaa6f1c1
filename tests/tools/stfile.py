"""Minimal safetensors reading and writing with numpy alone (bfloat16 included)."""
import json
import struct

import numpy as np

_NP = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32,
       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def f32_to_bf16_bits(x):
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def bf16_bits_to_f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def write(path, tensors, metadata=None, raw_header=None):
    """tensors: name -> (array, dtype name). dtype "BF16" takes float arrays and rounds them."""
    header = {}
    if metadata:
        header["__metadata__"] = metadata
    blobs = []
    offset = 0
    for name, (array, dtype) in tensors.items():
        if dtype == "BF16":
            data = f32_to_bf16_bits(array).tobytes()
        else:
            data = np.ascontiguousarray(array, dtype=_NP[dtype]).tobytes()
        header[name] = {"dtype": dtype, "shape": list(np.shape(array)), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(raw_header if raw_header is not None else header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def read(path):
    """Returns (tensors as float32/int numpy arrays, metadata dict)."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    meta = header.pop("__metadata__", {})
    out = {}
    for name, e in header.items():
        b, end = e["data_offsets"]
        chunk = data[b:end]
        if e["dtype"] == "BF16":
            arr = bf16_bits_to_f32(np.frombuffer(chunk, dtype=np.uint16))
        else:
            arr = np.frombuffer(chunk, dtype=_NP[e["dtype"]])
        out[name] = arr.reshape(e["shape"])
    return out, meta
