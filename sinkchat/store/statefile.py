"""The state file ``state/<id>.safetensors``: a chat's held K/V, its ledger and a JSON header.

safetensors, never pickle: loading a file cannot run code. The header carries the snapshot
(settings, fingerprint, cache counters, messages, save generation) and two sha256 checksums, one
over the snapshot and ledger (:meth:`Snapshot.checksum`, the same one the database rows carry) and
one over every tensor's bytes, so truncation or a flipped bit is detected, never used.

:func:`read_header` reads only the header and the ledger (numpy, no torch), for ``chats show``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..files import write_atomic
from ..ledger import Message
from .records import FORMAT, Snapshot


def tensor_sum(tensors: dict) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes, in name order."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def write_state(path: Path, snap: Snapshot, tensors: dict) -> None:
    """Atomically replace ``path`` (temp file, fsync, rename, fsync of the directory); ``OSError`` on failure."""
    import torch
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    tensors["ledger"] = torch.tensor(snap.tokens, dtype=torch.int64)
    header = {**snap.header(), "ledger_sum": snap.checksum(), "tensor_sum": tensor_sum(tensors)}
    data = save(tensors, metadata={"sinkchat": json.dumps(header)})
    write_atomic(path, data, fault_point="state-temp")


def _read(path: Path, framework: str, only: str | None = None) -> tuple[dict, dict]:
    """The header and the tensors (all, or just ``only``) of a state file; ``ValueError`` if unreadable."""
    from safetensors import safe_open

    if path.is_symlink():
        raise ValueError("the state file is a symbolic link; sinkchat does not follow links")
    if path.exists() and not path.is_file():
        raise ValueError("the state file is not a regular file")
    if not path.is_file():
        raise ValueError("the state file is missing")
    try:
        with safe_open(str(path), framework=framework) as f:
            header = json.loads((f.metadata() or {})["sinkchat"])
            tensors = {k: f.get_tensor(k) for k in f.keys() if only is None or k == only}
    except Exception as exc:  # safetensors reports truncation and bad headers in many ways
        why = (str(exc).splitlines() or [type(exc).__name__])[0][:80]
        raise ValueError(f"the state file is damaged ({why})") from None
    if not isinstance(header, dict) or "ledger" not in tensors:
        raise ValueError("the state file is damaged (no sinkchat header or ledger)")
    return header, tensors


def _snapshot(header: dict, ledger: list[int]) -> Snapshot:
    if header.get("format") != FORMAT:
        raise ValueError("the state file has an unknown format")
    try:
        snap = Snapshot(ledger, [Message(*m) for m in header["messages"]], header["meta"],
                        header["fingerprint"], header["settings"], header["gen"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"the state file's header is damaged ({exc})") from None
    if snap.checksum() != header.get("ledger_sum"):
        raise ValueError("the state file is damaged (ledger checksum mismatch)")
    return snap


def read_state(path: Path) -> tuple[Snapshot, dict]:
    """The snapshot and K/V tensors of a state file; ``ValueError`` saying why if it is unusable."""
    header, tensors = _read(path, "pt")
    if tensor_sum(tensors) != header.get("tensor_sum"):
        raise ValueError("the state file is damaged (checksum mismatch)")
    ledger = tensors.pop("ledger")
    return _snapshot(header, ledger.tolist()), tensors


def read_header(path: Path) -> Snapshot:
    """The snapshot alone (header and ledger, checked), without torch; ``ValueError`` if unusable."""
    header, tensors = _read(path, "numpy", only="ledger")
    return _snapshot(header, tensors["ledger"].tolist())
