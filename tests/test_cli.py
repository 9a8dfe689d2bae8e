"""The command line as users meet it: the plain chat in a pipe, model loading, and every bad input."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from _helpers import ROOT, one_line_error, run_cli
from sinkchat import cli, config
from sinkchat.model import bundled_gguf, gguf_folder, load


def sinkchat(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the real console-script entry point in this process (no model is loaded for flag errors)."""
    monkeypatch.setattr(sys, "argv", ["sinkchat", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.run()
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return exit_info.value.code or 0, out, err


@pytest.mark.model  # a subprocess loads the bundled model
def test_plain_chat_in_a_pipe_prints_replies_and_one_cache_line_each():
    proc = run_cli(
        "--plain", "--temperature", "0", "--window", "48", "--max-new-tokens", "16",
        input="What is the capital of France?\nAnd of Italy?\n\nThanks!\n",
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    status = [line for line in lines if line.startswith("[cache] ")]
    assert len(status) == 3  # three non-empty lines in, three replies out
    assert "Paris" in lines[0]
    assert lines[1].startswith("[cache] ")
    assert "evicted" in status[-1] and "[4, " in status[-1]  # window 48 was overrun: spans are listed
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sinks", "-1"], "--sinks must be 0 or more"),
        (["--window", "0"], "--window must be 1 or more"),
        (["--window", "9000"], "exceeds smollm2-135m's context of 8192"),
        (["--top-p", "2"], "--top-p must be in (0, 1]"),
        (["--temperature", "-1"], "--temperature must be 0 or more"),
        (["--temperature", "1e400"], "--temperature must be a finite number (got inf)"),
        (["--top-k", "-1"], "--top-k must be 0 or more"),
        (["--block", "0"], "--block must be 1 or more"),
        (["--window", "99999999999"], "--window must be at most 10000000"),
        (["--seed", str(2**64)], "--seed must be at most"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be 1 or more"),
        (["--system", "caf\udce9"], "--system must be valid UTF-8 text"),
        (["--model", "\x1b]0;pwned\x07"], "unknown model"),
        (["--quant", "3bit"], "--quant must be one of"),
        (["--device", "tpu"], "--device must be one of"),
        (["--kv-dtype", "int8"], "--kv-dtype must be one of auto, float32, bfloat16, float16"),
        (["--compile", "maybe"], "--compile must be one of auto, on, off"),
        (["--sinks", "abc"], "Invalid value for '--sinks'"),
        (["--bogus"], "No such option: --bogus"),
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--model", "./missing.gguf"], "no such GGUF file"),
        (["--model", "./no/such/folder"], "no such model folder or file"),
        (["--model", "some-org/some-model"], "not in the local Hugging Face cache and HF_HUB_OFFLINE is set"),
        (["--model", "mistral-7b"], "`hf download mistralai/Mistral-7B-Instruct-v0.3`"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(monkeypatch, capsys, args, message):
    code, out, err = sinkchat(monkeypatch, capsys, "--plain", *args)
    assert code == 2
    assert err.startswith("sinkchat: error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert out == ""


def test_learned_positions_are_refused(monkeypatch, capsys, tiny_models):
    code, _, err = sinkchat(monkeypatch, capsys, "--plain", "--model", str(tiny_models["gpt2"]))
    assert code == 2 and "learned absolute position embeddings, not RoPE" in err


def test_recall_past_the_window_is_refused(monkeypatch, capsys):
    code, _, err = sinkchat(monkeypatch, capsys, "--plain", "--window", "256", "--recall", "512")
    assert code == 2 and err.strip() == "sinkchat: error: --recall must be at most the window, 256 (got 512)"


def test_folder_without_config_is_refused(monkeypatch, capsys, tmp_path):
    code, _, err = sinkchat(monkeypatch, capsys, "--plain", "--model", str(tmp_path))
    assert code == 2 and "has no config.json" in err


def test_a_bad_flag_in_a_real_process_has_no_traceback():
    proc = run_cli("--window", "-5")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "sinkchat: error: --window must be 1 or more (got -5)"


@pytest.mark.model  # a subprocess loads the bundled model
def test_sinks_zero_is_plain_window_attention(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("Hello!\n"))
    code, out, err = sinkchat(monkeypatch, capsys, "--plain", "--sinks", "0", "--window", "24", "-t", "0",
                              "--max-new-tokens", "24")
    assert code == 0, err
    status = out.splitlines()[-1]
    assert status.startswith("[cache] 0 + ") and "evicted" in status


def test_tiny_mistral_and_qwen2_folders_chat_from_the_command_line(tiny_models):
    for arch in ("mistral", "qwen2"):
        proc = run_cli("--plain", "--model", str(tiny_models[arch]), "--quant", "none", "--window", "16",
                       "-t", "0", "--max-new-tokens", "20", input="Hi\nMore\n")
        assert proc.returncode == 0, proc.stderr
        assert sum(line.startswith("[cache] ") for line in proc.stdout.splitlines()) == 2


@pytest.mark.parametrize("temperature", ["0", "0.7"])
def test_a_model_that_computes_nan_is_one_line(tiny_models, tmp_path, temperature):
    import json
    import shutil

    from _helpers import one_line_error

    folder = shutil.copytree(tiny_models["mistral"], tmp_path / "nan")
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = float("nan")
    (folder / "config.json").write_text(json.dumps(config))
    proc = run_cli("--plain", "--model", str(folder), "-t", temperature, "--no-save", input="Hi\n")
    one_line_error(proc, "NaN")


def test_models_lists_aliases_what_is_here_and_what_runs(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "250")
    code, out, _ = sinkchat(monkeypatch, capsys, "models")
    assert code == 0
    rows = {line.split()[0]: re.split(r"\s{2,}", line.strip()) for line in out.splitlines()[1:] if line.strip()}
    assert rows["smollm2-135m"][-2:] == ["yes", "gguf Q4_1 -> int4 g32 + fp16"]  # no download; its blocks as shipped
    assert rows["mistral-7b"][-2:] == ["download", "4bit"]
    assert {"llama3.1-8b", "qwen2.5-7b"} <= set(rows)


def test_gguf_is_converted_once_and_reused(smollm):
    folder = gguf_folder(bundled_gguf())
    stamp = (folder / "config.json").stat().st_mtime_ns
    notes: list[str] = []
    load("smollm2-135m", quant="none", device="cpu", progress=notes.append)
    assert not any("converting" in n for n in notes)
    assert (folder / "config.json").stat().st_mtime_ns == stamp


def test_the_resume_hint_names_a_data_dir_given_by_flag(tmp_path, monkeypatch):
    """`resume with: ...` must reopen the same chat when pasted back: a chat kept under --data-dir
    names it (quoted for the shell); one in the usual place does not."""
    import shlex

    from sinkchat.cli.main import _resume_hint
    from sinkchat.store import Store

    exe = script(tmp_path / "bin")
    monkeypatch.setattr(sys, "argv", [str(exe)])
    monkeypatch.setenv("PATH", f"{exe.parent}:/usr/bin:/bin")  # `sinkchat` is this program
    usual, elsewhere = Store(), Store(tmp_path / "my chats")
    try:
        assert _resume_hint(usual, 3) == "resume with: sinkchat --resume 3"
        hint = _resume_hint(elsewhere, 3, plain=True)
        assert shlex.split(hint.removeprefix("resume with: ")) == [
            "sinkchat", "--plain", "--resume", "3", "--data-dir", str((tmp_path / "my chats").resolve())]
    finally:
        usual.close()
        elsewhere.close()


def script(folder: Path) -> Path:
    """An executable named ``sinkchat`` in ``folder`` (a venv's bin)."""
    folder.mkdir(parents=True)
    exe = folder / "sinkchat"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    return exe


def test_the_program_is_named_as_a_shell_would_start_it(tmp_path, monkeypatch):
    """The command printed for the user (the resume hint) works as typed: `sinkchat` only when that
    name on PATH is this very program; else its path (a venv that is not activated, or another
    sinkchat earlier on PATH); under `python -m sinkchat`, this Python with -m."""
    exe, other = script(tmp_path / "venv" / "bin"), script(tmp_path / "old" / "bin")
    monkeypatch.setattr(sys, "argv", [str(exe)])
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # after `make chat`, without activating .venv
    assert config.program() == [str(exe)]
    monkeypatch.setenv("PATH", f"{other.parent}:{exe.parent}:/usr/bin")  # another sinkchat comes first
    assert config.program() == [str(exe)]
    monkeypatch.setenv("PATH", f"{exe.parent}:/usr/bin")  # activated
    assert config.program() == ["sinkchat"]
    monkeypatch.setattr(sys, "argv", [str(ROOT / "sinkchat" / "__main__.py")])
    assert config.program() == [sys.executable, "-m", "sinkchat"]


@pytest.mark.parametrize("group", ["chats", "bench"])
def test_a_command_group_alone_prints_its_help_as_help(group):
    """`sinkchat chats` with no subcommand shows the group's help on its lines (as typer does for
    no_args_is_help: on stderr, exit 2), the same text as `--help`, not flattened into an error line."""
    proc = run_cli(group)
    helped = run_cli(group, "--help")
    assert proc.returncode == 2 and helped.returncode == 0
    assert proc.stdout == "" and "sinkchat: error" not in proc.stderr
    assert proc.stderr.strip() == helped.stdout.strip() and proc.stderr.count("\n") > 5
    assert "\nCommands:\n" in proc.stderr


def test_a_model_path_that_is_neither_gguf_nor_folder_says_what_it_is(tmp_path):
    """--model naming a file that exists is not reported missing: it is the wrong kind of file."""
    text = tmp_path / "long.txt"
    text.write_text("not a model\n")
    fifo = tmp_path / "weights.gguf"
    os.mkfifo(fifo)
    one_line_error(run_cli("--plain", "--model", str(text)), f"{text} exists but is not a .gguf file or a model folder")
    one_line_error(run_cli("--plain", "--model", str(fifo)), f"{fifo} exists but is not a GGUF file")


@pytest.mark.model  # subprocesses load the bundled model
def test_without_python_headers_the_decode_step_still_compiles_without_warnings(tmp_path):
    """AOTInductor's code for the CPU's decode layer does not include ``Python.h``: where Python's
    headers are not installed, ``--compile auto`` still compiles the decode step, with the same two
    notices and no warning of inductor's on the terminal (the regional ``torch.compile`` before it
    tried for seconds, printed "Can't find Python.h" 7-9 times and decoded eagerly). The headers, and
    any compiled layer an earlier run kept, are hidden by mounting an empty folder over them in a mount
    namespace of the subprocess's own (root and unshare only)."""
    import shutil
    import sysconfig

    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("hiding Python's headers needs root and unshare")
    include = sysconfig.get_path("include")
    if not Path(include, "Python.h").exists():
        pytest.skip("no Python headers here to hide")
    empty = tmp_path / "empty"
    empty.mkdir()
    packages = config.cache_dir() / "aoti"
    packages.mkdir(parents=True, exist_ok=True)
    hide = ["unshare", "-m", "sh", "-c",
            f'mount --bind "{empty}" "{include}" && mount --bind "{empty}" "{packages}" && exec "$@"', "sh"]
    env = {"TORCH_COMPILE_DISABLE": "0", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    args = ("--plain", "-t", "0", "--window", "64", "--max-new-tokens", "2", "--no-save")
    auto = run_cli(*args, input="Hi\n", env=env, prefix=hide)
    assert auto.returncode == 0 and auto.stdout.strip(), auto.stderr
    first, done = auto.stderr.splitlines()
    assert first == "sinkchat: the first reply compiles the decode step (seconds the first time)"
    assert re.fullmatch(r"sinkchat: compiled the decode step in [0-9.]+ s \(kept on disk for the next start\)", done)
