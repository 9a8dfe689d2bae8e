"""The 4-bit CPU linear (:class:`sinkchat.model.quant.Int4Linear`) against a float32 reference built from
the same 4-bit codes, under every CPU flavour PyTorch's int4 kernel branches on.

PyTorch packs int4 weights differently per CPU capability (blocks of 64 rows on AVX-512, 32 on AVX2,
another layout on neither), and sinkchat reads that layout itself (row slices, the prefill path's
dequantization). So each check runs in a subprocess with ``ATEN_CPU_CAPABILITY`` forced to each
flavour, not only the one this machine takes. A flavour the CPU lacks is capped by PyTorch at what
it has (an AVX2 machine runs "avx512" as AVX2), so every case runs on every x86-64 CPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from _helpers import CPU_REPORTS, ROOT, report_cpu
from sinkchat.model import quant
from sinkchat.model.quant import GROUP, Int4Linear

CHOSEN_PREFILL_DTYPE = quant.prefill_dtype  # the product's choice (conftest pins float32 for every test)
N, K = 192, 128  # 192 rows: whole 64-row blocks, but slices of 32 or 48 rows cut them


def codes_and_scales(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random 4-bit codes ``int32 [N, K]``, bf16 scales and zeros ``[K/32, N, 2]`` and the float32
    weight they stand for, ``(q - 8) * scale + zero``, computed here independently of sinkchat."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (N, K), dtype=torch.int32, generator=g)
    scales = torch.stack([torch.rand(K // GROUP, N, generator=g) * 0.1 + 0.01,
                          torch.randn(K // GROUP, N, generator=g) * 0.1], -1).to(torch.bfloat16)
    s = scales.float().permute(1, 0, 2).repeat_interleave(GROUP, 1)  # [N, K, 2]
    return q, scales, (q.float() - 8) * s[..., 0] + s[..., 1]


def check_int4() -> None:
    """Every Int4Linear path on this process's CPU flavour against the float32 reference."""
    q, scales, weight = codes_and_scales()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, quant.INNER_K_TILES)
    linear = Int4Linear(packed, scales, None, K)
    x = torch.randn(130, K, generator=torch.Generator().manual_seed(1))

    def close(y, ref, bound):
        err = ((y - ref).abs().max() / ref.abs().max()).item()
        assert err < bound, (torch.backends.cpu.get_cpu_capability(), err, bound)

    # one token: the int4 kernel with bf16 activations
    close(linear(x[:1]), x[:1].bfloat16().float() @ weight.T, 1e-2)
    # a prefill chunk: dequantized where the layout is known (exact weights), the kernel elsewhere; the
    # GEMM in float32, or in bf16 on a CPU with native bf16 math (forced both ways here: the inputs and
    # the output rounded to bf16, as the kernel rounds them)
    exact = linear.layout is not None
    chosen = quant.prefill_dtype
    try:
        for dtype, bound in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
            quant.prefill_dtype = lambda dtype=dtype: dtype
            close(linear(x), x @ weight.T, bound if exact else 1e-2)
            if exact:
                assert torch.equal(quant.dequantize(packed, scales, K, linear.layout, dtype), weight.to(dtype))
                with quant.prefill_scratch():  # kept buffers: the same values, the same memory each call
                    first = quant.dequantize(packed, scales, K, linear.layout, dtype)
                    assert torch.equal(first, weight.to(dtype)) and torch.equal(linear(x), linear(x))
                    again = quant.dequantize(packed, scales, K, linear.layout, dtype)
                    assert again.data_ptr() == first.data_ptr() and torch.equal(again, weight.to(dtype))
    finally:
        quant.prefill_dtype = chosen
    # row slices, on and off the layout's blocks, by both paths
    for start, end in [(0, 64), (64, 192), (32, 80), (16, 48), (176, 192)]:
        part = linear.rows(start, end)
        close(part(x[:1]), linear(x[:1])[:, start:end], 1e-2)  # the kernel rounds its output to bf16
        close(part(x), linear(x)[:, start:end], 1e-2)  # a part off the layout's blocks takes the kernel
    # quantizing a float weight: each value moves at most half a step of its group (plus bf16 rounding)
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(2))
    packed2, scales2 = quant.quantize_int4(w)
    y = Int4Linear(packed2, scales2, None, K)(torch.eye(K))  # column j: the weights that input j meets
    step = (w.view(N, K // GROUP, GROUP).amax(-1) - w.view(N, K // GROUP, GROUP).amin(-1)) / 15
    assert ((y.T - w).abs() <= (step.repeat_interleave(GROUP, 1) * 0.5 + 0.02 * w.abs().max())).all()


def test_int4_linear_on_this_cpu():
    check_int4()


def test_prefill_runs_in_bf16_where_the_cpu_has_native_bf16(monkeypatch, request):
    """bf16 GEMMs for a prefill chunk where torch reports AVX512-BF16 or AMX-BF16 (1.4-2.2x the float32
    GEMM there); float32 where bf16 would be emulated, and where this torch cannot say."""
    request.addfinalizer(CHOSEN_PREFILL_DTYPE.cache_clear)  # recomputed for this CPU after the test
    for found, native in CPU_REPORTS:
        report_cpu(monkeypatch, found)
        CHOSEN_PREFILL_DTYPE.cache_clear()
        assert CHOSEN_PREFILL_DTYPE() == (torch.bfloat16 if native else torch.float32), found


def test_bf16_prefill_keeps_the_perplexity_of_float32(smollm, monkeypatch):
    """The bundled model's perplexity on 1000 tokens of the default text, prefilled in chunks of 250
    with bf16 GEMMs, within 1% of float32's (measured 0.05% over 2000 tokens); a wrong weight layout or
    scale read in the bf16 route moves it by far more than that."""
    import math

    from sinkchat.bench import default_text, text_ids
    from sinkchat.bench.stream import Stream, nll
    from sinkchat.kv import SinkCache

    ids = text_ids(smollm.tokenizer, default_text(), 1001)

    def perplexity(dtype):
        monkeypatch.setattr(quant, "prefill_dtype", lambda: dtype)
        stream, scores = Stream(smollm.model, SinkCache.for_model(smollm.model, 4, 1008)), []
        for a in range(0, 1000, 250):
            scores += nll(stream.forward(ids[a : a + 250], keep=0), ids[a + 1 : a + 251])
        return math.exp(sum(scores) / len(scores))

    f32, bf16 = perplexity(torch.float32), perplexity(torch.bfloat16)
    assert 2 < f32 < 100 and abs(bf16 / f32 - 1) < 0.01, (f32, bf16)


@pytest.mark.parametrize("flavour", ["default", "avx2", "avx512"])
def test_int4_linear_on_each_cpu_flavour(flavour):
    env = {**os.environ, "ATEN_CPU_CAPABILITY": flavour, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    code = "import torch, test_quant; print(torch.backends.cpu.get_cpu_capability()); test_quant.check_int4()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    assert out.stdout.split()[0].lower() in {flavour, "avx2", "default"}  # capped at what the CPU has


FAULTS = """
import resource, sys
from sinkchat.bench import default_text, text_ids
from sinkchat.bench.stream import Stream
from sinkchat.kv import SinkCache
from sinkchat.model import load

loaded = load("smollm2-135m", quant="auto", device="cpu", compile="off")
ids = text_ids(loaded.tokenizer, default_text(), 500)
for _ in range(2):
    stream = Stream(loaded.model, SinkCache.for_model(loaded.model, 4, 508))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    stream.forward(ids, keep=1)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.model
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc, Linux's page-fault counter")
def test_a_prefill_reuses_memory_rather_than_paging_in_fresh(tmp_path):
    """A chat's second 500-token prefill (a fresh process, the bundled model) touches few new pages: its
    dequantized weights go into kept buffers and its activations come from malloc's heap. Measured
    6,300 page faults; 51,000 with glibc's default thresholds, 230,000 with a fresh tensor per
    dequantized weight (a third of the prefill's time)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env = {k: v for k, v in env.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    first, second = map(int, out.stdout.split())
    assert second < 25_000, (first, second)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_malloc_settings_of_the_users_own_win(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert quant.keep_heap_pages() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")
    assert quant.keep_heap_pages() is False

