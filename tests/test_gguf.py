"""GGUF files read as they are (:mod:`sinkchat.model.gguf`) and each block type's kernel
(:mod:`sinkchat.model.blockkernels`), on tensors quantized here by gguf-py's own quantizers or written
as synthetic blocks: the codes and scales read give gguf-py's own dequantized values, and each kernel
computes with them to within the rounding of its scales to bf16, far closer than re-quantizing them
to int4 would. The kernels read PyTorch's packed int4 layout, which differs per CPU, so the kernel
checks also run under each ``ATEN_CPU_CAPABILITY`` (as tests/test_quant.py does)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from _helpers import ROOT, one_line_error, run_cli
from _tinygguf import SYNTHETIC, blocks, tiny_llama, write_tensors
from sinkchat.errors import SinkchatError
from sinkchat.model import blockkernels, quant
from sinkchat.model.gguf import AFFINE, EIGHT, GGUFFile, eight_bit_kernel, kernel_for

TYPES = sorted(AFFINE) + ["F16"]
N, K = 192, 512  # 192 rows: whole 64-row blocks of the packed layout, cut by the slices below


def one_tensor(tmp_path, block_type: str, rows: int = N, cols: int = K):
    """A GGUF with one ``block_type`` tensor, opened, and that tensor's values by gguf-py's dequantizer."""
    path = write_tensors(tmp_path / f"{block_type}.gguf", {"blk.0.ffn_up.weight": (block_type, rows, cols)})
    file = GGUFFile(path)
    return file, torch.from_numpy(file.dequantized("blk.0.ffn_up.weight").copy())


@pytest.mark.parametrize("block_type", sorted(AFFINE))
def test_codes_scales_and_offsets_are_the_files_own_values(tmp_path, block_type):
    file, ref = one_tensor(tmp_path, block_type)
    a = file.affine("blk.0.ffn_up.weight")
    bits, group = AFFINE[block_type]
    assert a.codes.shape == (N, K) and a.codes.max() < 2**bits and (a.bits, a.group) == (bits, group)
    w = a.scale.repeat(group, 1) * a.codes + a.offset.repeat(group, 1)
    assert np.abs(w - ref.numpy()).max() <= 1e-6 * np.abs(ref.numpy()).max()
    if block_type in SYNTHETIC:
        assert len(np.unique(a.codes)) == 2**bits  # random codes: every one of them appears


def weight_error(module: nn.Module, ref: torch.Tensor) -> float:
    """Relative Frobenius distance between the weight a kernel computes with and ``ref``."""
    return ((blockkernels.float_weight(module) - ref).norm() / ref.norm()).item()


def check_block_types(tmp_path) -> None:
    """Every block type's kernel against the file's own values, on this process's CPU flavour."""
    g = torch.Generator().manual_seed(0)
    x1, xs = torch.randn(1, K, generator=g), torch.randn(130, K, generator=g)
    for block_type, kernel in [(t, kernel_for(t, (N, K), eight=e)) for t in TYPES for e in ("int8", "fp16")
                               if e == "int8" or t in EIGHT]:  # 5 and 8 bits: both kernels, whichever this CPU picks
        file, ref = one_tensor(tmp_path, block_type)
        linear = nn.Linear(K, N, bias=False)
        linear.weight.data = ref
        module = blockkernels.module_for(kernel, file, "blk.0.ffn_up.weight", linear)
        expected = {"int4": quant.Int4Linear, "int8": blockkernels.Int8Planes, "fp16": quant.HalfLinear}[kernel]
        assert isinstance(module, expected), (block_type, module)
        requantized = quant.Int4Linear(*quant.quantize_int4(ref), None, K)
        moved, requant = weight_error(module, ref), weight_error(requantized, ref)
        # bf16 scales round at 2^-9 (2e-3); re-quantizing to int4 moves these weights 1.7-8%, except Q4_1's,
        # whose min/max groups re-quantize to themselves: the same packed weight, bit for bit
        assert moved < 4e-3 and (kernel != "fp16" or moved < 5e-4), (block_type, kernel, moved)
        if block_type == "Q4_1":
            assert torch.equal(module.packed, requantized.packed) and torch.equal(module.scales, requantized.scales)
        elif kernel != "fp16":
            assert moved < requant / 5, (block_type, moved, requant)
        flavour = torch.backends.cpu.get_cpu_capability()
        for x, bound in ((x1, 1e-2), (xs, 5e-3)):  # one token (bf16 in and out), a prefill chunk (float32)
            y, yr = module(x), x @ ref.T
            err = ((y - yr).norm() / yr.norm()).item()
            assert err < bound, (block_type, kernel, flavour, len(x), err)
        for start, end in ((0, 64), (64, 192), (16, 48)):  # row slices: on and off the layout's blocks
            part, whole = module.rows(start, end)(xs), module(xs)[:, start:end]
            err = ((part - whole).norm() / whole.norm()).item()
            assert err < 1e-2, (block_type, start, err)  # a part off the blocks takes the bf16 kernel


