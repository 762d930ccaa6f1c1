"""Captured blocks, described once for Python: their stored names (the same scheme as the C++
writer, core/block.h BlockName) and the reassembly of streamed chunks into blocks."""
from typing import NamedTuple, Optional

import numpy as np


class BlockKey(NamedTuple):
    """What names a block: attention (stat None) or a statistic of kind `stat`."""
    phase: str
    step: int
    layer: int
    query_begin: int
    stat: Optional[str] = None


def block_name(key):
    """attention.<phase>.<layer>.<step>.<query_begin> or statistic.<kind>.<phase>.<layer>.<step>.<query_begin>."""
    if key.stat is not None:
        return f"statistic.{key.stat}.{key.phase}.{key.layer}.{key.step}.{key.query_begin}"
    return f"attention.{key.phase}.{key.layer}.{key.step}.{key.query_begin}"


def parse_block_name(name):
    """(BlockKey, is_indices) of a stored tensor name, or None for a tensor that is not a block."""
    parts = name.split(".")
    indices = parts[-1] == "indices"
    if indices:
        parts = parts[:-1]
    if len(parts) == 5 and parts[0] == "attention":
        stat, rest = None, parts[1:]
    elif len(parts) == 6 and parts[0] == "statistic":
        stat, rest = parts[1], parts[2:]
    else:
        return None
    phase, layer, step, qb = rest
    if not (layer.isdigit() and step.isdigit() and qb.isdigit()):
        return None
    return BlockKey(phase, int(step), int(layer), int(qb), stat), indices


def decode_values(data, dtype, shape):
    """Little-endian values of a safetensors dtype name (F32, F16, BF16, I32) as a numpy array;
    bfloat16 widened to float32."""
    if dtype == "BF16":
        bits = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    np_type = {"F32": "<f4", "F16": "<f2", "I32": "<i4"}[dtype]
    return np.frombuffer(data, dtype=np_type).reshape(shape)


class BlockAssembler:
    """Rebuilds blocks from streamed chunks (AttentionChunk or StatisticChunk), in order; a chunk
    that completes its block returns (key, values, indices or None)."""

    def __init__(self, element_dtype):
        self._element_dtype = element_dtype  # element type number -> safetensors dtype name
        self._pending = {}

    def add(self, chunk, stat=None):
        phase = chunk.phase
        key = BlockKey(phase, chunk.step, chunk.layer, chunk.query_begin, stat)
        values, indices = self._pending.setdefault(key, (bytearray(), bytearray()))
        if len(values) != chunk.byte_offset:
            raise ValueError(f"block {block_name(key)}: a chunk at offset {chunk.byte_offset} after {len(values)} bytes")
        values += chunk.data
        if stat is None:
            indices += chunk.indices
        total = chunk.block_bytes or len(chunk.data)
        if len(values) < total:
            return None
        del self._pending[key]
        shape = tuple(chunk.shape)
        dtype = "F32" if stat is not None else self._element_dtype(chunk.element_type)
        return (key, decode_values(bytes(values), dtype, shape),
                np.frombuffer(bytes(indices), dtype="<i4").reshape(shape) if indices else None)

    @property
    def incomplete(self):
        return [block_name(k) for k in self._pending]
