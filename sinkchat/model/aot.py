"""The CPU's compiled decode layer: :meth:`~.fast.Layer.forward` exported by ``torch.export`` with the
layer's weights as inputs and compiled ahead of time by AOTInductor into a package kept on disk. Every
layer of one kind (same modules, same shapes) runs through the same package, called straight from
Python with a list of tensors.

Why not ``torch.compile`` of the layer, which built the same kernels: each of its 30 calls a step went
through dynamo's guards and AOTAutograd's runtime wrappers, about 90 us a layer on the bundled model.
The package's own C++ runner skips all of that: 11.8 against 14.7 ms a step, alternating in one
process, 2 threads, 2004 slots (README, "Against llama.cpp"). The package also loads in milliseconds at
the next start, where the regional compile read inductor's cache for 2-4 s.

A package is named by everything that decides its code (:func:`_digest`): the layer's modules and
tensor shapes, the cache's shape and dtype, PyTorch's version, the CPU's kernel flavour, the thread
count inductor writes into its parallel loops, and the source of the modules traced. A damaged or
foreign file, or a symlink in its place, is compiled again and replaced; a cache dir that cannot be
written only costs the next start the compile. A package no start has read for :data:`STALE_DAYS`
(left by an older PyTorch or sinkchat, another window size) is removed at the next compile.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from .. import config as _config
from ..files import alive

INPUTS = ("x", "keys", "values", "slot", "mask", "cos", "sin")  # Layer.forward's arguments, in order
STALE_DAYS = 30  # a package unused this long is removed at the next compile
SOURCES = ("aot.py", "fast.py", "quant.py", "blockkernels.py")  # what exports and runs a layer (read, not imported)


class CompiledLayers:
    """The ``layer_step`` of :class:`~.fast.FastModel` on the CPU: ``self(layer, x, keys, values, slot,
    mask, cos, sin)`` computes ``Layer.forward`` with the same arguments (the new key and value written
    into ``keys``/``values`` in place) through the package of that layer's kind and cache shape,
    compiled or read from ``folder`` on first use (``None``: the cache dir's ``aoti``); ``setup()`` runs
    before the first compile (where inductor keeps its kernels).

    :attr:`compiled` counts the packages compiled in this process (not read from disk), :attr:`kept`
    those of them saved in ``folder`` for the next start."""

    def __init__(self, folder: Path | None = None, setup=None):
        self.folder = folder if folder is not None else _config.cache_dir() / "aoti"
        self.setup = setup
        self.layers: dict[int, tuple[str, list[torch.Tensor]]] = {}  # id(layer) -> (kind, its tensors)
        self.runs: dict[tuple, object] = {}  # (kind, cache shape, dtype) -> the package's boxed_run
        self.compiled = self.kept = 0

    def __call__(self, layer, x, keys, values, slot, mask, cos, sin) -> torch.Tensor:
        entry = self.layers.get(id(layer))
        if entry is None:
            entry = self.layers[id(layer)] = _kind(layer), list(_tensors(layer).values())
        kind, tensors = entry
        key = (kind, keys.shape, keys.dtype, values.dtype, mask.shape)
        run = self.runs.get(key)
        args = [x, keys, values, slot, mask, cos, sin]
        if run is None:
            run = self.runs[key] = self._load(layer, kind, args)
        return run([*args, *tensors])[0]

    def _load(self, layer, kind: str, args: list[torch.Tensor]):
        """The package for ``layer`` with ``args``' shapes: read from disk, else compiled and kept."""
        path = self.folder / f"{_digest(kind, args)}.pt2"
        if path.is_file() and not path.is_symlink():
            try:
                run = _open(path)
            except Exception:  # damaged or foreign: compiled again below
                pass
            else:
                with contextlib.suppress(OSError):  # its modification time says when a start last used it
                    os.utime(path)
                return run
        import torch._inductor  # compiling: inductor and dynamo are imported now, not at every start

        if self.setup is not None:
            self.setup()
            self.setup = None

        with _quiet(), torch.inference_mode(False):
            program = _export(layer, args)
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                _sweep(self.folder)
                fd, tmp = tempfile.mkstemp(prefix=f"{os.getpid()}.part.", suffix=".pt2", dir=self.folder)
                os.close(fd)
                keep = True
            except OSError:  # read-only or full: a private temporary file, compiled again next start
                fd, tmp = tempfile.mkstemp(suffix=".pt2")
                os.close(fd)
                keep = False
            try:
                torch._inductor.aoti_compile_and_package(program, package_path=tmp)
                run = _open(Path(tmp))
                if keep:
                    with contextlib.suppress(OSError):  # a folder or such in its place: compiled again next start
                        os.replace(tmp, path)
                        self.kept += 1
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        self.compiled += 1
        return run


def _sweep(folder: Path) -> None:
    """Remove the part-written packages (``PID.part.*.pt2``) of compiles whose process is gone (killed
    while compiling; another process's compile in progress keeps its own), and the packages no start
    has used for :data:`STALE_DAYS`."""
    stale = time.time() - STALE_DAYS * 86400
    for package in folder.glob("*.pt2"):
        with contextlib.suppress(OSError):
            if ".part." not in package.name and package.lstat().st_mtime < stale:
                package.unlink()
    for part in folder.glob("*.part.*.pt2"):
        pid = part.name.split(".", 1)[0]
        if pid.isascii() and pid.isdigit() and not alive(int(pid)):  # not ours, or alive: left alone
            with contextlib.suppress(OSError):
                part.unlink()


def _open(path: Path):
    """The ``boxed_run`` of the package at ``path``: AOTInductor's C++ loader, as
    ``torch._inductor.aoti_load_package`` calls it, without importing inductor (1.1 s of a start that
    finds its package on disk). Each call takes a list of tensors, the layer's output in a list.

    The loader unpacks the package into a folder of ``TMPDIR`` that it removes only when it is
    destroyed, which a process's exit does not do: every start left 1.8 MB in /tmp. It unpacks into a
    folder of ours instead, removed as soon as the library is loaded (mapped, it outlives its file)."""
    with tempfile.TemporaryDirectory(prefix="sinkchat-aoti-") as scratch:
        before = os.environ.get("TMPDIR")
        os.environ["TMPDIR"] = scratch
        try:
            loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
        finally:
            if before is None:
                del os.environ["TMPDIR"]
            else:
                os.environ["TMPDIR"] = before
    return loader.boxed_run


def _tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """The layer's weights, norms and biases by name (each tensor once): the package's inputs after
    :data:`INPUTS`, so that one package serves every layer of a kind."""
    return dict(layer.named_parameters()) | dict(layer.named_buffers())


def _kind(layer: nn.Module) -> str:
    """What makes two layers one graph: their modules (each one's repr: type, sizes, kernel) and the
    shape, dtype and strides of each of their tensors, and the shared dimensions."""
    d = layer.dims
    act = getattr(d.act, "__name__", type(d.act).__name__)
    dims = (d.heads, d.kv_heads, d.head_dim, d.eps, d.scale, d.inter, act)
    shapes = [(n, tuple(t.shape), str(t.dtype), t.stride()) for n, t in _tensors(layer).items()]
    return f"{layer!r}|{dims}|{shapes}"


def _digest(kind: str, args: list[torch.Tensor]) -> str:
    """The package's name: :func:`_kind`, the shapes of ``args``, and what else decides the code: the
    versions, the CPU (inductor builds for this one's instruction set, ``-march=native``: another CPU
    sharing the cache dir compiles its own rather than meeting an illegal instruction), the thread
    count, and the source of the modules that export and run a layer."""
    h = hashlib.sha256()
    for part in (kind, [(tuple(a.shape), str(a.dtype), a.stride()) for a in args], torch.__version__, __version__,
                 _cpu(), torch.get_num_threads()):
        h.update(repr(part).encode())
    for name in SOURCES:
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()[:24]


def _cpu() -> tuple:
    """This CPU as inductor compiles for it: its architecture, torch's kernel flavour and every
    instruction-set feature torch reports (``torch.cpu.get_capabilities``, where torch has it)."""
    features = getattr(torch.cpu, "get_capabilities", lambda: {})()
    return (platform.machine(), torch.backends.cpu.get_cpu_capability(),
            sorted(k for k, v in features.items() if v is True))


class _Call(nn.Module):
    """``Layer.forward`` with the layer's tensors as arguments (what ``torch.export`` exports)."""

    def __init__(self, layer: nn.Module, names: list[str]):
        super().__init__()
        self.layer, self.names = layer, names

    def forward(self, x, keys, values, slot, mask, cos, sin, *tensors):
        weights = dict(zip(self.names, tensors))
        return torch.func.functional_call(self.layer, weights, (x, keys, values, slot, mask, cos, sin))


def _export(layer: nn.Module, args: list[torch.Tensor]):
    """The exported program of ``layer``'s decode step for ``args``' shapes. The cache buffers are
    stood in for by fresh tensors of the same layout (the cache's own were made under inference mode,
    which ``torch.export`` may not write into, and nothing is written to them here)."""
    tensors = _tensors(layer)
    stand_in = [torch.empty_strided(a.shape, a.stride(), dtype=a.dtype) if i in (1, 2) else a.clone()
                for i, a in enumerate(args)]
    return torch.export.export(_Call(layer, list(tensors)), (*stand_in, *tensors.values()), strict=False)


@contextlib.contextmanager
def _quiet():
    """Library chatter while exporting and compiling (deprecation notes) stays off the terminal."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
