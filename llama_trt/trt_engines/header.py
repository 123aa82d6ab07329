"""Read what a TensorRT-RTX engine header says, without a GPU.

Reverse-engineered from TensorRT-RTX 1.7.1 engines (undocumented: re-check on each release).
First 64 bytes, little-endian:

* 0x00 ``b"vtrt"`` magic
* 0x08 u32 header format version (2)
* 0x10 u64 total engine size in bytes
* 0x18 u8 major, minor, patch of the TensorRT-RTX that built it
* 0x20 u64 compute-capability bitmask: bit0 SM75, bit1 SM80, bit2 SM86, bit3 SM89,
  bit4 SM120, bit5 SM121 (bit6 is set by the default "portable" build; meaning unknown)

The official check is ``Runtime.get_engine_validity`` on the user's GPU; without a GPU it
returns INVALID, hence this reader. Full TensorRT engines are not decoded (returns None).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

MAGIC_RTX = b"vtrt"
CC_BITS = {0: "75", 1: "80", 2: "86", 3: "89", 4: "120", 5: "121"}


def decode_engine_header(data_or_path) -> dict[str, Any] | None:
    """{"format", "size", "version", "cc_mask", "compute_capabilities", "unknown_bits"} or None."""
    if isinstance(data_or_path, (bytes, bytearray, memoryview)):
        d = bytes(data_or_path[:64])
    else:
        with open(Path(data_or_path), "rb") as f:
            d = f.read(64)
    if len(d) < 0x28 or d[:4] != MAGIC_RTX:
        return None
    mask = struct.unpack_from("<Q", d, 0x20)[0]
    return {
        "format": "tensorrt_rtx",
        "header_version": struct.unpack_from("<I", d, 0x08)[0],
        "size": struct.unpack_from("<Q", d, 0x10)[0],
        "version": "%d.%d.%d" % tuple(d[0x18:0x1B]),
        "cc_mask": mask,
        "compute_capabilities": [cc for bit, cc in CC_BITS.items() if mask >> bit & 1],
        "unknown_bits": [b for b in range(6, 64) if mask >> b & 1],
    }


__all__ = ["CC_BITS", "decode_engine_header"]
