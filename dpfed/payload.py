"""Wire format of a federated payload: a fixed manifest, then raw little-endian float32.

Both sides derive the manifest (names, shapes, order) from the adapter they share, so the
message carries only a small header::

    magic b"DPFD" | version u8 | kind u8 | round u32 | manifest sha256[:16] | count u32 | fp32 values

Header: 4 + 1 + 1 + 4 + 16 + 4 = 30 bytes (``FRAMING_BYTES``), whatever the model. A message
whose magic, version, manifest hash, length or values (non-finite) are wrong is rejected.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np
import torch

MAGIC = b"DPFD"
VERSION = 1
_HEADER = struct.Struct("<4sBBI16sI")
FRAMING_BYTES = _HEADER.size
KIND_UP, KIND_DOWN = 1, 2


class PayloadError(ValueError):
    """A message that does not decode against the shared manifest."""


@dataclass(frozen=True)
class Manifest:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, state: dict[str, torch.Tensor]) -> Manifest:
        names = tuple(sorted(state))
        return cls(names, tuple(tuple(state[n].shape) for n in names))

    @property
    def numel(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.shapes))

    @property
    def digest(self) -> bytes:
        text = ";".join(f"{n}:{'x'.join(map(str, s))}" for n, s in zip(self.names, self.shapes))
        return hashlib.sha256(text.encode()).digest()[:16]


def encode(state: dict[str, torch.Tensor], manifest: Manifest, *, round: int, kind: int = KIND_UP) -> bytes:
    if set(state) != set(manifest.names):
        raise PayloadError("state names must match the manifest")
    parts = []
    for n, shape in zip(manifest.names, manifest.shapes):
        t = state[n].detach().to("cpu", torch.float32)
        if tuple(t.shape) != shape:
            raise PayloadError(f"shape of {n} must be {shape}, got {tuple(t.shape)}")
        parts.append(t.reshape(-1).numpy())
    body = np.concatenate(parts).astype("<f4").tobytes() if parts else b""
    return _HEADER.pack(MAGIC, VERSION, kind, round, manifest.digest, manifest.numel) + body


def decode(data: bytes, manifest: Manifest, *, expect_round: int | None = None) -> dict[str, torch.Tensor]:
    if len(data) < FRAMING_BYTES:
        raise PayloadError(f"payload must be at least {FRAMING_BYTES} bytes, got {len(data)}")
    magic, version, _kind, rnd, digest, count = _HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise PayloadError(f"payload magic/version must be {MAGIC!r}/{VERSION}, got {magic!r}/{version}")
    if digest != manifest.digest:
        raise PayloadError("payload manifest hash does not match this adapter (different names or shapes)")
    if count != manifest.numel or len(data) != FRAMING_BYTES + 4 * count:
        raise PayloadError(f"payload must carry {manifest.numel} values, got {count} ({len(data)} bytes)")
    if expect_round is not None and rnd != expect_round:
        raise PayloadError(f"payload round must be {expect_round}, got {rnd}")
    flat = np.frombuffer(data, dtype="<f4", offset=FRAMING_BYTES)
    if not np.isfinite(flat).all():
        raise PayloadError("payload values must be finite, got NaN or inf")
    out, pos = {}, 0
    for n, shape in zip(manifest.names, manifest.shapes):
        k = int(np.prod(shape))
        out[n] = torch.from_numpy(flat[pos:pos + k].copy()).reshape(shape)
        pos += k
    return out
