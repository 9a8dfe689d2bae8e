"""The block memory: the K/V that left the window, kept on disk in blocks so it can be recalled.

Ideas from InfLLM (Xiao et al., NeurIPS 2024: evicted K/V in blocks, a few representative keys per
block scored against the queries, the best blocks brought back) and EM-LLM (Fountas et al., ICLR
2025); the file, the bookkeeping and the scoring here are sinkchat's own.

What it holds, per global (sink) layer of the model:

* **Blocks on disk.** Evicted tokens arrive in eviction order (:meth:`BlockMemory.add`) and are cut
  into blocks of exactly ``block`` tokens; each block is one fixed-size record appended to the
  memory file: the tokens' conversation indices and ids, the RoPE position each key was computed
  at, the representative keys, and per layer the keys ``[KV, block, D]`` and values in the cache's
  dtype, with a sha256 per layer and one over the rest. A record is read back per layer and block
  when recalled (``os.pread``: nothing is mapped; RAM holds only the representatives, 1/64 of the K/V with
  4 per block of 64 in float16 against float32 K/V).
* **Representative keys in RAM.** Per block and layer, ``reps`` vectors ``[KV, D]`` (float16): the
  keys rotated back to position 0 and averaged over ``reps`` consecutive slices of the block. A
  query scores a block by its best representative (:meth:`BlockMemory.scores`).
* **Pending tokens in RAM.** Fewer than ``block`` evicted tokens wait for their block to fill;
  they are part of the cache's saved state (:meth:`BlockMemory.state`), not of the file.

The memory file is ``<dir>/.memory-<pid>-<random>.tmp`` until the store adopts it as the chat's
``state/<id>.memory`` (a rename: the open descriptor stays valid), or an anonymous temporary file
where no directory is given. Records are written with ``pwrite`` and never change afterwards
(:meth:`truncate` only forgets blocks; new ones are written over forgotten ones); the store fsyncs
the file before it commits a save that counts its blocks. A record that does not match its
checksums or the chat's ledger is *damaged*: it is never recalled, and one notice says which
tokens can no longer be recalled; nothing else is lost.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
import tempfile
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import torch

from ..files import MEMORY_TMP, fault
from ..ledger import Span, clip, covered_by, gaps, merge_spans
from .layout import Run, run_positions, run_tokens, runs_of

MAGIC = b"SINKMEM1"  # the file header's first bytes
RECORD = b"SKMBLOCK"  # each record's first bytes
FILE_HEADER = 4096  # bytes before the first record: MAGIC and the geometry as JSON
SUFFIX = ".memory"
REPS_CHUNK = 64  # blocks whose representatives are allocated together (never copied to grow)


class MemoryFileError(ValueError):
    """A memory file that cannot be used (missing, damaged header, another model or geometry)."""


@dataclass(frozen=True)
class Geometry:
    """What every record of a memory file shares: ``layers`` global layers of ``kv_heads`` x
    ``head_dim`` keys and values in ``dtype``, blocks of ``block`` tokens, ``reps`` representatives,
    and ``key``: a digest of what the K/V depend on (model, quantization, dtype, RoPE)."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    block: int
    reps: int
    key: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def elem(self) -> int:
        return torch.empty(0, dtype=self.torch_dtype).element_size()

    @property
    def head_size(self) -> int:
        """Record header: magic, index, sha256 of the token section, a sha256 per layer; 64-aligned."""
        return -(-(16 + 32 * (1 + self.layers)) // 64) * 64

    @property
    def token_size(self) -> int:
        """Token section: conversation indices, ids, positions (int64 each), reps (float16)."""
        return self.block * 24 + self.layers * self.reps * self.kv_heads * self.head_dim * 2

    @property
    def layer_size(self) -> int:
        """One layer's keys and values."""
        return 2 * self.kv_heads * self.block * self.head_dim * self.elem

    @property
    def record_size(self) -> int:
        return self.head_size + self.token_size + self.layers * self.layer_size


def split_runs(runs: list[Run], n: int) -> tuple[list[Run], list[Run]]:
    """The first ``n`` tokens of ``runs`` and the rest."""
    head: list[Run] = []
    for i, (t0, t1, p0) in enumerate(runs):
        if n <= 0:
            return head, runs[i:]
        take = min(n, t1 - t0)
        head.append((t0, t0 + take, p0))
        if take < t1 - t0:
            return head, [(t0 + take, t1, p0 + take), *runs[i + 1 :]]
        n -= take
    return head, []


def run_spans_of(runs: list[Run]) -> list[Span]:
    return merge_spans(sorted((t0, t1) for t0, t1, _ in runs))


def derotate(keys: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys ``[..., n, D]`` computed at ``positions`` ``[n]``, rotated back to position 0 (float32)."""
    from .layer import rotate

    return rotate(keys.float(), -positions.to(torch.float64), inv_freq)


def scoring_query(queries: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                  distance: int) -> torch.Tensor:
    """``[H, D]``: a chunk's queries ``[n, H, D]`` (RoPE'd at ``positions`` ``[1, n]``) back at position
    0, averaged over the chunk (a sum of dot products is the dot product of the sum), then moved
    ``distance`` positions on: scored against representatives at position 0, every block is seen from
    the same distance (InfLLM scores memory at the local window's distance)."""
    from .layer import rotate

    q = derotate(queries.transpose(0, 1), positions.reshape(-1).cpu(), inv_freq).mean(dim=1, keepdim=True)
    return (rotate(q, distance, inv_freq) if distance else q)[:, 0]


def representatives(keys: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, reps: int) -> torch.Tensor:
    """``[reps, KV, D]``: a block's keys ``[KV, n, D]`` back at position 0, averaged over ``reps``
    consecutive slices (one slice: the block's centroid)."""
    k = derotate(keys, positions, inv_freq)
    return torch.stack([part.mean(dim=-2) for part in torch.tensor_split(k, reps, dim=-2)])


class BlockMemory:
    """Evicted K/V of the global layers, in blocks of ``block`` tokens on disk (see the module).

    ``inv_freqs``: each global layer's RoPE inverse frequencies; ``directory``: where the memory file
    is made (None: an anonymous temporary file); ``key``: what the K/V depend on (a chat's fingerprint
    digest), so a file made by another model is never read.
    """

    def __init__(self, block: int, reps: int, inv_freqs: list[torch.Tensor], directory: Path | None = None,
                 key: str = ""):
        if block < 1 or not 1 <= reps <= block:
            raise ValueError(f"a memory block of {block} tokens cannot have {reps} representatives")
        self.block, self.reps, self.inv_freqs, self.key = block, reps, inv_freqs, key
        self.directory = directory
        self.geometry: Geometry | None = None  # known from the first tokens added (or the file opened)
        self.fd: int | None = None
        self.path: Path | None = None  # the file's name when it has one (not an anonymous temporary file)
        self.writable = True  # False: a file opened on a read-only disk (nothing new is recorded)
        self.runs: list[list[Run]] = []  # per block: its tokens (conversation index, stored key position)
        self.damaged: set[int] = set()  # blocks that failed their checksums: never recalled
        self.notices: list[str] = []  # for the user, taken by the engine after each step
        self._reps: list[torch.Tensor] = []  # chunks of blocks: [L, REPS_CHUNK, reps, KV, D] float16
        self.pending: list[Run] = []  # evicted tokens waiting for their block to fill
        self.pending_ids: list[int] = []
        self.pending_k: list[torch.Tensor | None] = [None] * len(inv_freqs)  # per layer [1, KV, n, D]
        self.pending_v: list[torch.Tensor | None] = [None] * len(inv_freqs)

    # -- what it holds ---------------------------------------------------------------------------

    @property
    def blocks(self) -> int:
        return len(self.runs)

    @property
    def tokens(self) -> int:
        """Tokens in the memory: in blocks, and pending."""
        return self.blocks * self.block + run_tokens(self.pending)

    def valid(self) -> list[int]:
        """Blocks that can be recalled (every block but the damaged ones)."""
        return [i for i in range(self.blocks) if i not in self.damaged]

    def spans(self, index: int) -> list[Span]:
        """The conversation tokens of block ``index``, as sorted spans."""
        return run_spans_of(self.runs[index])

    def take_notices(self) -> list[str]:
        notices, self.notices = self.notices, []
        return notices

    # -- adding what was evicted -----------------------------------------------------------------

    def add(self, runs: list[Run], ids: list[int], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Record evicted tokens: ``runs`` (their conversation indices and the positions their keys sit
        at), their token ``ids``, and per layer their keys and values ``[1, KV, n, D]``. Every full block
        goes to the file."""
        n = run_tokens(runs)
        if not n or not self.writable:
            return
        if len(ids) != n or len(keys) != len(self.inv_freqs):
            raise ValueError("one id and one key per layer for every token added")
        if self.geometry is None:
            _, kv, _, d = keys[0].shape
            self.geometry = Geometry(len(keys), kv, d, str(keys[0].dtype).removeprefix("torch."), self.block,
                                     self.reps, self.key)
        dtype = self.geometry.torch_dtype
        self.pending += runs
        self.pending_ids += list(ids)
        for j, (k, v) in enumerate(zip(keys, values)):
            k, v = k.to(dtype), v.to(dtype)
            old_k, old_v = self.pending_k[j], self.pending_v[j]
            self.pending_k[j] = k.clone() if old_k is None else torch.cat([old_k, k], dim=-2)
            self.pending_v[j] = v.clone() if old_v is None else torch.cat([old_v, v], dim=-2)
        while run_tokens(self.pending) >= self.block:
            self._flush()

    def _flush(self) -> None:
        """Write the first ``block`` pending tokens as the next record."""
        b = self.block
        runs, self.pending = split_runs(self.pending, b)
        ids, self.pending_ids = self.pending_ids[:b], self.pending_ids[b:]
        keys = [k[:, :, :b] for k in self.pending_k]
        values = [v[:, :, :b] for v in self.pending_v]
        left = run_tokens(self.pending)
        self.pending_k = [k[:, :, b:].clone() if left else None for k in self.pending_k]
        self.pending_v = [v[:, :, b:].clone() if left else None for v in self.pending_v]
        positions = torch.tensor(run_positions(runs), dtype=torch.int64)
        reps = torch.stack([representatives(k[0], positions, f, self.reps)
                            for k, f in zip(keys, self.inv_freqs)]).to(torch.float16)  # [L, reps, KV, D]
        index = self.blocks
        self._write(index, runs, ids, positions, reps, keys, values)
        self.runs.append(runs)
        self.damaged.discard(index)
        self._keep_reps(index, reps)

    def _keep_reps(self, index: int, reps: torch.Tensor) -> None:
        """Store block ``index``'s representatives ``[L, reps, KV, D]``. They live in chunks of
        ``REPS_CHUNK`` blocks, each allocated once: an array grown by doubling left its old copies in
        the allocator's heap and overshot by up to 2x (RSS 1.11x over 2000 turns of ``bench endless``)."""
        chunk, at = divmod(index, REPS_CHUNK)
        while len(self._reps) <= chunk:
            self._reps.append(reps.new_zeros((reps.shape[0], REPS_CHUNK, *reps.shape[1:])))
        self._reps[chunk][:, at] = reps

    # -- the file --------------------------------------------------------------------------------

    def _open_new(self) -> None:
        """Create the memory file (named in ``directory``, else anonymous) and write its header."""
        if self.directory is not None:
            name = MEMORY_TMP.format(pid=os.getpid(), token=secrets.token_hex(4))
            path = Path(self.directory) / name
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            self.path = path
        else:
            handle = tempfile.TemporaryFile()
            self.fd, self.path = os.dup(handle.fileno()), None
            handle.close()
        self._write_header()

    def _write_header(self) -> None:
        header = json.dumps(vars(self.geometry)).encode()
        data = MAGIC + struct.pack("<I", len(header)) + header
        if len(data) > FILE_HEADER:
            raise ValueError("memory geometry too large for its header")
        os.pwrite(self.fd, data.ljust(FILE_HEADER, b"\0"), 0)

    def _write(self, index: int, runs: list[Run], ids: list[int], positions: torch.Tensor, reps: torch.Tensor,
               keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        g = self.geometry
        if self.fd is None:
            self._open_new()
        tokens = [t for t0, t1, _ in runs for t in range(t0, t1)]
        section = (torch.tensor(tokens, dtype=torch.int64).numpy().tobytes()
                   + torch.tensor(ids, dtype=torch.int64).numpy().tobytes()
                   + positions.numpy().tobytes() + _raw(reps))
        layers = [_raw(k[0].contiguous()) + _raw(v[0].contiguous()) for k, v in zip(keys, values)]
        sums = [hashlib.sha256(section).digest()] + [hashlib.sha256(part).digest() for part in layers]
        head = (RECORD + struct.pack("<Q", index) + b"".join(sums)).ljust(g.head_size, b"\0")
        data = head + section + b"".join(layers)
        offset = FILE_HEADER + index * g.record_size
        half = len(data) // 2
        os.pwrite(self.fd, data[:half], offset)
        fault("memory-write")  # a kill half-way through a record: the tests' SIGKILL
        os.pwrite(self.fd, data[half:], offset + half)

    def adopt(self, path: Path | None) -> None:
        """The store renamed this memory's file to ``path`` (the descriptor is unchanged)."""
        self.path = path

    def keep_in(self, directory: Path) -> None:
        """Make the memory file a named file in ``directory`` (where a store can adopt it): from now
        on if none was made yet; an anonymous one is copied there, the first time it is asked."""
        self.directory = directory
        if self.fd is None or self.path is not None:
            return
        old, size = self.fd, FILE_HEADER + self.blocks * self.geometry.record_size
        self.fd = None
        self._open_new()
        at = 0
        while at < size:
            chunk = os.pread(old, min(1 << 22, size - at), at)
            if not chunk:
                break
            os.pwrite(self.fd, chunk, at)
            at += len(chunk)
        os.close(old)

    def close(self) -> None:
        if self.fd is not None:
            with suppress(OSError):
                os.close(self.fd)
            self.fd = None

    def __del__(self):
        self.close()

    # -- recall ----------------------------------------------------------------------------------

    def scores(self, layer: int, query: torch.Tensor) -> torch.Tensor:
        """``[blocks]``: how well each block answers ``query`` ``[H, D]`` (float32, already at the
        scoring distance from position 0) in global layer ``layer``: the best of its representatives'
        dot products summed over the query heads that share each key head; damaged blocks score -inf."""
        n = self.blocks
        reps = torch.cat([c[layer] for c in self._reps])[:n].float()  # [n, reps, KV, D]
        kv = reps.shape[2]
        q = query.reshape(kv, -1, query.shape[-1]).sum(dim=1).to(reps.device)  # [KV, D]
        s = torch.einsum("nrkd,kd->nr", reps, q).amax(dim=-1)
        if self.damaged:
            s[list(self.damaged)] = float("-inf")
        return s

    def select(self, layer: int, query: torch.Tensor, k: int) -> list[int]:
        """The ``k`` best valid blocks for ``query`` in layer ``layer``, ranked best first."""
        s = self.scores(layer, query)
        order = torch.argsort(s, descending=True, stable=True).tolist()
        return [i for i in order if i not in self.damaged][:k]

    def read(self, layer: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``index``'s keys and values ``[1, KV, block, D]`` in layer ``layer`` (its keys sit at
        :meth:`positions`). Raises :class:`MemoryFileError` when the record fails its checksum (the block
        is then marked damaged, with a notice)."""
        g = self.geometry
        offset = FILE_HEADER + index * g.record_size
        try:
            head = os.pread(self.fd, g.head_size, offset)
            at = offset + g.head_size + g.token_size + layer * g.layer_size
            data = os.pread(self.fd, g.layer_size, at)
        except OSError as exc:
            data, head = b"", b""
            why = str(exc)
        else:
            why = "checksum mismatch"
        want = head[16 + 32 * (1 + layer) : 16 + 32 * (2 + layer)]
        if head[:8] != RECORD or len(data) != g.layer_size or hashlib.sha256(data).digest() != want:
            self._damage(index, why)
            raise MemoryFileError(f"memory block {index} is damaged")
        shape = (1, g.kv_heads, g.block, g.head_dim)
        flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        half = flat.numel() // 2
        k = flat[:half].view(g.torch_dtype).reshape(shape)
        v = flat[half:].view(g.torch_dtype).reshape(shape)
        return k, v

    def positions(self, index: int) -> list[int]:
        return run_positions(self.runs[index])

    def _damage(self, index: int, why: str) -> None:
        if index in self.damaged:
            return
        self.damaged.add(index)
        spans = ", ".join(f"{a}–{b - 1}" for a, b in self.spans(index))
        self.notices.append(f"the memory file is damaged ({why}) in block #{index + 1} (tokens {spans}): "
                            "the model can no longer recall those tokens")

    # -- going back --------------------------------------------------------------------------------

    def mark(self) -> tuple[int, int]:
        """What :meth:`truncate` needs to come back to this moment: ``(blocks, pending tokens)``."""
        return self.blocks, run_tokens(self.pending)

    def truncate(self, blocks: int, pending: int) -> None:
        """Forget what was added since :meth:`mark` returned ``(blocks, pending)``. The pending tokens
        of then are the first ``pending`` of block ``blocks`` if it was written since (read back from
        the file: lost, with the damaged block's notice, if it fails its checksums), else of the
        pending tokens now."""
        if blocks > self.blocks:
            raise ValueError(f"the memory has {self.blocks} blocks, not {blocks}")
        if blocks < self.blocks:
            found = self._section(blocks) if pending else None
            try:
                parts = [self.read(j, blocks) for j in range(self.geometry.layers)] if found else []
            except MemoryFileError:
                parts = []
            pending = pending if parts else 0
            self.pending = split_runs(self.runs[blocks], pending)[0]
            self.pending_ids = found[1][:pending] if pending else []
            self.pending_k = [k[:, :, :pending].clone() for k, _ in parts] or [None] * len(self.inv_freqs)
            self.pending_v = [v[:, :, :pending].clone() for _, v in parts] or [None] * len(self.inv_freqs)
        else:
            self._keep_pending(pending)
        del self.runs[blocks:]
        self.damaged = {i for i in self.damaged if i < blocks}

    def _keep_pending(self, n: int) -> None:
        self.pending, self.pending_ids = split_runs(self.pending, n)[0], self.pending_ids[:n]
        self.pending_k = [k[:, :, :n].clone() if n and k is not None else None for k in self.pending_k]
        self.pending_v = [v[:, :, :n].clone() if n and v is not None else None for v in self.pending_v]

    def _section(self, index: int) -> tuple[list[int], list[int], list[int], torch.Tensor] | None:
        """Block ``index``'s token indices, ids, key positions and representatives ``[L, reps, KV, D]``
        from its record, or None when the record fails its checksum."""
        g = self.geometry
        offset = FILE_HEADER + index * g.record_size
        try:
            head = os.pread(self.fd, g.head_size, offset)
            section = os.pread(self.fd, g.token_size, offset + g.head_size)
        except OSError:
            return None
        if head[:8] != RECORD or len(section) != g.token_size or hashlib.sha256(section).digest() != head[16:48]:
            return None
        b = g.block
        ints = torch.frombuffer(bytearray(section[: 24 * b]), dtype=torch.int64)
        reps = torch.frombuffer(bytearray(section[24 * b :]), dtype=torch.float16)
        return (ints[:b].tolist(), ints[b : 2 * b].tolist(), ints[2 * b :].tolist(),
                reps.reshape(g.layers, g.reps, g.kv_heads, g.head_dim))

    def held(self) -> list[Span]:
        """Every conversation token the memory holds, in blocks and pending, as sorted spans (a block
        found damaged when the file was opened holds no token it can name)."""
        return merge_spans(sorted(s for runs in [*self.runs, self.pending] for s in run_spans_of(runs)))

    def trim(self, evicted: list[Span], end: int) -> None:
        """Keep the longest prefix of the memory's tokens, in the order they were added, that are all
        evicted (inside the sorted ``evicted`` spans) and before token ``end``; a block cut in the
        middle gives its first tokens back as pending ones (read from the file: lost, with the damaged
        block's notice, if it fails its checksums). After the cache was rebuilt from the ledger the
        window may hold again what the memory held."""
        kept = 0
        for runs in [*self.runs, self.pending]:
            for t0, t1, _ in runs:
                ok = t1 if t1 <= end and covered_by(evicted, t0, t1) == t1 - t0 else next(
                    t for t in range(t0, t1) if t >= end or covered_by(evicted, t, t + 1) != 1)
                kept += ok - t0
                if ok < t1:
                    break
            else:
                continue
            break
        if kept >= self.blocks * self.block:
            self._keep_pending(kept - self.blocks * self.block)
        else:
            self.truncate(kept // self.block, kept % self.block)

    def reconcile(self, evicted: list[Span], end: int, lost: list[Span]) -> int:
        """After a rebuild of the cache that holds tokens before ``end`` and has evicted the sorted
        ``evicted`` spans: forget what the window holds again, and return the first token from which
        the rebuild must feed the stream through the cache's own eviction so that the memory holds
        every evicted token once (``end``: nothing to feed). The memory then holds evicted tokens
        before it only. ``lost``: evicted tokens whose K/V are gone for good (a damaged or missing
        file, a read-only one), never fed again."""
        start = end
        while True:
            self.trim(clip(evicted, 0, start), start)
            known = merge_spans(sorted(self.held() + lost))
            first = next((g[0] for a, b in evicted for g in gaps(known, a, b)), end)
            if first >= start:
                return start
            start = first

    # -- saving and opening ------------------------------------------------------------------------

    def state(self, names: list[int]) -> tuple[dict, dict[str, torch.Tensor]]:
        """The memory's part of a cache state: counters (``meta``) and the pending tokens' K/V as
        ``<layer>.mk`` / ``<layer>.mv`` (``names``: the global layers' indices in the model)."""
        meta = {"block": self.block, "reps": self.reps, "blocks": self.blocks,
                "pending": [list(r) for r in self.pending], "pending_ids": list(self.pending_ids),
                "file": self.path.name if self.path is not None else None}
        tensors = {}
        if self.pending:
            for i, k, v in zip(names, self.pending_k, self.pending_v):
                tensors[f"{i}.mk"], tensors[f"{i}.mv"] = k.clone(), v.clone()
        return meta, tensors

    def open(self, path: Path, meta: dict, tensors: dict[str, torch.Tensor], names: list[int], ledger: list[int],
             writable: bool = True) -> list[str]:
        """Continue a saved memory: the file at ``path`` holding ``meta["blocks"]`` blocks, the pending
        tokens from ``tensors``. Checks each block's tokens against the ``ledger`` (conversation token
        ids). Returns notices: a file that cannot be used starts an empty memory there (one notice);
        a block that fails its checks is never recalled (one notice for them all)."""
        self.close()
        self.__init__(self.block, self.reps, self.inv_freqs, self.directory, self.key)
        blocks = int(meta.get("blocks", 0))
        self.block, self.reps = int(meta.get("block", self.block)), int(meta.get("reps", self.reps))
        notices = []
        try:
            self._open_file(path, writable)
        except (OSError, MemoryFileError) as exc:  # a fresh memory: a new file, adopted at the next save
            self.close()
            if blocks:
                notices.append(f"the memory file {path.name} cannot be used ({exc}); what the model forgot "
                               "before now can no longer be recalled")
            blocks, self.geometry, self.path = 0, None, None
            self.directory = path.parent if writable else None
        bad = []
        for index in range(blocks):
            runs = self._read_tokens(index, ledger)
            if runs is None:
                bad.append(index)
                runs = []  # its tokens are unknown: the block is damaged, never recalled
                self.damaged.add(index)
            self.runs.append(runs)
        if bad:
            notices.append(f"the memory file {path.name} is damaged in {len(bad)} of its {blocks} blocks; "
                           "the model can no longer recall the tokens they held")
        self.pending = [tuple(r) for r in meta.get("pending", [])]
        self.pending_ids = list(meta.get("pending_ids", []))
        n = run_tokens(self.pending)
        if n:
            try:
                self.pending_k = [tensors[f"{i}.mk"] for i in names]
                self.pending_v = [tensors[f"{i}.mv"] for i in names]
                if any(t.shape[-2] != n for t in self.pending_k + self.pending_v) or len(self.pending_ids) != n:
                    raise KeyError("sizes")
                if self.geometry is None:
                    k = self.pending_k[0]
                    self.geometry = Geometry(len(names), k.shape[1], k.shape[-1], str(k.dtype).removeprefix("torch."),
                                             self.block, self.reps, self.key)
            except KeyError:
                self.pending, self.pending_ids = [], []
                self.pending_k = [None] * len(self.inv_freqs)
                self.pending_v = [None] * len(self.inv_freqs)
        return notices

    def _open_file(self, path: Path, writable: bool) -> None:
        if path.is_symlink():
            raise MemoryFileError("it is a symbolic link")
        flags = os.O_NOFOLLOW | (os.O_RDWR if writable else os.O_RDONLY)
        try:
            self.fd = os.open(path, flags)
        except PermissionError:
            if not writable:
                raise
            self.fd = os.open(path, os.O_NOFOLLOW | os.O_RDONLY)
            writable = False
        self.path, self.writable = path, writable
        head = os.pread(self.fd, FILE_HEADER, 0)
        if head[:8] != MAGIC:
            raise MemoryFileError("no memory header")
        (size,) = struct.unpack("<I", head[8:12])
        try:
            g = Geometry(**json.loads(head[12 : 12 + size]))
        except (ValueError, TypeError) as exc:
            raise MemoryFileError(f"damaged header ({exc})") from None
        if g.key != self.key or g.block != self.block or g.reps != self.reps or g.layers != len(self.inv_freqs):
            raise MemoryFileError(f"it was made by another model, quantization or KV dtype (its K/V are {g.dtype})"
                                  if g.key != self.key else "it was made for another cache geometry")
        self.geometry = g

    def _read_tokens(self, index: int, ledger: list[int]) -> list[Run] | None:
        """Block ``index``'s runs from its record, its representatives kept; None when the record
        fails its checksum or its token ids are not the ledger's."""
        found = self._section(index)
        if found is None:
            return None
        tokens, ids, positions, reps = found
        if any(not 0 <= t < len(ledger) or ledger[t] != i for t, i in zip(tokens, ids)):
            return None
        self._keep_reps(index, reps)
        return runs_of(tokens, positions)


def _raw(t: torch.Tensor) -> bytes:
    """A tensor's bytes (any dtype, bfloat16 included)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
