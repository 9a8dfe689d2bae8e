"""A chat's K/V state on disk: a base file and append-only segments, so a save writes what changed.

Layout, in ``state/``::

    <id>.safetensors          the base: every held K/V slot (sinks, parked pinned tokens, window),
                              the pristine float32 keys of sinks and parked tokens, the rollback
                              checkpoint's copies, the whole ledger and the snapshot, at generation b
    <id>.<g>.safetensors      segment g (b < g): the K/V of the tokens added since save g-1 that the
                              window still holds (in a hybrid model's sliding layers: that their
                              rolling native window holds), the ledger tokens and messages added since then,
                              the cache counters, the *head* (every slot before the window, with the
                              pristine keys) if an eviction re-placed it, and the checkpoint's copies

Why: a window token's K/V never changes while it is held (evictions move it between slots; the
sinks and parked pinned tokens are what get re-rotated, see :mod:`sinkchat.kv.cache`), so the tokens a
turn added are all a save has to write of the window; what lies before the window is small and
written whole when it changed, and so are the copies a rollback of the last turn needs
(:mod:`sinkchat.kv.rewind`), which belong to that save alone. Restoring is the base plus each segment
in order: the window's last ``n_win`` tokens are kept (what an eviction dropped is simply not
taken), the newest head, and the last file's copies. Evicted tokens stay in the files as garbage,
so the store writes a new base (compaction) when the files hold more than two windows of tokens,
after :data:`MAX_SEGMENTS` segments, and when the segments cannot describe the change (a rebase
re-rotated every key, the geometry or the model changed, the ledger is not an extension, a rollback
since the last save may have rewritten held K/V): then the older files are removed. Writes stay
proportional to the new tokens on average, and the files stay bounded by about two full states.

Every file is written atomically (temp, fsync, rename) and carries sha256 checksums over its
tensors and over the whole snapshot it completes (:meth:`Snapshot.checksum`, the one the database
rows carry), plus the checksum of the file it extends. A segment that is damaged, a link, or does
not extend the files before it ends the chain there: the files before it still restore an older
save, and the store says which file was wrong. Files from before segments existed are bases.

safetensors, never pickle: loading a file cannot run code. :func:`read_chain` with
``tensors=False`` reads only headers and ledgers (numpy, no torch), for ``chats show``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..files import write_atomic
from ..kv.layout import run_tokens
from ..ledger import Message
from .records import FORMAT, Snapshot

MAX_SEGMENTS = 256  # a new base after this many segments, however short the turns
_LAYER = re.compile(r"(\d+)\.(\w+)")
STASH = ("stash_k", "stash_v", "lstash_k", "lstash_v")  # the rollback checkpoint's copies: the last file's alone


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


def base_path(state_dir: Path, chat_id: int) -> Path:
    return state_dir / f"{chat_id}.safetensors"


def segment_path(state_dir: Path, chat_id: int, gen: int) -> Path:
    return state_dir / f"{chat_id}.{gen}.safetensors"


def segment_paths(state_dir: Path, chat_id: int) -> list[Path]:
    """Every segment file of the chat on disk (links and stale ones too: for removal)."""
    name = re.compile(rf"{chat_id}\.\d+\.safetensors")
    return [p for p in state_dir.glob(f"{chat_id}.*.safetensors") if name.fullmatch(p.name)]


@dataclass
class Chain:
    """What the files of one chat hold: the snapshot they complete, the checksum of the last file,
    the K/V layout, how many tokens of K/V are stored (the base's window, then what each segment
    added to the window and each head it rewrote; the checkpoint copies are bounded by the evicted
    window tokens), how many segments; ``problem`` says why a later segment was not used (None if
    none was found wrong)."""

    snap: Snapshot
    tip: str
    layout: dict
    stored: int
    segments: int = 0
    problem: str | None = None

    def extends(self, snap: Snapshot, tensors: dict) -> str | None:
        """Why ``snap`` (with ``tensors``) cannot be written as a segment after this chain, or None."""
        old, new = self.snap.meta, snap.meta
        if any(old.get(k) != new.get(k) for k in ("sinks", "window", "n_sink", "base")) or local(old) != local(new):
            return "the cache geometry changed or a rebase re-rotated the keys"
        if self.snap.fingerprint != snap.fingerprint or layout(tensors) != self.layout:
            return "the model or the K/V layout changed"
        n = len(self.snap.tokens)
        if len(snap.tokens) < n or snap.tokens[:n] != self.snap.tokens:
            return "the ledger is not an extension of the saved one"
        if snap.rewritten_from(old.get("revision", 0)) is not None:
            return "a rollback since the last save may have rewritten the held K/V"
        if self.stored + new["seen"] - n > 2 * new["window"] or self.segments >= MAX_SEGMENTS:
            return "the files hold enough evicted tokens to be worth compacting"
        return None


def unchanged(old: list[Message], new: list[Message]) -> int:
    """How many leading messages ``new`` shares with ``old`` (the ones a save need not write again).
    Messages are values the engine shares between copies, so this is an identity check per message."""
    same = (i for i, (a, b) in enumerate(zip(old, new)) if a is not b and a != b)
    return next(same, min(len(old), len(new)))


def head(meta: dict) -> int:
    """Slots before the window: the sinks and the parked pinned tokens."""
    return meta.get("n_sink", 0) + run_tokens(meta.get("parked", []))


def local(meta: dict) -> tuple[int | None, list[int]]:
    """A hybrid model's sliding layers: ``(native window, layer indices)``, or ``(None, [])``."""
    found = meta.get("local") or {}
    return found.get("window"), list(found.get("layers", []))


