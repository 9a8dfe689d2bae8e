"""Weight-only quantized linears: PyTorch's packed int4 on the CPU with a 16-bit output head, and
bitsandbytes NF4 behind one op on a GPU (:class:`NF4Linear`).

Why not bitsandbytes here: bitsandbytes 0.50 has a fused 4-bit CPU kernel only for CPUs with
AVX512-BF16; elsewhere every call dequantizes the whole weight to float32 (measured on an AVX2
Zen 3: 141 ms for one token's 210 projections of SmolLM2-135M). PyTorch's own packed int4 kernel
(``torch._weight_int4pack_mm_for_cpu``, the one torchao uses), fed bf16 activations, does the same
work in 11.9 ms; fed float32 activations it takes its slow path (137 ms). So :class:`Int4Linear`
converts activations to bf16 on the way in.

The format is asymmetric min/max 4-bit per group of 32 inputs: ``w = (q - 8) * scale + zero``
with one bf16 ``(scale, zero)`` per output row and group. That is GGUF Q4_1's own block layout, so
a Q4_1 GGUF (the bundled SmolLM2) is reproduced exactly (relative error 5e-7 on a projection)
where bitsandbytes NF4 re-quantizes it (17% relative error on the final logits).

Prefill is the other way round: for a chunk of many tokens the kernel is compute-bound and slower
than dequantizing the weight to float32 once and calling the float32 GEMM (10.3 against 6.3 ms for a
256 x 576 x 1536 projection), so from :data:`DENSE_ROWS` rows on, :class:`Int4Linear` does that,
reading the packed nibbles itself (:func:`dequantize`; the packed layout is probed once per process).
On a CPU with native bf16 math the GEMM runs in bf16 instead (:func:`dense_linear`).

The output head stays 16-bit (:class:`HalfLinear`, float16): as fast as int8 with bf16 activations
on that CPU (3.8 vs 3.7 ms for 49152 x 576) and 40x closer to the float32 logits (4e-4 vs 1.6e-2
relative); a 4-bit head moves logits by 13%.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import math
import os
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .gguf import GROUP, int4_fits, native_bf16  # GROUP: GGUF's 32-weight blocks (group 128 does not divide 576)

INNER_K_TILES = 2
DENSE_ROWS = 96  # from this many rows on, dequantize and use the float32 GEMM (crossover measured ~90)


def int4_codes(weight: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min/max 4-bit per ``group`` inputs (gpt-fast's ``group_quantize_tensor``): ``weight``
    ``[N, K]`` -> (codes ``int32 [N, K]`` in 0..15, scales and zeros ``bf16 [K/group, N, 2]``) with
    ``w = (q - 8) * scale + zero``, the layout of PyTorch's int4 kernels on the CPU and on CUDA."""
    n, k = weight.shape
    wg = weight.detach().float().reshape(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = ((wg - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    zero = lo + 8 * scale  # the kernel computes (q - 8) * scale + zero
    return q, pack_scales(scale, zero)


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` ``[N, K]`` -> (packed ``uint8 [N, K/2]``, scales and zeros ``bf16 [K/32, N, 2]``)."""
    q, scales = int4_codes(weight)
    return pack_codes(q), scales


def pack_codes(codes: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """4-bit codes ``[N, K]`` (any integer dtype) -> the kernel's packed ``uint8 [N, K/2]``, a few
    thousand rows at a time (the packed layout is whole row blocks, so pieces lie end to end; an
    int32 copy of a 262144-row head at once would take a gigabyte)."""
    return torch.cat([torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes[a : a + rows].to(torch.int32),
                                                                         INNER_K_TILES)
                      for a in range(0, codes.shape[0], rows)])


def pack_scales(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Per row and group float32 ``[N, K/group]`` scales and zeros -> the kernels' ``bf16 [K/group, N, 2]``."""
    return torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)


def affine_int4(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A group-32 affine 4-bit weight as a file stores it (``w = scale * code + offset``, codes 0..15
    ``[N, K]``, float32 ``scale`` and ``offset`` ``[N, K/32]``: GGUF Q4_0, Q4_1, Q4_K) -> packed codes
    and bf16 scales, the codes as they are.

    The kernel's scale and zero are the affine map through the group's values at codes 0 and 15,
    computed in float32 as the file's dequantizer computes them, exactly as :func:`quantize_int4`
    computes them from a group that spans its codes (llama.cpp's Q4_1 quantizer always makes one
    span them): so a Q4_1 file's weights are bit for bit what re-quantizing its values gave, and
    Q4_0 and Q4_K groups that do not span their codes lose nothing. Only bf16 rounds. A step may be
    negative (Q4_0's ``d`` takes the sign of the group's largest magnitude); a zero step becomes 1e-8,
    as in :func:`quantize_int4`."""
    lo, hi = offset, scale * 15 + offset
    step = (hi - lo) / 15
    step = torch.where(step == 0, 1e-8, step)
    return pack_codes(codes), pack_scales(step, lo + 8 * step)


Layout = tuple[int, bool]  # rows per block of the packed layout; whether a byte pairs rows 2j, 2j+1


@functools.cache
def packed_layout() -> Layout | None:
    """The int4 kernel's packed layout on this CPU, or None if it is none we can read.

    The layout is an implementation detail of PyTorch's kernel, and it differs per CPU: blocks of 64
    rows on AVX-512 and 32 on AVX2, each byte holding row ``j`` and row ``j + block / 2`` of one input;
    blocks of 32 rows on CPUs with neither, each byte holding rows ``2j`` and ``2j + 1``. So it is
    probed on a known matrix, not assumed."""
    probe = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = pack_codes(probe)
    for layout in ((block, paired) for block in (16, 32, 64, 128) for paired in (False, True)):
        if torch.equal(_nibbles(packed, layout, 64).int(), probe):
            return layout
    return None


def _nibbles(packed: torch.Tensor, layout: Layout, in_features: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The packed ``uint8 [N, K/2]`` as 4-bit codes ``[N, K]`` in row order: written into ``out`` (any
    dtype) where given, else a new uint8 tensor."""
    block, paired = layout
    n = packed.shape[0]
    p = packed.view(n // block, in_features, block // 2)  # [row block, input, byte]: a byte holds two rows
    out = torch.empty(n, in_features, dtype=torch.uint8) if out is None else out
    rows = (out.view(n // block, block // 2, 2, in_features).unbind(2) if paired
            else out.view(n // block, block, in_features).split(block // 2, 1))
    rows[0].copy_(torch.bitwise_and(p, 15, out=scratch_tensor("low", p.shape, torch.uint8)).transpose(1, 2))
    rows[1].copy_(torch.bitwise_right_shift(p, 4, out=scratch_tensor("high", p.shape, torch.uint8)).transpose(1, 2))
    return out


def dequantize(packed: torch.Tensor, scales: torch.Tensor, in_features: int, layout: Layout,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed weight and ``bf16 [K/32, N, 2]`` scales and zeros -> ``[N, K]`` in ``dtype``: computed in
    float32 as exactly the kernel's ``(q - 8) * scale + zero`` (before its bf16 arithmetic), the last
    step writing ``dtype`` (one rounding, no extra pass for a bf16 copy). Inside :func:`prefill_scratch`
    the result lives in a reused buffer, valid until the next call."""
    n, k = packed.shape[0], in_features
    q = _nibbles(packed, layout, k, scratch_tensor("codes", (n, k), torch.float32))
    s = scales.float().permute(1, 0, 2)  # [N, K/32, 2]
    q = q.view(n, k // GROUP, GROUP).sub_(8).mul_(s[..., :1])
    out = q if dtype == torch.float32 else scratch_tensor("weight", q.shape, dtype)
    return torch.add(q, s[..., 1:], out=out).view(n, k)


_scratch_buffers = threading.local()


@contextlib.contextmanager
def prefill_scratch():
    """Within, :func:`dequantize` writes into buffers kept for the next call (one per role, grown to the
    largest weight), released on leaving. A prefill chunk dequantizes every projection of every layer:
    fresh multi-megabyte tensors each time cost their pages' first touch (230,000 page faults a
    512-token prefill of the bundled model, about a third of its time). Re-entrant; per thread."""
    if getattr(_scratch_buffers, "kept", None) is not None:
        yield
        return
    _scratch_buffers.kept = {}
    try:
        yield
    finally:
        _scratch_buffers.kept = None


MMAP_THRESHOLD, TRIM_THRESHOLD = 64 << 20, 128 << 20  # bytes


def keep_heap_pages() -> bool:
    """Have glibc's malloc serve blocks up to :data:`MMAP_THRESHOLD` from its heap and keep up to
    :data:`TRIM_THRESHOLD` free at the heap's top (``mallopt(3)``), for the rest of the process.

    By default glibc maps every block over 128 KiB (a threshold that adapts up to 32 MiB) as fresh
    pages and unmaps it when freed, so the megabyte activations of every prefill chunk paid their
    pages' first touch again: 95,000 page faults a 512-token prefill of the bundled model after its
    dequantized weights moved to :func:`prefill_scratch` (whose buffers cover weights of any size),
    1.15-1.29x the prompt speed without them, the same peak RSS (README, "Against llama.cpp").
    Blocks over the threshold (a model's load-time tensors) are still mapped and returned. A user's
    own ``MALLOC_*`` or ``GLIBC_TUNABLES`` setting wins; nothing happens off glibc. Returns whether set."""
    if any(k.startswith("MALLOC_") for k in os.environ) or "GLIBC_TUNABLES" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(mallopt(m_trim_threshold, TRIM_THRESHOLD))


def scratch_tensor(role: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized ``shape`` tensor: a view of ``role``'s kept buffer inside :func:`prefill_scratch`, else new."""
    kept = getattr(_scratch_buffers, "kept", None)
    if kept is None:
        return torch.empty(shape, dtype=dtype)
    numel = math.prod(shape)
    buffer = kept.get((role, dtype))
    if buffer is None or buffer.numel() < numel:
        buffer = kept[role, dtype] = torch.empty(numel, dtype=dtype)
    return buffer[:numel].view(shape)


@functools.cache
def prefill_dtype() -> torch.dtype:
    """The dtype of a prefill chunk's GEMM on a dequantized weight (:func:`dense_linear`): bf16 where the
    CPU computes bf16 in hardware (AVX512-BF16 or AMX: 1.4-2.2x the float32 GEMM at 512 rows, README
    "Against llama.cpp"), float32 elsewhere (where bf16 is emulated, slower than float32)."""
    return torch.bfloat16 if native_bf16() else torch.float32


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A prefill chunk ``x`` ``[n, K]`` times a dequantized ``weight`` ``[N, K]`` in
    :func:`prefill_dtype` (plus a float32 ``bias``) -> float32 ``[n, N]``. bf16 rounds the inputs as
    the int4 kernel of a decode step does (its activations are bf16 too); the products accumulate in
    float32 either way."""
    if weight.dtype == torch.float32:
        return F.linear(x.float(), weight, bias)
    y = F.linear(x.to(weight.dtype), weight).float()
    return y if bias is None else y + bias


class Int4Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` packed 4-bit (see the module docstring); any leading shape, any
    float dtype in and out (bf16 inside the kernel). ``bias`` stays float32."""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, in_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, packed.shape[0]
        self.layout = packed_layout()  # probed once, here: a call inside forward would be traced by torch.compile
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float(), persistent=False)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    packs: "Packs | None" = None, name: str = "") -> "Int4Linear":
        """Quantize ``weight`` ``[N, K]``, or take its packed form from ``packs`` (saved by an earlier start)."""
        packed, scales = packs.get(name, weight) if packs is not None else quantize_int4(weight)
        return cls(packed, scales, bias, weight.shape[1])

    def rows(self, start: int, end: int) -> "Int4Linear":
        """Output rows ``start:end`` sharing this one's packed weight (a fused qkv's q, k and v).

        Row blocks of the packed layout are contiguous; the scales are not, and the kernel silently
        misreads strided scales, so they are copied on first use (the fast path never uses these).
        Rows that do not start and end on a block of the layout (64 rows on AVX512, 32 on AVX2: a
        tiny model's k and v) are packed again from the same 4-bit codes, a copy.
        """
        bias = None if self.bias is None else self.bias[start:end]
        if self._whole_blocks() and (start % self.layout[0] or (end - start) % self.layout[0]):
            codes = _nibbles(self.packed, self.layout, self.in_features)[start:end]
            return Int4Linear(pack_codes(codes), self.scales[:, start:end].contiguous(), bias, self.in_features)
        return Int4Linear(self.packed[start:end], self.scales[:, start:end], bias, self.in_features)

    def _whole_blocks(self) -> bool:
        """Whether this weight is whole blocks of a layout sinkchat can read."""
        return self.layout is not None and self.out_features % self.layout[0] == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.scales.is_contiguous():
            self.scales = self.scales.contiguous()
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] >= DENSE_ROWS and self._whole_blocks():  # prefill: see module doc
            weight = dequantize(self.packed, self.scales, self.in_features, self.layout, prefill_dtype())
            y = dense_linear(flat, weight, self.bias).to(x.dtype)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.to(torch.bfloat16), self.packed, GROUP, self.scales)
            y = y.to(x.dtype) if self.bias is None else (y.float() + self.bias).to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 g{GROUP}"


class Packs:
    """One model's packed 4-bit weights, kept in a safetensors file so that later starts skip
    quantizing (most of the CPU load time after the weights are read).

    The file is named by the weights it came from and by what decides the packed layout (PyTorch's
    version, the CPU's kernel flavour, :func:`packed_layout`), so any change makes a new file. A file
    that cannot be read is ignored, and one that cannot be written only costs the next start its time.
    """

    VERSION = 1

    def __init__(self, path: Path | None):
        self.path, self.found, self.new = path, {}, {}
        if path is not None and path.is_file() and not path.is_symlink():
            try:
                from safetensors.torch import load_file

                self.found = load_file(path)
            except Exception:  # damaged or foreign: quantize again and overwrite it
                self.found = {}

    @staticmethod
    def key(files: list[Path]) -> str:
        """What names the file: the weight files (path, size, time), torch and the packed layout."""
        digest = hashlib.sha256(f"v{Packs.VERSION}|{torch.__version__}|{packed_layout()}|"
                                f"{torch.backends.cpu.get_cpu_capability()}".encode())
        for f in sorted(files):
            st = f.stat()
            digest.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        return digest.hexdigest()[:24]

    def get(self, name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``weight`` ``[N, K]`` quantized (:func:`quantize_int4`), or as kept under ``name``."""
        return self.cached(name, weight.shape, lambda: quantize_int4(weight))

    def cached(self, name: str, shape: tuple[int, int], make) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed weight and scales of an ``[N, K]`` weight kept under ``name``, or ``make()``'s
        (then kept for the next start): also a GGUF's blocks packed from their codes (:mod:`.blockkernels`)."""
        n, k = shape
        packed, scales = self.found.get(f"{name}.packed"), self.found.get(f"{name}.scales")
        if packed is None or scales is None or packed.shape != (n, k // 2) or scales.shape != (k // GROUP, n, 2):
            packed, scales = make()
            self.new[f"{name}.packed"], self.new[f"{name}.scales"] = packed, scales
        return packed, scales

    def save(self) -> None:
        """Write the file if anything was quantized in this start (atomically; failures are silent)."""
        if not self.new or self.path is None:
            return
        from safetensors.torch import save

        from ..files import write_atomic

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, save({**self.found, **self.new}))
        except OSError:
            pass


def cat_bias(modules: list[nn.Module], dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The biases of linears fused side by side, end to end (zeros for one without), or None when
    none has one (Qwen2's q/k/v have them, its o and MLP do not)."""
    biases = [m.bias for m in modules]
    if all(b is None for b in biases):
        return None
    return torch.cat([b.detach() if b is not None else torch.zeros(m.out_features, dtype=dtype, device=device)
                      for b, m in zip(biases, modules)])


class HalfLinear(nn.Module):
    """A 16-bit (``dtype``) view or copy of a linear layer, any float dtype in and out: the output head
    (float16 on the CPU; the model's own bf16/fp16 weight, not copied, on a GPU), and a GGUF's
    tensors that no integer kernel here holds exactly (:mod:`.blockkernels`). ``bias`` stays float32."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype = torch.float16, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight.detach().to(dtype).contiguous(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float(), persistent=False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def rows(self, start: int, end: int) -> "HalfLinear":
        """Output rows ``start:end``, a view of this one's weight."""
        return HalfLinear(self.weight[start:end], self.weight.dtype,
                          None if self.bias is None else self.bias[start:end])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(self.weight.dtype), self.weight)
        return y.to(x.dtype) if self.bias is None else (y.float() + self.bias).to(x.dtype)


class NF4Linear(nn.Module):
    """bitsandbytes' 4-bit weight (NF4 or FP4, QLoRA's blockwise format: one float32 absmax per
    ``blocksize`` weights, row-major) with a forward that is one ``bitsandbytes::gemm_4bit`` op.

    Why not bnb's own ``Linear4bit``: its forward runs Python checks and rewrites state on the way
    (``fix_4bit_weight_quant_state_from_module``, compute-type guessing), which breaks the graph that
    ``torch.compile`` captures for CUDA graphs; the op itself has a fake kernel, so inductor takes it
    whole. Since every row is whole blocks (``in_features % blocksize == 0``), the packed bytes and
    absmax of q, k and v laid end to end are exactly the fused weight's: :meth:`fuse` concatenates
    without re-quantizing, and :meth:`rows` gives each part back as views (one copy in memory).

    ``data`` ``uint8 [N K / 2, 1]``, ``absmax`` ``float32 [N K / blocksize]``; input any float dtype
    ``[..., K]``, computed in ``compute_dtype``, returned in the input's dtype ``[..., N]``.
    """

    def __init__(self, data: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int], blocksize: int,
                 quant_type: str, compute_dtype: torch.dtype, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = shape
        self.blocksize, self.quant_type, self.compute_dtype = blocksize, quant_type, compute_dtype
        self.register_buffer("data", data, persistent=False)
        self.register_buffer("absmax", absmax, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().to(compute_dtype), persistent=False)

    @staticmethod
    def fits(module: nn.Module) -> bool:
        """Whether ``module`` is a bitsandbytes 4-bit linear whose rows are whole blocks, packed in bytes
        (not another ``quant_storage`` dtype, whose elements hold several weights each)."""
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        return (state is not None and weight.dtype == torch.uint8 and len(state.shape) == 2
                and state.shape[1] % state.blocksize == 0)

    @classmethod
    def fuse(cls, modules: list[nn.Module]) -> "NF4Linear":
        """One linear computing ``modules`` (bitsandbytes 4-bit linears with the same input, all
        :meth:`fits`) side by side, read in bnb's standard layout (:func:`nf4_standard`)."""
        states = [m.weight.quant_state for m in modules]
        first = states[0]
        data, absmax = zip(*(nf4_standard(m.weight.data, state) for m, state in zip(modules, states)))
        data = torch.cat(data)[:, None]
        rows = sum(state.shape[0] for state in states)
        compute = getattr(modules[0], "compute_dtype", None) or first.dtype
        return cls(data, torch.cat(absmax), (rows, first.shape[1]), first.blocksize, first.quant_type, compute,
                   cat_bias(modules, first.dtype, data.device))

    def rows(self, start: int, end: int) -> "NF4Linear":
        """Output rows ``start:end`` as views of this one's packed bytes and absmax."""
        k = self.in_features
        bias = None if self.bias is None else self.bias[start:end]
        return NF4Linear(self.data[start * k // 2 : end * k // 2], self.absmax[start * k // self.blocksize :
                         end * k // self.blocksize], (end - start, k), self.blocksize, self.quant_type,
                         self.compute_dtype, bias)

    def dequantize(self) -> torch.Tensor:
        """The weight this linear computes with, float32 ``[N, K]`` (bitsandbytes' own dequantizer)."""
        return torch.ops.bitsandbytes.dequantize_4bit.default(
            self.data, self.absmax, self.blocksize, self.quant_type, [self.out_features, self.in_features],
            torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.bitsandbytes.gemm_4bit.default(
            x.to(self.compute_dtype), self.data, [self.out_features, self.in_features], self.absmax,
            self.blocksize, self.quant_type, bias=self.bias)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.quant_type} b{self.blocksize}"


CPU_BLOCK_N = 32  # rows per block of bitsandbytes' AVX512-BF16 CPU layout (its _convert_weight_packed_for_cpu)


def nf4_standard(data: torch.Tensor, state) -> tuple[torch.Tensor, torch.Tensor]:
    """A bitsandbytes 4-bit weight in its standard (CUDA) layout: packed bytes ``uint8 [N K / 2]`` (two
    row-major codes a byte, the first in the high nibble) and float32 absmax ``[N K / blocksize]``.

    bitsandbytes 0.50 rewrites a weight in place at its first forward on a CPU with AVX512-BF16
    (``quant_state.packing_format_for_cpu``): codes tiled in blocks of 32 rows, absmax transposed to
    ``[K / blocksize, N]`` bf16, a nested absmax expanded. That is undone here, exactly: the result
    holds the values the module computes with. A double-quantized absmax is expanded to float32.
    """
    n, k = state.shape
    data = data.reshape(-1).view(torch.uint8)
    if getattr(state, "packing_format_for_cpu", False):
        tiles = data.view(-1, CPU_BLOCK_N)  # per (row block, input pair): 32 low nibbles, then 32 high
        codes = torch.cat([tiles & 0xF, tiles >> 4], -1).view(n // CPU_BLOCK_N, k // 2, CPU_BLOCK_N, 2)
        codes = codes.transpose(1, 2).reshape(-1, 2)  # row-major, input pairs
        return (codes[:, 0] << 4) | codes[:, 1], state.absmax.float().t().reshape(-1)
    absmax = state.absmax
    if state.nested:
        import bitsandbytes.functional as bnbf

        absmax = bnbf.dequantize_blockwise(absmax, state.state2) + state.offset
    return data, absmax.float().reshape(-1)


def int4_modules(model, packs: Packs | None = None) -> int:
    """Replace every ``nn.Linear`` of ``model``'s decoder layers that fits the kernel by an
    :class:`Int4Linear` (any architecture: the transformers path on the CPU), and a bias-free output
    head by a :class:`HalfLinear` (the input embeddings keep their own table). Returns how many
    linears were replaced."""
    count = 0
    for i, layer in enumerate(decoder_layers(model)):
        for path, parent in list(layer.named_modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear and int4_fits(child.out_features, child.in_features):
                    key = ".".join(filter(None, (str(i), path, name)))
                    setattr(parent, name, Int4Linear.from_weight(child.weight, child.bias, packs, key))
                    count += 1
    head = model.get_output_embeddings()
    if type(head) is nn.Linear and head.bias is None:
        model.set_output_embeddings(HalfLinear(head.weight))
    return count


def decoder_layers(model) -> list[nn.Module]:
    """The decoder layers of a transformers causal LM (``model.model.layers``), or none."""
    return list(getattr(getattr(model, "model", model), "layers", None) or [])
