"""The GPU checks (scripts/check_gpu_tui.py, scripts/bench_gpu.py) are ready to run in one command:
where there is no CUDA they say so in one line and measure nothing; on the CPU, check_gpu_tui's dry
run drives the real chat screen and plain mode and reads the header's tokens/s."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from _helpers import ROOT

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


@no_cuda
@pytest.mark.parametrize("name", ["check_gpu_tui.py", "bench_gpu.py"])
def test_without_cuda_a_gpu_check_says_so_and_measures_nothing(name):
    proc = script(f"scripts/{name}")
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA device here" in proc.stderr and "nothing was measured" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.slow  # the chat screen under Pilot and plain mode, two replies each: a minute on 2 cores
def test_check_gpu_tui_dry_run_reads_the_header_and_compares_with_plain_mode(tmp_path):
    report = tmp_path / "tui.json"
    proc = script("scripts/check_gpu_tui.py", "--device", "cpu", "--shape", "tiny", "--replies", "2",
                  "--max-new-tokens", "12", "--json", str(report))
    assert proc.returncode in (0, 1) and "did not finish" not in proc.stdout, proc.stdout + proc.stderr
    assert re.search(r"TUI header [0-9.]+ tok/s, plain mode [0-9.]+ tok/s", proc.stdout), proc.stdout
    doc = json.loads(report.read_text())
    assert [r["tokens"] for r in doc["tui"]["replies"]] == [12, 12]  # greedy on random weights: no early end
    assert all(r["header_tokens_per_s"] > 0 for r in doc["tui"]["replies"])
    assert doc["tui"]["model_threads"] == [doc["tui"]["decode_thread"]]  # one thread ran the model
    assert doc["tui_vs_plain"] == pytest.approx(doc["tui_median_tokens_per_s"] / doc["plain_median_tokens_per_s"])
    assert (proc.returncode == 0) == (doc["tui_vs_plain"] >= 0.9)
