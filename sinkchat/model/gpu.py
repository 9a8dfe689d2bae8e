"""4-bit weights on a CUDA GPU, and which kernel runs them (``--quant 4bit``, ``int4``, ``nf4``).

Kernels, each built from a dense weight by :data:`KERNELS` into a module with ``forward`` and ``rows``:

- ``tinygemm``: PyTorch's own int4 kernel, ``torch.ops.aten._weight_int4pack_mm`` (gpt-fast's
  ``WeightOnlyInt4Linear``; torchao's tensor-core tiled layout is the same op). Asymmetric 4-bit per
  group of :data:`GROUP` inputs, ``w = (q - 8) * scale + zero``, bf16 scales and zeros ``[K/G, N, 2]``;
  codes two a byte ``uint8 [N, K/2]`` (even input in the high nibble), tiled for the tensor cores by
  ``_convert_weight_to_int4pack`` (gpt-fast's ``prepare_int4_weight_and_scales_and_zeros``). Needs
  compute capability 8.0 (bf16 tensor cores) and bf16 activations.
- ``nf4``: bitsandbytes NF4 in blocks of 64 (:class:`~.quant.NF4Linear`, one op).
- ``torchao``: torchao's ``Int4WeightOnlyConfig`` with its default packing, where torchao is installed
  (``pip install torchao``; not a dependency).

:class:`TinyLinear` runs the same layout on the CPU through the op's CPU twin
(``_weight_int4pack_mm_for_cpu``, same scales and zeros), which is how its packing is tested here.
:func:`pick` times the available kernels on one of the model's own weights and keeps the fastest
whose error stays within :data:`WORSE` times NF4's; a kernel that fails drops out with one notice.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .quant import NF4Linear, int4_codes

GROUP = 128  # inputs per scale/zero (gpt-fast's default; 32, 64 and 256 also run)
GGUF_GROUP = 32  # a GGUF Q4_0/Q4_1 block: its codes map onto tinygemm's layout unchanged
NF4_BLOCK = 64
WORSE = 1.25  # a kernel is within bounds when its output error is at most this times NF4's, same weight and input
PREFERENCE = ("tinygemm", "torchao", "nf4")  # the order kernels are tried in; the fastest within bounds wins


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Codes ``[N, K]`` (0..15) -> ``uint8 [N, K/2]``, input ``2j`` in the high nibble (what the CUDA op takes)."""
    q = q.to(torch.uint8)
    return (q[:, ::2] << 4) | q[:, 1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """``uint8 [N, K/2]`` -> codes ``uint8 [N, K]``."""
    return torch.stack([packed >> 4, packed & 0xF], -1).flatten(-2)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """Nibble-packed codes ``uint8 [N, K/2]`` and scales/zeros ``bf16 [K/G, N, 2]`` -> float32 ``[N, K]``."""
    q = unpack_nibbles(codes).float()
    n, k = q.shape
    s = scales.float().permute(1, 0, 2)  # [N, K/G, 2]
    return ((q.view(n, k // group, group) - 8) * s[..., :1] + s[..., 1:]).view(n, k)


def from_gguf_q4(raw: torch.Tensor, kind: str, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF ``Q4_0`` or ``Q4_1`` blocks (``uint8``, ``shape`` ``[N, K]`` row-major, 32 weights a block)
    -> (codes ``uint8 [N, K/2]``, scales/zeros ``bf16 [K/32, N, 2]``) for :data:`GGUF_GROUP`, without
    re-quantizing: the 4-bit codes are the file's; Q4_0's ``d (q - 8)`` is scale ``d``, zero 0, and
    Q4_1's ``d q + m`` is scale ``d``, zero ``m + 8 d`` (ggml's ``dequantize_row_q4_0/1``). Only the
    scales round, from float16 to bf16."""
    n, k = shape
    width = {"Q4_0": 18, "Q4_1": 20}[kind]
    blocks = raw.reshape(n * k // 32, width)
    d = blocks[:, :2].contiguous().view(torch.float16).float()[:, 0]
    m = blocks[:, 2:4].contiguous().view(torch.float16).float()[:, 0] if kind == "Q4_1" else torch.zeros_like(d)
    qs = blocks[:, width - 16 :]
    q = torch.cat([qs & 0xF, qs >> 4], -1).view(n, k)  # a block's low nibbles are weights 0-15, high 16-31
    zero = m + 8 * d if kind == "Q4_1" else torch.zeros_like(d)
    scales = torch.stack([d, zero], -1).view(n, k // 32, 2).transpose(0, 1).contiguous().to(torch.bfloat16)
    return pack_nibbles(q), scales


def inner_k_tiles(k: int) -> int:
    """The CUDA layout's K tiles per 16 x 8 fragment: 8 (gpt-fast's) when ``k`` allows, else 4 or 2."""
    return next(t for t in (8, 4, 2) if k % (t * 16) == 0)


def _cuda_pack(codes: torch.Tensor, tiles: int) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack(codes, tiles)


def _cuda_mm(x: torch.Tensor, packed: torch.Tensor, group: int, scales: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm(x, packed, group, scales)


class TinyLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` in tinygemm's int4 layout (module doc); any float input ``[..., K]``,
    bf16 inside the kernel, output in the input's dtype ``[..., N]``. On a CUDA device the CUDA op; on
    the CPU its twin (same math, the CPU's own packed layout)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, group: int, bias: torch.Tensor | None = None,
                 cuda: bool | None = None):
        super().__init__()
        self.out_features, self.in_features = codes.shape[0], codes.shape[1] * 2
        self.group, self.cuda = group, codes.is_cuda if cuda is None else cuda
        if self.cuda:
            packed = _cuda_pack(codes.contiguous(), inner_k_tiles(self.in_features))
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(codes).int(), 2)
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales", scales.contiguous(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float(), persistent=False)

    @staticmethod
    def fits(out_features: int, in_features: int, group: int = GROUP) -> bool:
        return out_features % 16 == 0 and in_features % group == 0 and in_features % 32 == 0

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, group: int = GROUP) -> TinyLinear:
        q, scales = int4_codes(weight, group)
        return cls(pack_nibbles(q), scales, group, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        mm = _cuda_mm if self.cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
        y = mm(flat, self.packed, self.group, self.scales)
        y = y.to(x.dtype) if self.bias is None else (y.float() + self.bias).to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def rows(self, start: int, end: int) -> nn.Module:
        return RowSlice(self, start, end)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 tinygemm g{self.group}"


class RowSlice(nn.Module):
    """Output rows ``start:end`` of a fused linear, for the transformers modules (q, k, v of a fused
    qkv) on the few paths that call them (the benchmarks' baselines); the fast path calls the fused one."""

    def __init__(self, fused: nn.Module, start: int, end: int):
        super().__init__()
        self.fused, self.start, self.end = fused, start, end
        self.in_features, self.out_features = fused.in_features, end - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)[..., self.start : self.end]


class DenseLinear(nn.Module):
    """A 16-bit linear for a weight no 4-bit kernel takes (a shape that fits none)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", weight.detach().to(dtype), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype), persistent=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)

    def rows(self, start: int, end: int) -> nn.Module:
        return RowSlice(self, start, end)


def make_tinygemm(weight, bias, group: int = GROUP) -> nn.Module | None:
    n, k = weight.shape
    return TinyLinear.from_weight(weight, bias, group) if TinyLinear.fits(n, k, group) else None


def make_nf4(weight, bias, compute: torch.dtype = torch.bfloat16) -> nn.Module | None:
    """bitsandbytes' own NF4 quantizer on the weight's device (standard layout, blocks of 64)."""
    import bitsandbytes.functional as bnbf

    n, k = weight.shape
    if k % NF4_BLOCK:
        return None
    data, state = bnbf.quantize_4bit(weight.to(compute).contiguous(), blocksize=NF4_BLOCK, quant_type="nf4")
    return NF4Linear(data, state.absmax.float(), (n, k), NF4_BLOCK, "nf4", compute, bias)


def make_torchao(weight, bias, group: int = GROUP) -> nn.Module | None:
    """torchao's int4 weight-only (its default packing for this torchao and GPU) on a bf16 linear."""
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    n, k = weight.shape
    if k % group:
        return None
    linear = nn.Linear(k, n, bias=bias is not None, device=weight.device, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    quantize_(linear, Int4WeightOnlyConfig(group_size=group))
    linear.rows = lambda start, end: RowSlice(linear, start, end)
    return linear


KERNELS: dict[str, Callable] = {"tinygemm": make_tinygemm, "nf4": make_nf4, "torchao": make_torchao}


def available(device: torch.device) -> list[str]:
    """The kernels that can run on ``device`` here, in :data:`PREFERENCE` order."""
    if device.type != "cuda":
        return []
    out = []
    if torch.cuda.get_device_capability(device) >= (8, 0):  # tinygemm's bf16 tensor cores
        out.append("tinygemm")
        if importlib.util.find_spec("torchao") is not None:
            out.append("torchao")
    if importlib.util.find_spec("bitsandbytes") is not None:
        out.append("nf4")
    return out


def cuda_ms(fn: Callable[[], object], reps: int = 50) -> float:
    """Median-free mean milliseconds of ``fn`` over ``reps`` calls, GPU work included."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1000 / reps


def pick(weight: torch.Tensor, kernels: list[str], notices: list[str], ms: Callable | None = None,
         makers: dict[str, Callable] = KERNELS) -> str:
    """The kernel for this model: each of ``kernels`` builds ``weight`` (one of the model's own, on the
    GPU), multiplies one token's activations (decode's shape) and is timed by ``ms``; the fastest whose
    relative error against the 16-bit product is at most :data:`WORSE` times NF4's (when NF4 is among
    them) wins. A kernel that fails is left out with one notice. :class:`RuntimeError` if none runs."""
    weight, ms = weight.detach(), ms or cuda_ms
    x = torch.randn(1, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    exact = x.float() @ weight.float().T
    runs: dict[str, tuple[float, float]] = {}
    for name in kernels:
        try:
            module = makers[name](weight, None)
            if module is None:
                continue
            err = ((module(x).float() - exact).abs().max() / exact.abs().max()).item()
            runs[name] = (ms(lambda: module(x)), err)
        except Exception as exc:  # a kernel this GPU, torch or package lacks
            notices.append(f"the {name} 4-bit kernel does not run here ({type(exc).__name__}); using another")
    if not runs:
        raise RuntimeError("no 4-bit kernel runs on this GPU")
    bound = WORSE * runs["nf4"][1] if "nf4" in runs else float("inf")
    within = {name: r for name, r in runs.items() if r[1] <= bound}
    return min(within, key=lambda name: within[name][0])


def build(loaded, want: str, device: torch.device, kernels: list[str] | None = None, progress=lambda msg: None):
    """Quantize a model loaded in 16 bits on the CPU onto ``device``, one fused weight at a time (the
    GPU never holds the 16-bit model), with the kernel ``want`` asks for: ``4bit`` the one :func:`pick`
    chooses, ``int4`` tinygemm (NF4 where it cannot run); the fast path over it. Sets ``loaded.fast``
    and ``loaded.weights``; a fallback adds one notice to ``loaded.notices``. ``progress`` hears which
    kernel was chosen and each layer as it is quantized (the load's status line)."""
    from .fast import FastModel

    model = loaded.model
    kernels = available(device) if kernels is None else kernels
    if want == "int4":
        kernels = [k for k in kernels if k in ("tinygemm", "nf4")]
    group = GGUF_GROUP if getattr(loaded.source, "kind", "") == "gguf" else GROUP
    makers = {**KERNELS, "tinygemm": lambda w, b: make_tinygemm(w, b, group),
              "torchao": lambda w, b: make_torchao(w, b, group),
              "nf4": lambda w, b: make_nf4(w, b, loaded.dtype)}
    _move_all_but_decoder_linears(model, device)
    sample = model.model.layers[0].mlp.down_proj.weight.to(device)
    notes: list[str] = []
    chosen = kernels[0] if len(kernels) == 1 else pick(sample, kernels, notes, makers=makers)
    if want == "int4" and chosen != "tinygemm":
        notes.append(f"--quant int4: PyTorch's int4 kernel does not run on this GPU; using {chosen}")
    loaded.notices.extend(notes[:1])  # one notice, whatever fell through
    del sample

    layers = len(model.model.layers)
    progress(f"quantizing onto {device.type} with the {chosen} 4-bit kernel ...")

    def make(weight, bias, key):
        if key.endswith(".down"):  # the last of a layer's four
            progress(f"quantizing onto {device.type} ({chosen}): layer {int(key.split('.')[0]) + 1}/{layers}")
        weight = weight.to(device)
        return makers[chosen](weight, bias) or (makers["nf4"](weight, bias) if chosen != "nf4" else None) \
            or DenseLinear(weight, bias, loaded.dtype)

    loaded.fast = FastModel.build(model, make=make)
    loaded.weights = {"tinygemm": f"int4-tinygemm-g{group}", "torchao": f"torchao-int4-g{group}",
                      "nf4": "nf4-b64"}[chosen]
    return loaded.fast


def _move_all_but_decoder_linears(model: nn.Module, device: torch.device) -> None:
    """Move every parameter and buffer of ``model`` to ``device`` except the decoder layers' linears
    (quantized there one at a time by :func:`build`)."""
    linears = {id(m) for layer in model.model.layers for m in layer.modules() if isinstance(m, nn.Linear)}
    for module in model.modules():
        if id(module) not in linears:
            module._apply(lambda t: t.to(device), recurse=False)
