"""A GGUF file's tensors as they are stored: each tensor's block type, and the integer codes, group
scales and offsets its blocks hold, so that kernels run on the file's own values
(:mod:`.blockkernels`) instead of floats quantized a second time.

Every block type sinkchat maps is affine per group of weights: ``w = scale * code + offset`` with
unsigned ``code < 2**bits`` (:class:`Affine`). The layouts are those of gguf-py's ``gguf/quants.py``
(the Python mirror of llama.cpp's ``ggml-quants.c``), read the same way and checked against its own
dequantizers in ``tests/test_gguf.py``. Other types (F16, BF16, F32, Q2_K, Q3_K, the IQ codebooks) have
no such form here and run from their dequantized values. It also holds the table of which CPU kernel
serves which block type (:func:`kernel_for`), which ``sinkchat models`` shows without loading a model.

No torch at import (the kernel table imports it only to ask the CPU's capability).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SinkchatError
from . import header

# block type -> (bits per code, weights per scale/offset group)
AFFINE = {"Q4_0": (4, 32), "Q4_1": (4, 32), "Q4_K": (4, 32), "Q5_0": (5, 32), "Q5_1": (5, 32),
          "Q5_K": (5, 32), "Q6_K": (6, 16), "Q8_0": (8, 32)}
FLOAT = {"F32": 32, "F16": 16, "BF16": 16}
FOUR = ("Q4_0", "Q4_1", "Q4_K")  # affine int4 in groups of 32: the packed int4 layout, codes as they are
EIGHT = ("Q5_0", "Q5_1", "Q5_K", "Q8_0")  # 5 or 8 bits in groups of 32: two int4 planes, or float16
GROUP = 32  # inputs per scale and zero of the CPU's packed int4 kernel (GGUF's 32-weight blocks)
LABEL = {"int4": "int4 g32", "int8": "int8 g32", "fp16": "fp16", "fp32": "fp32"}  # kernel -> what users read


def int4_fits(out_features: int, in_features: int) -> bool:
    """The packed int4 kernel needs ``out_features`` divisible by 16 and ``in_features`` by the group size."""
    return out_features % 16 == 0 and in_features % GROUP == 0


def int4_is_fast() -> bool:
    """Whether PyTorch's packed int4 kernel runs with AVX-512 on this CPU (``ATEN_CPU_CAPABILITY`` can
    force another); elsewhere it is twice as slow, as slow as float16 (README, "Which kernel runs
    where"). Imports torch."""
    import torch

    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def native_bf16() -> bool:
    """Whether this CPU computes in bf16 in hardware (AVX512-BF16 or AMX-BF16), as torch reports it
    (``torch.cpu.get_capabilities()``, from cpuinfo); False where this torch cannot say."""
    import torch

    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is None:
        return False
    found = capabilities()
    return bool(found.get("avx512_bf16") or found.get("amx_bf16"))


def eight_bit_kernel() -> str:
    """The kernel for 5- and 8-bit blocks on this CPU: the int8 planes where PyTorch's int4 kernel runs
    with AVX-512, float16 elsewhere, where that kernel is twice as slow and float16 as fast as before
    (README, "Which kernel runs where"). ``SINKCHAT_EIGHT_BIT=int8|fp16`` overrides it (to compare
    them, or where another CPU measures otherwise). Imports torch, for the capability
    ``ATEN_CPU_CAPABILITY`` sets."""
    import os

    forced = os.environ.get("SINKCHAT_EIGHT_BIT")
    if forced in ("int8", "fp16"):
        return forced
    return "int8" if int4_is_fast() else "fp16"


def kernel_for(block_type: str, shape: tuple[int, int], quant: str = "auto", head: bool = False,
               eight: str | None = None) -> str:
    """The CPU kernel a tensor of ``block_type`` and ``[out, in]`` ``shape`` runs on
    (:mod:`.blockkernels`): ``int4``, ``int8`` (two int4 planes), ``fp16`` or ``fp32``; ``eight``: the
    kernel for 5- and 8-bit blocks [default: :func:`eight_bit_kernel`].

    ``auto`` keeps the file's precision; ``4bit`` asks for 4 bits everywhere but the output head
    (what has more is re-quantized, as for a float checkpoint). A head of more than 4 bits stays
    float16, as it always was: that keeps the bundled Q4_1 model's logits bit for bit (its head is
    Q8_0), at a cost measured in the README (the int8 planes ran a 262144-row head ~10% faster)."""
    fits = int4_fits(*shape)
    if block_type == "F32" and not head:
        return "fp32"
    if fits and (block_type in FOUR or quant == "4bit" and not head):
        return "int4"
    if fits and block_type in EIGHT and not head:
        return eight or eight_bit_kernel()
    return "fp16"


def label(file_type: str, kernels: dict[str, int]) -> str:
    """What runs, for the header and ``sinkchat models``: ``gguf Q4_K_M -> int4 g32 + int8 g32 + fp16``
    from the number of tensors per kernel."""
    used = [LABEL[k] for k in LABEL if kernels.get(k)]
    return f"gguf {file_type} -> " + (" + ".join(used) or "fp32")


@dataclass
class Affine:
    """One tensor's weights as ``scale * code + offset``: ``codes`` uint8 ``[N, K]``, ``scale`` and
    ``offset`` float32 ``[N, K / group]``. ``scale`` and ``offset`` are exact in float32 (products
    of the file's float16 factors and small integers), so nothing is rounded yet."""

    codes: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    group: int
    bits: int


@dataclass(frozen=True)
class Stored:
    """One tensor as the file holds it: its block type, ``[rows, columns]`` and raw bytes per row."""

    name: str
    type: str
    shape: tuple[int, int]
    raw: np.ndarray  # uint8 [rows, bytes per row], memory-mapped


class GGUFFile:
    """An opened GGUF file (memory-mapped): its architecture, metadata, and tensors by name.

    The header is parsed by :mod:`.header` (not gguf-py's ``GGUFReader``, which turns every entry of
    the vocabulary into numpy views: 4-12 s for a 49152-token vocabulary on these 2 cores): only
    scalar metadata is kept, and a damaged or truncated file is one :class:`SinkchatError`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.fields, self.tensors = _read(self.path)
        except Exception as exc:  # a truncated file, a count beyond it, a name that is not UTF-8, ...
            why = str(exc) if isinstance(exc, (SinkchatError, header.HeaderError)) else f"{type(exc).__name__}: {exc}"
            raise SinkchatError(f"cannot read GGUF file {self.path}: {why}".splitlines()[0]) from None
        self.arch = str(self.fields.get("general.architecture", ""))

    @property
    def file_type(self) -> str:
        """The quantization the file says it is (``Q4_K_M``), or its types if it does not say."""
        from gguf.constants import LlamaFileType

        try:
            return LlamaFileType(int(self.fields["general.file_type"])).name.removeprefix("MOSTLY_")\
                .removeprefix("ALL_")
        except (KeyError, ValueError, TypeError):
            return "+".join(sorted({t.type for t in self.tensors.values() if len(t.shape) == 2}))

    def types(self) -> dict[str, int]:
        """How many 2-d tensors of each block type the file holds."""
        out: dict[str, int] = {}
        for t in self.tensors.values():
            if len(t.shape) == 2:
                out[t.type] = out.get(t.type, 0) + 1
        return dict(sorted(out.items()))

    def names(self, modules: list[str], layers: int) -> dict[str, str]:
        """Module names of a transformers model (``model.layers.0.self_attn.q_proj``, ``lm_head``) ->
        the file's tensor names (``blk.0.attn_q.weight``), through gguf-py's own name map (as
        transformers' GGUF loader does); modules without a tensor in the file are left out."""
        import gguf

        arch = next((a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == self.arch), None)
        if arch is None:
            return {}
        table = gguf.get_tensor_name_map(arch, layers)
        out = {}
        for module in modules:
            name = table.get_name(module)
            if name is not None and f"{name}.weight" in self.tensors:
                out[module] = f"{name}.weight"
        return out

    @staticmethod
    def bits(block_type: str) -> float:
        """Bits per weight of a block type's codes (the K-quants below 4 and the IQ codebooks count as 4)."""
        return AFFINE[block_type][0] if block_type in AFFINE else FLOAT.get(block_type, 4)

    def head(self) -> str | None:
        """The tensor the output head reads: ``output.weight``, or the embeddings when they are tied."""
        return next((n for n in ("output.weight", "token_embd.weight") if n in self.tensors), None)

    def plan(self, quant: str = "auto") -> dict[str, int]:
        """How many of the file's matrices (the head included, the input embeddings not) would run on
        each kernel of :func:`kernel_for`; what :func:`sinkchat.model.blockkernels.apply` does to a model
        whose linears are those matrices."""
        head = self.head()
        out: dict[str, int] = {}
        for t in self.tensors.values():
            if len(t.shape) == 2 and (t.name != "token_embd.weight" or t.name == head):
                kernel = kernel_for(t.type, t.shape, quant, t.name == head)
                out[kernel] = out.get(kernel, 0) + 1
        return out

    def describe(self, quant: str = "auto") -> str:
        """What runs on the CPU: ``gguf Q4_K_M -> int4 g32 + int8 g32 + fp16`` (:meth:`plan`)."""
        return label(self.file_type, self.plan(quant))

    def affine(self, name: str) -> Affine:
        """The codes, scales and offsets of tensor ``name`` (a type of :data:`AFFINE`), rows in
        transformers' order (:meth:`row_order`)."""
        t = self.tensors[name]
        bits, group = AFFINE[t.type]
        n, k = t.shape
        blocks = np.ascontiguousarray(t.raw).reshape(-1, _block_bytes(t.type))
        codes, scale, offset = _DECODE[t.type](blocks)
        out = Affine(codes.reshape(n, k), scale.reshape(n, k // group), offset.reshape(n, k // group), group, bits)
        order = self.row_order(name, n)
        if order is not None:
            out = Affine(out.codes[order], out.scale[order], out.offset[order], group, bits)
        return out

    def dequantized(self, name: str) -> np.ndarray:
        """Tensor ``name`` as float32 ``[rows, columns]`` by gguf-py's own dequantizer (rows in
        transformers' order): what a converted folder holds."""
        from gguf import GGMLQuantizationType, dequantize

        t = self.tensors[name]
        values = dequantize(np.asarray(t.raw), GGMLQuantizationType[t.type]).reshape(t.shape)
        order = self.row_order(name, t.shape[0])
        return values if order is None else values[order]

    def row_order(self, name: str, rows: int) -> np.ndarray | None:
        """Llama GGUFs store q and k with each head's rotary halves interleaved (llama.cpp's converter
        permutes them); transformers' loader undoes that (``LlamaTensorProcessor``), so codes read
        here follow the same row permutation. None: rows as stored."""
        if self.arch != "llama" or not (".attn_q." in name or ".attn_k." in name):
            return None
        heads = self.fields.get("llama.attention.head_count")
        if ".attn_k." in name:
            heads = self.fields.get("llama.attention.head_count_kv", heads)
        if not isinstance(heads, int) or heads <= 0 or rows % (2 * heads):
            raise SinkchatError(f"{self.path}: {name} has {rows} rows, not whole heads of {heads}")
        dim = rows // heads // 2
        return np.arange(rows).reshape(heads, dim, 2).swapaxes(2, 1).reshape(-1)


def _read(path: Path) -> tuple[dict, dict[str, "Stored"]]:
    """The metadata and tensors of a GGUF file (:func:`.header.read_all`), each tensor's bytes a
    memory-mapped view."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    fields, infos, data = header.read_all(path)
    tensors = {}
    for info in infos:
        name, dims = info.name, info.dims
        try:
            qtype = GGMLQuantizationType(info.type_id)
        except ValueError:
            raise SinkchatError(f"tensor {name} has an unknown block type {info.type_id}") from None
        block, size = GGML_QUANT_SIZES[qtype]
        if not dims or dims[0] % block:
            raise SinkchatError(f"tensor {name}: {dims[0] if dims else 0} columns are not whole {qtype.name} blocks")
        rows = math.prod(dims[1:])
        n = rows * (dims[0] // block) * size
        if info.start + n > len(data):
            raise SinkchatError(header.CUT)
        raw = np.frombuffer(data, np.uint8, n, info.start).reshape(rows, -1)
        shape = (rows, dims[0]) if len(dims) == 2 else tuple(reversed(dims))
        tensors[name] = Stored(name, qtype.name, shape, raw)
    return fields, tensors


def _block_bytes(type_name: str) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name]][1]


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte ``at`` of each block, as float32 ``[blocks, 1]``."""
    return np.ascontiguousarray(blocks[:, at : at + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, span: int) -> np.ndarray:
    """Low nibbles of each ``span`` bytes, then their high nibbles: ``[blocks, 2 * bytes]`` (the
    element order of Q4_0/Q4_1/Q5 (span 16), Q4_K/Q5_K (32) and Q6_K (64))."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, span) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(n, -1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: bit ``j`` of the little-endian uint32 ``qh`` is the fifth bit of element ``j``."""
    bits = qh.copy().view(np.uint32).reshape(-1, 1) >> np.arange(32, dtype=np.uint32)
    return (bits & 1).astype(np.uint8)


def _q4_0(b):
    d = _f16(b, 0)
    return _nibbles(b[:, 2:], 16), d, -8 * d


def _q4_1(b):
    return _nibbles(b[:, 4:], 16), _f16(b, 0), _f16(b, 2)


def _q5_0(b):
    d = _f16(b, 0)
    return _nibbles(b[:, 6:], 16) | (_high_bits(b[:, 2:6]) << 4), d, -16 * d


def _q5_1(b):
    return _nibbles(b[:, 8:], 16) | (_high_bits(b[:, 4:8]) << 4), _f16(b, 0), _f16(b, 2)


def _q8_0(b):
    d = _f16(b, 0)
    return (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8), d, -128 * d


def _k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K super-blocks: per sub-block of 32, ``scale = d * sc`` and ``offset = -dmin * m``
    ``[blocks, 8]`` from the 12 bytes of 6-bit ``sc`` and ``m`` (gguf-py's ``Q4_K.get_scale_min``)."""
    d, dmin = _f16(b, 0), _f16(b, 2)
    s = b[:, 4:16].reshape(-1, 3, 4)
    lo, mid, hi = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)], -1)
    m = np.concatenate([mid & 0x3F, (hi >> 4) | ((mid >> 2) & 0x30)], -1)
    return d * sc.astype(np.float32), -(dmin * m.astype(np.float32))


def _q4_k(b):
    scale, offset = _k_scales(b)
    return _nibbles(b[:, 16:], 32), scale, offset


def _q5_k(b):
    scale, offset = _k_scales(b)
    qh = b[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    return _nibbles(b[:, 48:], 32) | ((qh & 1).reshape(len(b), -1) << 4), scale, offset


def _q6_k(b):
    n = len(b)
    low = _nibbles(b[:, :128], 64)  # [n, 256]
    qh = b[:, 128:192].reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    codes = low | ((qh & 3).reshape(n, -1) << 4)
    scale = _f16(b, 208) * b[:, 192:208].view(np.int8).astype(np.float32)  # [n, 16]: one per 16 weights
    return codes, scale, -32 * scale


_DECODE = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0, "Q4_K": _q4_k,
           "Q5_K": _q5_k, "Q6_K": _q6_k}
