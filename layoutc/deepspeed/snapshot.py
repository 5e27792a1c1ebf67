"""A live state dict as ``torch.save`` stores it: the pickle, and the storages' bytes.

:func:`pickled` runs Python's pickler over the object with torch's convention for storages
(a persistent id ``("storage", storage class, key, location, numel)`` per distinct storage,
keys numbered in order of first use), so the ``data.pkl`` layoutc writes is the one
``torch.save`` writes and any object DeepSpeed hands over (loss scalers, config dicts, a
user's ``client_state``) is stored as ``torch.save`` would store it. The storages' bytes are
not copied here: :class:`HostBuffers` copies them in pieces into reused host buffers when a
save must not hold the live tensors (asynchronous saves, tensors on an accelerator).
"""

from __future__ import annotations

import io
import pickle
import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch.serialization import location_tag

PAGE = 4096


@dataclass(frozen=True)
class Pickled:
    pkl: bytes
    storages: dict[str, torch.UntypedStorage]  # key -> storage, in key order


def pickled(obj: Any) -> Pickled:
    """``obj`` pickled as ``torch.save`` pickles it (protocol 2), with its storages by key.
    Two tensors viewing one storage share it, as in torch."""
    storages: dict[str, torch.UntypedStorage] = {}
    keys: dict[int, str] = {}

    class _Pickler(pickle.Pickler):
        def persistent_id(self, o: Any) -> Any:
            if isinstance(o, torch.storage.TypedStorage):
                storage = o._untyped_storage
                kind: Any = getattr(torch, o._pickle_storage_type())
                numel = o._size()
            elif isinstance(o, torch.UntypedStorage):
                storage, kind, numel = o, torch.UntypedStorage, o.nbytes()
            else:
                return None
            key = keys.setdefault(storage._cdata, str(len(keys)))
            storages[key] = storage
            return ("storage", kind, key, location_tag(storage), numel)

    out = io.BytesIO()
    _Pickler(out, protocol=2).dump(obj)
    return Pickled(out.getvalue(), storages)


def as_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    """A 1-D uint8 tensor over ``storage``'s bytes (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class HostBuffers:
    """Page-aligned host buffers holding at most ``limit`` bytes in use at once (``None``:
    no bound), page-locked when ``pinned`` (copies from an accelerator then run at full
    speed). Buffers of a whole ``piece`` are kept and reused from one save to the next;
    a smaller piece (the tail of a storage, a small tensor) gets a buffer of its own size.
    :meth:`take` blocks while the bytes in use would pass the limit: that is how a bounded
    snapshot waits for the writes."""

    def __init__(self, piece: int, limit: int | None, pinned: bool = False) -> None:
        self.piece = piece if limit is None else max(PAGE, min(piece, limit // PAGE * PAGE))
        self.limit = limit
        self.pinned = pinned
        self.free: list[torch.Tensor] = []
        self.used = 0
        self.cond = threading.Condition()

    def take(self, n: int) -> torch.Tensor:
        """A buffer of ``n`` bytes (at most ``piece``)."""
        with self.cond:
            while not self._fits(n):
                self.cond.wait()
            self.used += n
            if n == self.piece and self.free:
                return self.free.pop()
        raw = torch.empty(n + PAGE, dtype=torch.uint8, pin_memory=self.pinned)
        skip = -raw.data_ptr() % PAGE
        return raw[skip : skip + n]

    def available(self, n: int) -> bool:
        """Whether :meth:`take` of ``n`` bytes would return without waiting."""
        with self.cond:
            return self._fits(n)

    def _fits(self, n: int) -> bool:  # under self.cond
        return self.limit is None or not self.used or self.used + n <= self.limit

    def give(self, buf: torch.Tensor) -> None:
        with self.cond:
            self.used -= buf.numel()
            if buf.numel() == self.piece:
                self.free.append(buf)
            self.cond.notify_all()
