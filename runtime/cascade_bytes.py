"""cascade.onnx edited as protobuf bytes, without the onnx package (the runtime never imports it).

Two edits: `tunable_cascade_bytes` moves the per-exit vectors (stored as constants so a bare session loads
silently and runs on the image alone) into graph inputs, for GraphRunner and the web page to feed; and
`replace_default` swaps one float64 constant's values, which the bundle writer uses when calibration
changes thresholds, beta, temperatures or ensemble weights.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from edgeexit.errors import BundleError
from edgeexit.runtime.manifest import CASCADE_NAME, CascadeGraph, Manifest, VECTORS_INPUT


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def _fields(buf: bytes) -> list[tuple[int, bytes, bytes]]:
    """A protobuf message's top-level fields in order: (field number, the field's bytes with its key, payload of a
    length-delimited field or b"")."""
    fields, pos = [], 0
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        wire, payload = key & 7, b""
        if wire == 0:
            _, pos = _read_varint(buf, pos)
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        elif wire == 2:
            size, pos = _read_varint(buf, pos)
            payload, pos = buf[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated field")
        fields.append((key >> 3, buf[start:pos], payload))
    return fields


def _message(number: int, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes or message) `number`."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _double_vector_input(name: str, size: int) -> bytes:
    """GraphProto.input (field 11): ValueInfoProto name, TypeProto.tensor_type {elem_type DOUBLE (11), shape [size]}."""
    dim = _message(1, b"\x08" + _varint(size))  # TensorShapeProto.dim { dim_value }
    tensor = b"\x08\x0b" + _message(2, dim)
    return _message(11, _message(1, name.encode()) + _message(2, _message(1, tensor)))


def tunable_cascade_bytes(manifest: Manifest, entry: CascadeGraph | None = None) -> bytes:
    """cascade.onnx (or `entry`'s graph) with its per-exit vectors (thresholds, beta, temperature) as required float64
    graph inputs.

    The file stores them as constants (so a bare session loads without warnings and runs on the image alone);
    this copy, made without the onnx package by editing the protobuf fields of the model's graph (drop those
    initializers, append a graph input per vector after the image), is what GraphRunner and the web page run
    and feed. Files of older bundles already take them as inputs and come back unchanged."""
    entry = manifest.cascade if entry is None else entry
    if entry is None:
        raise BundleError(f"{manifest.root} has no {CASCADE_NAME} (exported by an older edgeexit): re-export it")
    path = manifest.path(entry.file)
    content = path.read_bytes()
    if entry.vectors == VECTORS_INPUT:
        return content
    vectors = {t.name: t for t in entry.inputs[1:]}
    try:
        model = _fields(content)
        graphs = [i for i, (number, _, _) in enumerate(model) if number == 7]  # ModelProto.graph
        if len(graphs) != 1:
            raise ValueError("no single graph")
        kept, found, last_input = [], set(), None
        for number, raw, payload in _fields(model[graphs[0]][2]):
            if number == 5:  # GraphProto.initializer; TensorProto.name is field 8
                name = next((p.decode() for n, _, p in _fields(payload) if n == 8), None)
                if name in vectors:
                    found.add(name)
                    continue
            if number == 11:
                last_input = len(kept)
            kept.append(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not a readable ONNX model ({exc}); re-export the bundle") from None
    if found != set(vectors) or last_input is None:
        raise BundleError(f"{path} lacks the constants {sorted(set(vectors) - found)} its manifest lists; re-export the bundle")
    kept[last_input + 1 : last_input + 1] = [_double_vector_input(t.name, len(t.default)) for t in vectors.values()]
    graph = _message(7, b"".join(kept))
    return b"".join(graph if i == graphs[0] else raw for i, (_, raw, _) in enumerate(model))


def initializer_bytes(name: str, values: Sequence[float]) -> bytes:
    """How onnx serializes the tail of a float64 initializer: field 8 (name), then field 9 (raw_data)."""
    raw = np.asarray(values, dtype="<f8").tobytes()
    encoded = name.encode()
    return b"\x42" + _varint(len(encoded)) + encoded + b"\x4a" + _varint(len(raw)) + raw


def replace_default(content: bytes, name: str, old: Sequence[float], new: Sequence[float], where: str) -> bytes:
    """`content` with float64 constant `name`'s values `old` replaced by `new`: the name + raw little-endian
    bytes must occur exactly once (else BundleError naming `where`)."""
    before, after = initializer_bytes(name, old), initializer_bytes(name, new)
    if content.count(before) != 1:
        raise BundleError(f"cannot locate the default {name} in {where}; re-export the bundle")
    return content.replace(before, after)
