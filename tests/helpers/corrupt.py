"""Damaging files on purpose, as a bad disk or an interrupted copy would."""

import json
import struct


def flip_bit(path, key: str, byte: int = 3, bit: int = 5) -> None:
    """Flip one bit of tensor `key`'s data in a safetensors file (by default an exponent bit of its first float)."""
    raw = bytearray(path.read_bytes())
    (size,) = struct.unpack("<Q", raw[:8])
    start = json.loads(raw[8 : 8 + size])[key]["data_offsets"][0]
    raw[8 + size + start + byte] ^= 1 << bit
    path.write_bytes(bytes(raw))