def held(meta: dict, layer: int) -> tuple[int, int]:
    """``(head slots, window tokens)`` layer ``layer`` holds: a sliding layer has no head, and holds
    its own count of the newest tokens."""
    if layer in local(meta)[1]:
        return 0, meta["local"]["held"]
    return head(meta), meta["n_win"]


def layout(tensors: dict) -> dict:
    """Each K/V tensor's dtype and shape apart from the token axis (what a segment must match)."""
    return {k: (str(t.dtype), tuple(t.shape[:-2]), t.shape[-1]) for k, t in tensors.items() if k[-2:] in (".k", ".v")}


def _save(path: Path, tensors: dict, header: dict, fault_point: str, overwrite: bool = True) -> None:
    from safetensors.torch import save

    header = {**header, "tensor_sum": tensor_sum(tensors)}
    write_atomic(path, save(tensors, metadata={"sinkchat": json.dumps(header)}), overwrite=overwrite,
                 fault_point=fault_point)


def write_state(path: Path, snap: Snapshot, tensors: dict, overwrite: bool = True) -> Chain:
    """Atomically replace the base ``path`` (or, without ``overwrite``, create it: ``FileExistsError``
    if it is there); ``OSError`` on failure. Returns the chain it starts."""
    import torch

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    kv = layout(tensors)
    tensors["ledger"] = torch.tensor(snap.tokens, dtype=torch.int64)
    _save(path, tensors, {**snap.header(), "ledger_sum": snap.checksum()}, "state-temp", overwrite)
    return Chain(snap, snap.checksum(), kv, snap.meta.get("n_win", 0))


def write_segment(path: Path, chain: Chain, snap: Snapshot, tensors: dict, keep: int) -> Chain:
    """Atomically write segment ``path`` holding what ``snap`` adds to ``chain`` (whose
    :meth:`Chain.extends` said yes), of which the first ``keep`` messages are unchanged
    (:func:`unchanged`); ``OSError`` on failure. Returns the longer chain."""
    import torch

    meta, old = snap.meta, chain.snap
    n_old, n_head, win_start = len(old.tokens), head(meta), meta["seen"] - meta["n_win"]
    first = max(n_old, win_start)  # new tokens an eviction already dropped are not written
    first_local = max(n_old, meta["seen"] - meta["local"]["held"]) if local(meta)[1] else None
    # an eviction re-rotated the sinks and parked tokens, or changed which tokens are parked
    moved = (win_start, meta.get("parked", [])) != (old.meta["seen"] - old.meta["n_win"], old.meta.get("parked", []))
    out = {}
    for name, t in tensors.items():
        i, _, part = name.partition(".")
        sliding = i.isdigit() and int(i) in local(meta)[1]
        if part in ("k", "v"):
            n_layer_head, n_layer_win = held(meta, int(i))
            slot = n_layer_head + (first_local if sliding else first) - (meta["seen"] - n_layer_win)
            out[name] = t[:, :, slot:].detach().cpu().contiguous()
            if moved and not sliding:
                out[f"{i}.h{part}"] = t[:, :, :n_head].detach().cpu().contiguous()
        elif moved or part in STASH:
            out[name] = t.detach().cpu().contiguous()
    out["ledger"] = torch.tensor(snap.tokens[n_old:], dtype=torch.int64)
    segment = {"prev": chain.tip, "n_prev": n_old, "keep": keep, "first": first}
    if first_local is not None:
        segment["first_local"] = first_local
    header = {**snap.header(keep), "segment": segment, "ledger_sum": snap.checksum()}
    _save(path, out, header, "segment-temp")
    stored = chain.stored + meta["seen"] - first + (n_head if moved else 0)
    return Chain(snap, snap.checksum(), chain.layout, stored, chain.segments + 1)


