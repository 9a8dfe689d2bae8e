"""A GGUF file's tensors at the precision the file ships them in: one CPU kernel per block type, built
from the codes and group scales :mod:`.gguf` reads, never from floats quantized a second time (see
the README's "Which kernel runs where").

- Q4_0, Q4_1, Q4_K (affine 4-bit in groups of 32): PyTorch's packed int4 kernel
  (:class:`~.quant.Int4Linear`) on the file's codes; only each group's scale and zero round, to bf16.
- Q5_0, Q5_1, Q5_K, Q8_0 (5 and 8 bits, groups of 32), where the int4 kernel has AVX-512:
  :class:`Int8Planes`, the codes split into a low-nibble and a high-bits plane that the same int4
  kernel runs as one call over ``[x, x]`` (8 bits a weight, the file's group scales); again only
  bf16 rounds. Without AVX-512 (the int4 kernel twice as slow): float16
  (:func:`~.gguf.eight_bit_kernel`).
- Q6_K (its 16-weight groups fit no group-32 kernel), F16, BF16, Q2_K, Q3_K and the IQ codebooks:
  a 16-bit dense copy of the file's values (:class:`~.quant.HalfLinear`, float16, rounding at 2^-11).
- The output head follows the same table, except that a head of more than 4 bits stays float16 (it
  keeps the bundled model's logits bit for bit, see :func:`~.gguf.kernel_for`); the input
  embeddings keep the file's values in float32, looked up a few rows at a time.

``--quant 4bit`` still means 4 bits: tensors with more bits are re-quantized to int4 g32 (min/max per
group, as for a float checkpoint), and :func:`apply` says how far that moves them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .gguf import AFFINE, FOUR, GGUFFile, kernel_for, label
from .quant import (
    DENSE_ROWS,
    GROUP,
    HalfLinear,
    Int4Linear,
    Packs,
    affine_int4,
    cat_bias,
    dense_linear,
    dequantize,
    pack_codes,
    pack_scales,
    prefill_dtype,
    scratch_tensor,
)


class Int8Planes(nn.Module):
    """``y = x W^T + b`` with ``W`` 5- or 8-bit codes and a scale and offset per group of 32 inputs
    (GGUF Q5_0, Q5_1, Q5_K, Q8_0), run by the packed int4 kernel: each code ``c = l + 16 h`` is split
    into its low nibble ``l`` and high bits ``h``, laid side by side as one int4 weight ``[N, 2K]``
    whose groups are ``(l - 8) s + z`` and ``(h + o - 8) 16 s``, and multiplied with ``[x, x]``, one
    call. With ``z`` and ``o`` chosen per type (:meth:`pack`) the sum is the file's
    ``s c + m`` with only ``s`` (and an asymmetric type's offset) rounded to bf16: 8 bits a weight,
    no re-quantization. Prefill chunks take :class:`~.quant.Int4Linear`'s dequantized route, on the
    two planes added into one float32 weight."""

    def __init__(self, planes: Int4Linear):
        super().__init__()
        self.planes = planes
        self.in_features, self.out_features = planes.in_features // 2, planes.out_features

    @staticmethod
    def pack(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
        """``codes`` ``[N, K]`` below ``2**bits`` (5 or 8), ``scale``/``offset`` float32 ``[N, K/32]`` ->
        the two planes as one packed int4 weight ``[N, 2K]`` and its bf16 scales.

        The high plane's codes are ``h + o``: ``o = 8`` for 5-bit codes (``h`` is 0 or 1), 0 for 8-bit
        ones (``h`` fills 0..15); its zero is 0, and the low plane's zero ``z = m + 8 s + 16 s (8 - o)``
        is then ``-8 s`` for Q5_0 and ``8 s`` for Q8_0 (power-of-two multiples of ``s``: exact in bf16)."""
        codes = codes.to(torch.uint8)
        o = 0 if bits == 8 else 8
        low, high = codes & 15, (codes >> 4) + o
        zero = offset + 8 * scale + 16 * scale * (8 - o)
        scales = pack_scales(torch.cat([scale, 16 * scale], 1), torch.cat([zero, torch.zeros_like(zero)], 1))
        return pack_codes(torch.cat([low, high], 1)), scales

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``[N, K]`` weight this computes with (the two planes added in float32), in ``dtype``."""
        p = self.planes
        both = dequantize(p.packed, p.scales, p.in_features, p.layout)
        out = scratch_tensor("planes", (both.shape[0], self.in_features), dtype)
        return torch.add(both[:, : self.in_features], both[:, self.in_features :], out=out)

    def rows(self, start: int, end: int) -> "Int8Planes":
        return Int8Planes(self.planes.rows(start, end))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.planes
        if x.numel() // self.in_features >= DENSE_ROWS and p._whole_blocks():
            return dense_linear(x, self.dequantized(prefill_dtype()), p.bias).to(x.dtype)
        return p(torch.cat([x, x], -1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 g{GROUP} (two int4 planes)"


def float_weight(module: nn.Module) -> torch.Tensor:
    """The float32 ``[N, K]`` weight a linear of this module computes with (int4 packed, int8 planes,
    16-bit or a plain ``nn.Linear``): what its error against the file's values is measured on."""
    if isinstance(module, Int8Planes):
        return module.dequantized()
    if isinstance(module, Int4Linear):
        return dequantize(module.packed, module.scales, module.in_features, module.layout)
    return module.weight.detach().float()


class Stack(nn.Module):
    """Linears of one input computed side by side, outputs end to end: a fused q/k/v or gate/up whose
    parts run different kernels (a Q4_K_M file's Q4_K q and k beside its Q6_K v)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features, self.out_features = parts[0].in_features, sum(p.out_features for p in parts)

    def rows(self, start: int, end: int) -> nn.Module:
        """The part that computes output rows ``start:end`` (only whole parts are asked for)."""
        at = 0
        for part in self.parts:
            if (at, at + part.out_features) == (start, end):
                return part
            at += part.out_features
        raise ValueError(f"rows {start}:{end} are not one part of {self}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], -1)


def fuse(parts: list[nn.Module]) -> nn.Module:
    """One module computing ``parts`` (same input) side by side, for the fast path's fused q/k/v and
    gate/up: parts of one int4 kind that are whole row blocks of the packed layout
    (:func:`~.quant.packed_layout`) are laid end to end as one weight (exact: codes and scales are per
    row), 16-bit parts likewise; anything else is a :class:`Stack`."""
    kinds = {type(p) for p in parts}
    if kinds == {HalfLinear} and len({p.weight.dtype for p in parts}) == 1:
        bias = cat_bias(parts, torch.float32, parts[0].weight.device)
        return HalfLinear(torch.cat([p.weight for p in parts]), parts[0].weight.dtype, bias)
    inner = [p.planes if isinstance(p, Int8Planes) else p for p in parts]
    if len(kinds) == 1 and kinds <= {Int4Linear, Int8Planes} and all(p._whole_blocks() for p in inner):
        first = inner[0]  # whole row blocks of the packed layout lie end to end
        fused = Int4Linear(torch.cat([p.packed for p in inner]), torch.cat([p.scales for p in inner], 1),
                           cat_bias(inner, torch.float32, first.packed.device), first.in_features)
        return Int8Planes(fused) if kinds == {Int8Planes} else fused
    return Stack(parts)


@dataclass
class Report:
    """What :func:`apply` built: per block type, how many tensors run on each kernel; and for
    ``--quant 4bit``, the tensors re-quantized and how far they moved (relative Frobenius norm)."""

    file_type: str
    kernels: dict[str, dict[str, int]] = field(default_factory=dict)
    requantized: list[str] = field(default_factory=list)  # block types re-quantized to fewer bits
    moved: float | None = None

    def count(self, block_type: str, kernel: str) -> None:
        per = self.kernels.setdefault(block_type, {})
        per[kernel] = per.get(kernel, 0) + 1

    def label(self) -> str:
        """What runs: ``gguf Q4_K_M -> int4 g32 + int8 g32 + fp16`` (:func:`~.gguf.label`)."""
        used: dict[str, int] = {}
        for per in self.kernels.values():
            for kernel, n in per.items():
                used[kernel] = used.get(kernel, 0) + n
        return label(self.file_type, used)

    def notice(self) -> str | None:
        if not self.requantized:
            return None
        n = sum(self.kernels[t].get("int4", 0) for t in self.requantized)
        cost = f"; they move {100 * self.moved:.1f}% (relative norm)" if self.moved is not None else ""
        return (f"--quant 4bit re-quantizes {n} {'/'.join(self.requantized)} tensors of this {self.file_type} file "
                f"to int4 g32{cost}; --quant auto runs them at the file's own precision")


def apply(model: nn.Module, file: GGUFFile, quant: str = "auto", packs: Packs | None = None) -> Report:
    """Replace every linear of ``model`` that has a tensor in ``file`` (decoder projections, output
    head; a tied head reads ``token_embd``) by the kernel :func:`kernel_for` picks, built from the
    file's blocks. The model's float weights must be the file's dequantized values (the converted
    folder); 16-bit kernels and re-quantization start from them. Input embeddings are left as they are.
    ``packs``: packed weights kept from an earlier start (:class:`~.quant.Packs`), used and filled."""
    report = Report(file.file_type)
    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    config = model.config.get_text_config(decoder=True)
    names = file.names(list(linears), config.num_hidden_layers)
    head = model.get_output_embeddings()
    head_name = next((n for n, m in linears.items() if m is head), None)
    if head_name is not None and head_name not in names and "token_embd.weight" in file.tensors \
            and "output.weight" not in file.tensors:
        names[head_name] = "token_embd.weight"  # tied embeddings: the head is the embedding table
    moved, total = 0.0, 0.0
    for module_name, tensor_name in names.items():
        module, stored = linears[module_name], file.tensors[tensor_name]
        shape = (module.out_features, module.in_features)
        if stored.shape != shape:
            continue  # not what the converted folder holds; it stays as loaded
        kernel = kernel_for(stored.type, shape, quant, head=module is head)
        if kernel == "fp32":
            report.count(stored.type, kernel)
            continue
        new = module_for(kernel, file, tensor_name, module, packs, module_name)
        if kernel == "int4" and stored.type not in FOUR:
            if stored.type not in report.requantized:
                report.requantized.append(stored.type)
            if new.layout is not None:
                w = module.weight.detach().float()
                moved += (float_weight(new) - w).square().sum().item()
                total += w.square().sum().item()
        report.count(stored.type, kernel)
        parent, _, child = module_name.rpartition(".")
        if module is head:
            model.set_output_embeddings(new)
        else:
            setattr(model.get_submodule(parent), child, new)
    if total:
        report.moved = (moved / total) ** 0.5
    return report


def module_for(kernel: str, file: GGUFFile, name: str, module: nn.Linear, packs: Packs | None = None,
               key: str = "") -> nn.Module:
    """The module running ``file``'s tensor ``name`` on ``kernel`` (:func:`~.gguf.kernel_for`) in place of
    ``module``, which holds the same tensor as floats (its dequantized values) and the bias, if any.
    Packed int4 weights come from ``packs`` under ``key`` where an earlier start kept them."""
    block_type = file.tensors[name].type
    n, k = module.out_features, module.in_features
    packs = packs or Packs(None)
    if kernel == "fp16":
        return HalfLinear(module.weight, torch.float16, module.bias)
    if block_type not in AFFINE or kernel == "int4" and block_type not in FOUR:
        return Int4Linear(*packs.get(f"gguf.{key}.int4", module.weight), module.bias, k)  # --quant 4bit

    def codes() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = file.affine(name)
        return tuple(torch.from_numpy(x) for x in (a.codes, a.scale, a.offset))

    if kernel == "int4":
        return Int4Linear(*packs.cached(f"gguf.{key}.int4", (n, k), lambda: affine_int4(*codes())), module.bias, k)
    bits = AFFINE[block_type][0]
    planes = packs.cached(f"gguf.{key}.int8", (n, 2 * k), lambda: Int8Planes.pack(*codes(), bits))
    return Int8Planes(Int4Linear(*planes, module.bias, 2 * k))