def test_each_block_type_runs_at_its_own_precision(tmp_path):
    check_block_types(tmp_path)


@pytest.mark.parametrize("flavour", ["default", "avx2", "avx512"])
def test_each_block_type_on_each_cpu_flavour(tmp_path, flavour):
    env = {**os.environ, "ATEN_CPU_CAPABILITY": flavour, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    code = ("import sys, pathlib, torch, test_gguf; print(torch.backends.cpu.get_cpu_capability()); "
            "test_gguf.check_block_types(pathlib.Path(sys.argv[1])); test_gguf.check_fusing(pathlib.Path(sys.argv[1]))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                         cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    assert out.stdout.split()[0].lower() in {flavour, "avx2", "default"}  # capped at what the CPU has


def test_q4_0_groups_with_a_negative_scale_keep_their_sign(tmp_path):
    """Q4_0's d is the group's largest magnitude over -8, so it is negative where that value is
    positive: the int4 step must stay negative, not be clamped like a re-quantized group's."""
    file, ref = one_tensor(tmp_path, "Q4_0")
    assert (file.affine("blk.0.ffn_up.weight").scale < 0).any()
    linear = nn.Linear(K, N, bias=False)
    linear.weight.data = ref
    assert weight_error(blockkernels.module_for("int4", file, "blk.0.ffn_up.weight", linear), ref) < 4e-3


def test_fused_parts_compute_what_the_parts_do(tmp_path):
    check_fusing(tmp_path)


def check_fusing(tmp_path) -> None:
    """The fast path's fused q/k/v: parts of one int4 kind laid end to end as one weight, 16-bit parts as
    one 16-bit weight, mixed kinds (or parts off the packed layout's row blocks) side by side (a Stack);
    each gives back its parts as row slices."""
    made = {}
    for block_type in ("Q4_K", "Q4_0", "Q8_0", "Q5_1", "Q6_K", "F16"):
        file, ref = one_tensor(tmp_path, block_type)
        linear = nn.Linear(K, N, bias=True)
        linear.weight.data, linear.bias.data = ref, torch.randn(N)
        kernel = kernel_for(block_type, (N, K), eight="int8")  # the planes whichever this CPU picks
        made[block_type] = blockkernels.module_for(kernel, file, "blk.0.ffn_up.weight", linear)
    made["Q4_0 rows 16:64"] = made["Q4_0"].rows(16, 64)  # off the layout's blocks: not laid end to end
    x = torch.randn(3, K)
    for names, kind in ((("Q4_K", "Q4_0"), quant.Int4Linear), (("Q4_0 rows 16:64", "Q4_K"), blockkernels.Stack),
                        (("Q8_0", "Q5_1"), blockkernels.Int8Planes),
                        (("Q6_K", "F16"), quant.HalfLinear), (("Q4_K", "Q8_0", "Q6_K"), blockkernels.Stack)):
        parts = [made[n] for n in names]
        fused = blockkernels.fuse(parts)
        sizes = [p.out_features for p in parts]
        assert type(fused) is kind and fused.out_features == sum(sizes)
        assert torch.allclose(fused(x), torch.cat([p(x) for p in parts], -1), rtol=1e-3, atol=1e-3), names
        for part, start in zip(parts, [sum(sizes[:i]) for i in range(len(parts))]):
            assert torch.allclose(fused.rows(start, start + part.out_features)(x), part(x), rtol=1e-3, atol=1e-3), names


def test_llama_q_and_k_rows_follow_transformers_permutation(tmp_path):
    """llama.cpp's converter interleaves each head's rotary halves in q and k; transformers' loader undoes
    it, so the codes read must come in the same row order as the converted floats."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    path = write_tensors(tmp_path / "qk.gguf", {"blk.0.attn_q.weight": ("Q4_K", 256, 256),
                                                "blk.0.attn_k.weight": ("Q8_0", 128, 256)},
                         head_count=4, head_count_kv=2)
    file = GGUFFile(path)
    undo = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"):
        stored = file.tensors[name]
        from gguf import GGMLQuantizationType, dequantize

        as_stored = dequantize(np.asarray(stored.raw), GGMLQuantizationType[stored.type]).reshape(stored.shape)
        expected = undo.process(weights=as_stored, name=name).weights
        a = file.affine(name)
        w = a.scale.repeat(a.group, 1) * a.codes + a.offset.repeat(a.group, 1)
        assert np.array_equal(file.dequantized(name), expected) and np.allclose(w, expected, rtol=0, atol=1e-6)
        assert not np.array_equal(as_stored, expected)  # the permutation is not a no-op here


def test_packing_in_row_pieces_is_packing_at_once():
    codes = torch.randint(0, 16, (208, 64), generator=torch.Generator().manual_seed(3))
    assert torch.equal(quant.pack_codes(codes, rows=64), quant.pack_codes(codes, rows=4096))


def test_the_kernel_table():
    """4-bit block types on int4, 5 and 8 bits on the int8 planes or float16 (per CPU), the rest 16-bit;
    the head keeps a 16-bit copy unless the file has it in 4 bits; --quant 4bit asks for 4 bits except
    on the head; a shape the int4 kernel cannot take is 16-bit."""
    shape = (256, 512)
    assert [kernel_for(t, shape) for t in ("Q4_0", "Q4_1", "Q4_K")] == ["int4"] * 3
    for eight in ("int8", "fp16"):
        assert [kernel_for(t, shape, eight=eight) for t in ("Q5_0", "Q5_1", "Q5_K", "Q8_0")] == [eight] * 4
    assert kernel_for("Q5_0", shape) == eight_bit_kernel()
    assert [kernel_for(t, shape) for t in ("Q6_K", "F16", "BF16", "Q3_K", "IQ4_XS")] == ["fp16"] * 5
    assert kernel_for("F32", shape) == "fp32"
    assert (kernel_for("Q8_0", shape, head=True), kernel_for("Q4_0", shape, head=True)) == ("fp16", "int4")
    assert [kernel_for(t, shape, "4bit") for t in ("Q5_0", "Q6_K", "F16")] == ["int4"] * 3
    assert kernel_for("Q6_K", shape, "4bit", head=True) == "fp16"
    assert kernel_for("Q4_K", (100, 512)) == kernel_for("Q8_0", (256, 520)) == "fp16"


@pytest.mark.parametrize("flavour", ["default", "avx2", "avx512"])
def test_five_and_eight_bits_run_on_int8_planes_only_with_avx512(flavour):
    """Measured (README): with AVX-512 the int8 planes beat float16 in a decode step; with AVX2 PyTorch's
    int4 kernel is twice as slow and float16 wins. Each flavour is forced, so any x86-64 CPU runs both."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": flavour, "PYTHONPATH": str(ROOT)}
    code = ("import torch; from sinkchat.model.gguf import eight_bit_kernel; "
            "print(torch.backends.cpu.get_cpu_capability(), eight_bit_kernel())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    capability, kernel = out.stdout.split()
    assert kernel == ("int8" if capability == "AVX512" else "fp16"), out.stdout
    assert capability.lower() in {flavour, "avx2", "default"}  # capped at what the CPU has
    for forced in ("int8", "fp16"):  # SINKCHAT_EIGHT_BIT overrides the choice, whatever the CPU
        env["SINKCHAT_EIGHT_BIT"] = forced
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
        assert out.stdout.split()[1] == forced, out.stdout


def test_bitsandbytes_below_a_files_precision_is_said_too(tmp_path):
    """On a GPU (or with 8bit) bitsandbytes re-quantizes: the tensors with more bits than it keeps are
    named (their movement is not measured there)."""
    from sinkchat.model.kernels import _lower

    file = GGUFFile(tiny_llama(tmp_path / "tiny.gguf"))
    notice = _lower(file, "4bit", "gguf Q4_K_M -> nf4")
    assert notice.startswith("--quant 4bit re-quantizes 9 Q5_0/Q8_0/Q5_K/Q6_K/Q5_1/F16 tensors of this Q4_K_M "
                             "file to nf4 (they move")  # the layers' matrices: not the embeddings (or a tied head)
    assert _lower(file, "8bit", "gguf Q4_K_M -> int8 (bitsandbytes)").startswith("--quant 8bit re-quantizes 1 F16")
    assert _lower(file, "none", "gguf Q4_K_M -> bfloat16") is None


def test_models_lists_what_a_gguf_file_runs_as(tmp_path):
    path = tiny_llama(tmp_path / "tiny.gguf")
    r = run_cli("models", str(path), env={"COLUMNS": "250"})
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.strip().startswith(str(path)))
    eight = " + int8 g32" if eight_bit_kernel() == "int8" else ""
    assert f"gguf Q4_K_M -> int4 g32{eight} + fp16" in row and "llama: 1 F16, 2 Q4_0" in row


def damaged(tmp_path) -> list[tuple[str, bytes]]:
    """(what the error says, the bytes) for a tiny model's GGUF damaged in each way a reader can meet."""
    good = (tiny_llama(tmp_path / "good.gguf")).read_bytes()
    unknown = bytearray(good)
    at = good.index(b"blk.0.attn_q.weight") + len(b"blk.0.attn_q.weight")
    unknown[at + 4 + 16 : at + 4 + 16 + 4] = (99).to_bytes(4, "little")  # after n_dims and two dims: the type
    cut = "truncated or damaged"
    return [
        ("not a GGUF file", b"PK\x03\x04" + good[4:]),
        ("version 7 is not supported", good[:4] + (7).to_bytes(4, "little") + good[8:]),
        (cut, good[: good.index(b"<pad0>")]),  # inside the vocabulary
        (cut, good[: good.index(b"output_norm.weight") + 40]),  # inside the tensor list
        (cut, good[: len(good) // 3]),  # inside the tensor data
        ("unknown block type 99", bytes(unknown)),
        (cut, good[:12] + (10**12).to_bytes(8, "little") + good[20:]),  # a tensor count past the end
    ]


def test_a_damaged_gguf_is_one_line(tmp_path):
    for i, (says, data) in enumerate(damaged(tmp_path)):
        path = tmp_path / f"bad{i}.gguf"
        path.write_bytes(data)
        with pytest.raises(SinkchatError, match=says):
            GGUFFile(path)
        one_line_error(run_cli("models", str(path)), "cannot read GGUF file", says)


def test_blocks_of_each_type_have_the_files_byte_sizes():
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    for block_type in AFFINE:
        per_block, size = GGML_QUANT_SIZES[GGMLQuantizationType[block_type]]
        assert blocks(block_type, 4, 512).shape == (4, 512 // per_block * size)