def _read(path: Path, framework: str, what: str, only: str | None = None) -> tuple[dict, dict]:
    """The header and the tensors (all, or just ``only``) of a state file; ``ValueError`` if unreadable."""
    from safetensors import safe_open

    if path.is_symlink():
        raise ValueError(f"{what} is a symbolic link; sinkchat does not follow links")
    if path.exists() and not path.is_file():
        raise ValueError(f"{what} is not a regular file")
    if not path.is_file():
        raise ValueError(f"{what} is missing")
    try:
        with safe_open(str(path), framework=framework) as f:
            header = json.loads((f.metadata() or {})["sinkchat"])
            tensors = {k: f.get_tensor(k) for k in f.keys() if only is None or k == only}
    except Exception as exc:  # safetensors reports truncation and bad headers in many ways
        why = (str(exc).splitlines() or [type(exc).__name__])[0][:80]
        raise ValueError(f"{what} is damaged ({why})") from None
    if not isinstance(header, dict) or "ledger" not in tensors:
        raise ValueError(f"{what} is damaged (no sinkchat header or ledger)")
    if only is None and tensor_sum(tensors) != header.get("tensor_sum"):
        raise ValueError(f"{what} is damaged (checksum mismatch)")
    return header, tensors


def _snapshot(header: dict, ledger: list[int], what: str, prev: Snapshot | None = None, keep: int = 0) -> Snapshot:
    """The snapshot a file's header and ledger describe; a segment's keeps the first ``keep``
    messages of ``prev``, the snapshot of the files before it (and reuses what that one hashed)."""
    if header.get("format") != FORMAT:
        raise ValueError(f"{what} has an unknown format")
    try:
        rows = [Message(*m) for m in header["messages"]]
        snap = Snapshot(ledger, (prev.messages[:keep] if prev else []) + rows, header["meta"],
                        header["fingerprint"], header["settings"], header["gen"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{what}'s header is damaged ({exc})") from None
    if prev is not None:
        snap.follow(prev, keep)
    if snap.checksum() != header.get("ledger_sum"):
        raise ValueError(f"{what} is damaged (ledger checksum mismatch)")
    return snap


def _layers(tensors: dict) -> dict:
    """``{layer: {"k": ..., "v": ..., "sink": ..., ...}}`` from names like ``3.k``."""
    out: dict = {}
    for name, t in tensors.items():
        if m := _LAYER.fullmatch(name):
            out.setdefault(int(m[1]), {})[m[2]] = t
    return out


def read_chain(state_dir: Path, chat_id: int, tensors: bool = True) -> tuple[Chain, dict | None]:
    """The chat's base and every segment that extends it, as a chain and (with ``tensors``) the K/V
    for :meth:`SinkCache.load_state`; ``ValueError`` saying why if the base is unusable."""
    framework, only = ("pt", None) if tensors else ("numpy", "ledger")
    header, data = _read(base_path(state_dir, chat_id), framework, "the state file", only)
    snap = _snapshot(header, data.pop("ledger").tolist(), "the state file")
    layers = _layers(data)
    chain = Chain(snap, header["ledger_sum"], layout(data), snap.meta.get("n_win", 0))
    for i, parts in layers.items():  # the head, and the window as (first conversation token, K, V) pieces
        n_head, n_win = held(snap.meta, i) if snap.tokens else (0, 0)
        start = snap.meta["seen"] - n_win if snap.tokens else 0
        k, v = parts.pop("k"), parts.pop("v")
        parts["pieces"] = [(start, k[:, :, n_head:], v[:, :, n_head:])]
        parts["hk"], parts["hv"] = k[:, :, :n_head], v[:, :, :n_head]
    while True:
        gen = chain.snap.gen + 1
        path, what = segment_path(state_dir, chat_id, gen), f"the state segment {chat_id}.{gen}.safetensors"
        if not path.exists() and not path.is_symlink():
            break
        try:
            header, data = _read(path, framework, what, only)
            seg, old = header.get("segment"), chain.snap
            if not isinstance(seg, dict) or seg.get("prev") != chain.tip:
                raise ValueError(f"{what} does not extend the files before it")
            if seg.get("n_prev") != len(old.tokens) or not 0 <= seg.get("keep", -1) <= len(old.messages):
                raise ValueError(f"{what} is damaged (counters out of range)")
            ledger = old.tokens + data.pop("ledger").tolist()
            snap = _snapshot(header, ledger, what, old, seg["keep"])
            sliding = local(snap.meta)[1]
            first_local = max(len(old.tokens), snap.meta["seen"] - snap.meta["local"]["held"]) if sliding else None
            if (snap.gen != gen or any(old.meta.get(k) != snap.meta.get(k) for k in ("sinks", "window", "n_sink"))
                    or local(old.meta) != local(snap.meta) or seg.get("first_local") != first_local
                    or seg.get("first") != max(len(old.tokens), snap.meta["seen"] - snap.meta["n_win"])):
                raise ValueError(f"{what} is damaged (it does not fit the base)")
            new = _layers(data)
            if tensors and (set(new) != set(layers) or not all({"k", "v"} <= set(p) for p in new.values())):
                raise ValueError(f"{what} is damaged (layers missing)")
        except (ValueError, TypeError, KeyError) as exc:
            chain.problem = str(exc) if isinstance(exc, ValueError) else f"{what} is damaged ({exc!r})"
            break
        moved = any("hk" in parts for parts in new.values())
        for i, parts in new.items():
            first = seg["first_local"] if i in sliding else seg["first"]
            pieces = layers[i]["pieces"] + [(first, parts.pop("k"), parts.pop("v"))]
            if "hk" not in parts:  # the head did not change: keep the one before, without its copies
                parts.update({k: t for k, t in layers[i].items() if k not in STASH})
            layers[i] = {**parts, "pieces": pieces}
        stored = chain.stored + snap.meta["seen"] - seg["first"] + (head(snap.meta) if moved else 0)
        chain = Chain(snap, header["ledger_sum"], chain.layout, stored, chain.segments + 1)
    return chain, (_assemble(chain.snap.meta, layers) if tensors and chain.snap.tokens else None)


def _assemble(meta: dict, layers: dict) -> dict:
    """The held K/V: the head, then the last ``n_win`` tokens of the window pieces laid end to end
    (a piece that starts after a gap follows an eviction of everything before it); the head's
    pristine keys and the checkpoint's copies as they are."""
    import torch

    seen = meta["seen"]
    out = {}
    for i, parts in sorted(layers.items()):
        n_win = held(meta, i)[1]
        begin, ks, vs = None, [], []
        for first, k, v in parts["pieces"]:
            end = begin + sum(x.shape[-2] for x in ks) if begin is not None else None
            if end is None or first > end:
                begin, ks, vs = first, [], []
            elif first < end:
                raise ValueError("the state segments overlap")
            ks.append(k)
            vs.append(v)
        k, v = torch.cat(ks, dim=-2), torch.cat(vs, dim=-2)
        if begin + k.shape[-2] != seen or begin > seen - n_win:
            raise ValueError("the state files do not hold the window")
        cut = k.shape[-2] - n_win
        out[f"{i}.k"] = torch.cat([parts["hk"], k[:, :, cut:]], dim=-2)
        out[f"{i}.v"] = torch.cat([parts["hv"], v[:, :, cut:]], dim=-2)
        out.update({f"{i}.{name}": t for name, t in parts.items() if name not in ("hk", "hv", "pieces")})
    return out
