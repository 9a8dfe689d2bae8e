"""The GPU 4-bit kernels (sinkchat.model.gpu) on the CPU: tinygemm's layout (nibble packing, scales
and zeros, GGUF Q4 blocks) against dequantized references and through the CUDA op's CPU twin, the
CUDA op's input format, the kernel choice and its fallback, and a model quantized through them.

CUDA cannot run on the machines the tests run on: where a test needs a CUDA-only call (the CUDA
int4 op, CUDA timing) it uses a stand-in, and says so."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_model_dir

from sinkchat.kv import SinkCache, rope_inv_freqs
from sinkchat.model import bundled_gguf, gguf_folder, gpu, load
from sinkchat.model.quant import int4_codes

BF16 = 2e-2  # bf16 activations into the int4 kernel, relative to the largest output


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def test_nibbles_are_packed_as_the_cuda_op_reads_them():
    assert gpu.pack_nibbles(torch.tensor([[1, 2, 15, 0]])).tolist() == [[0x12, 0xF0]]  # input 2j high, 2j+1 low
    q = torch.randint(0, 16, (32, 64), generator=torch.Generator().manual_seed(0))
    assert torch.equal(gpu.unpack_nibbles(gpu.pack_nibbles(q)).long(), q)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_tinygemm_layout_matches_its_dequantized_weight_through_the_cpu_twin(group):
    g = torch.Generator().manual_seed(group)
    weight, x = torch.randn(256, 512, generator=g), torch.randn(3, 512, generator=g)
    q, scales = int4_codes(weight, group)
    codes = gpu.pack_nibbles(q)
    deq = gpu.dequantize(codes, scales, group)
    step = (weight.view(256, -1, group).amax(-1) - weight.view(256, -1, group).amin(-1)) / 15
    assert ((deq - weight).abs().view(256, -1, group) <= step[..., None] * 0.51 + 0.02).all()  # half a step (+ bf16)
    linear = gpu.TinyLinear(codes, scales, group)
    assert rel(linear(x), x @ deq.T) < BF16
    assert rel(linear(x), x @ weight.T) > 1e-3  # it is 4-bit, not the dense weight


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_gguf_q4_blocks_map_onto_the_layout_without_requantizing(kind):
    from gguf import GGMLQuantizationType, quants

    qtype = getattr(GGMLQuantizationType, kind)
    weight = np.random.default_rng(1).standard_normal((64, 256)).astype(np.float32)
    raw = quants.quantize(weight, qtype)
    reference = torch.from_numpy(quants.dequantize(raw, qtype).copy())  # gguf's own dequantizer
    codes, scales = gpu.from_gguf_q4(torch.from_numpy(raw.copy()).view(-1), kind, (64, 256))
    deq = gpu.dequantize(codes, scales, gpu.GGUF_GROUP)
    assert rel(deq, reference) < 8e-3  # the scales are bf16 (8 bits) where GGUF keeps float16 (11)
    # the codes are the file's: dividing out each group's scale gives whole numbers 0..15
    s = scales.float().permute(1, 0, 2).repeat_interleave(32, 1)
    q = (reference - s[..., 1]) / s[..., 0] + 8
    assert (q - q.round()).abs().max() < 0.1 and q.round().min() >= 0 and q.round().max() <= 15
    assert torch.equal(q.round().to(torch.uint8), gpu.unpack_nibbles(codes))


def test_the_cuda_branch_hands_the_cuda_op_nibble_packed_codes_and_bf16(monkeypatch):
    """Stand-ins for the CUDA-only ops (they cannot run here): they check what they are given, then
    compute with the CPU twin on the same codes."""
    calls = []

    def pack(codes, tiles):
        assert codes.dtype == torch.uint8 and codes.shape == (64, 128) and tiles == 8
        calls.append("pack")
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(gpu.unpack_nibbles(codes).int(), 2)

    def mm(x, packed, group, scales):
        assert x.dtype == torch.bfloat16 and scales.dtype == torch.bfloat16 and scales.shape == (2, 64, 2)
        calls.append("mm")
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales)

    monkeypatch.setattr(gpu, "_cuda_pack", pack)
    monkeypatch.setattr(gpu, "_cuda_mm", mm)
    weight, x = torch.randn(64, 256), torch.randn(2, 256)
    q, scales = int4_codes(weight, 128)
    linear = gpu.TinyLinear(gpu.pack_nibbles(q), scales, 128, cuda=True)
    assert rel(linear(x), x @ gpu.dequantize(gpu.pack_nibbles(q), scales, 128).T) < BF16
    assert calls == ["pack", "mm"]
    assert [gpu.inner_k_tiles(k) for k in (4096, 14336, 576, 96)] == [8, 8, 4, 2]


def test_pick_takes_the_fastest_kernel_within_bounds_and_says_once_which_failed():
    """Real kernels on the CPU (the tinygemm twin, bitsandbytes NF4), a broken one and a failing one;
    the timings are stand-ins (CUDA timing cannot run here)."""
    weight = torch.randn(128, 256, generator=torch.Generator().manual_seed(2))

    def broken(w, b):  # the right shape, the wrong rows: as fast as you like, but wrong
        return gpu.make_tinygemm(w.roll(1, 0), b, 64)

    def failing(w, b):
        raise RuntimeError("no kernel image is available for execution on the device")

    makers = {"tinygemm": lambda w, b: gpu.make_tinygemm(w, b, 64), "nf4": gpu.make_nf4, "broken": broken,
              "torchao": failing}
    times = iter([])

    def ms(fn):
        fn()
        return next(times)

    notices: list[str] = []
    times = iter([3.0, 5.0, 1.0])  # tinygemm, nf4, broken
    assert gpu.pick(weight, ["tinygemm", "nf4", "broken", "torchao"], notices, ms, makers) == "tinygemm"
    assert notices == ["the torchao 4-bit kernel does not run here (RuntimeError); using another"]
    times = iter([6.0, 5.0])
    assert gpu.pick(weight, ["tinygemm", "nf4"], [], ms, makers) == "nf4"  # NF4 faster here: it wins
    with pytest.raises(RuntimeError, match="no 4-bit kernel"):
        gpu.pick(weight, ["torchao"], [], ms, makers)


@pytest.fixture(scope="module")
def tiny128(tmp_path_factory, smollm_f32):
    """A tiny random Mistral whose widths fit group 128 (128 wide, MLP 256)."""
    return tiny_model_dir("mistral", gguf_folder(bundled_gguf()), tmp_path_factory.mktemp("t128") / "m",
                          hidden_size=128, intermediate_size=256)


def test_a_model_quantized_through_the_chosen_kernel_matches_its_dequantized_weights(tiny128, monkeypatch):
    """gpu.build on the CPU (the CUDA op's CPU twin), its fast path against the same fast path over the
    weights it quantized, dequantized (float32 linears): only the kernel and its layout differ. Then
    with tinygemm failing, NF4 in its place and one notice."""
    from sinkchat.model.fast import FastModel

    def dequantized(weight, bias, key):
        q, scales = int4_codes(weight, 128)
        return gpu.DenseLinear(gpu.dequantize(gpu.pack_nibbles(q), scales, 128), bias, torch.float32)

    reference = load(str(tiny128), quant="none", device="cpu", dtype="bfloat16")
    reference.fast = FastModel.build(reference.model, make=dequantized)
    loaded = load(str(tiny128), quant="none", device="cpu", dtype="bfloat16")
    said: list[str] = []
    gpu.build(loaded, "int4", torch.device("cpu"), kernels=["tinygemm"], progress=said.append)
    assert loaded.weights == "int4-tinygemm-g128" and loaded.notices == []
    layers = len(loaded.model.model.layers)  # the load's status line: the kernel, then each layer
    assert said == ["quantizing onto cpu with the tinygemm 4-bit kernel ..."] + [
        f"quantizing onto cpu (tinygemm): layer {i}/{layers}" for i in range(1, layers + 1)]
    assert isinstance(loaded.fast.layers[0].qkv, gpu.TinyLinear) and isinstance(loaded.fast.layers[0].down,
                                                                                 gpu.TinyLinear)
    ids = list(range(100, 140))
    caches = [SinkCache(rope_inv_freqs(reference.model), 4, 24, 4) for _ in range(2)]
    worst = 0.0
    with torch.inference_mode():
        for i in range(len(ids)):
            (p1, _), (p2, _) = (c.reserve(1) for c in caches)
            worst = max(worst, rel(loaded.fast([ids[i]], p1, caches[0]), reference.fast([ids[i]], p2, caches[1])))
    assert caches[0].evictions and worst < BF16, worst

    def unavailable(w, b, group=128):  # tinygemm failing as on a GPU older than compute capability 8.0
        raise RuntimeError("_weight_int4pack_mm needs compute capability 8.0")

    monkeypatch.setattr(gpu, "make_tinygemm", unavailable)
    monkeypatch.setattr(gpu, "cuda_ms", lambda fn: (fn(), 1.0)[1])  # a stand-in for CUDA timing
    again = load(str(tiny128), quant="none", device="cpu", dtype="bfloat16")
    gpu.build(again, "int4", torch.device("cpu"), kernels=["tinygemm", "nf4"])
    assert again.weights == "nf4-b64" and len(again.notices) == 1 and "tinygemm" in again.notices[0]
