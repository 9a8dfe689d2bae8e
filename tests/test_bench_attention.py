"""`sinkchat bench attention`: its shares are the ones a direct reading of `output_attentions` gives,
the bundled model leans on its first tokens, the CLI's JSON and plot are what users get, the result
reaches the chat's help (F1), and a model that cannot give attention weights is one clear line."""

from __future__ import annotations

import json

import pytest
import torch

from _helpers import SIZE, run_cli, tui_settings, wait_for
from sinkchat import bench
from sinkchat.bench import attention
from sinkchat.model import load
from sinkchat.store.attention import load_attention, result_path, save_attention
from sinkchat.tui.sinks_help import sinks_markdown

PNG = b"\x89PNG\r\n\x1a\n"


def no_tick(n: int) -> None:
    pass


@pytest.fixture(scope="module")
def tiny_mistral(tiny_models):
    """The tiny random Mistral with its query and key weights scaled up, so its attention is far from uniform
    and a share counted on the wrong keys or queries would show."""
    loaded = load(str(tiny_models["mistral"]), quant="none", device="cpu")
    with torch.no_grad():
        for layer in loaded.model.model.layers:
            layer.self_attn.q_proj.weight.mul_(12)
            layer.self_attn.k_proj.weight.mul_(12)
    return loaded


def test_shares_equal_a_direct_computation_from_output_attentions(tiny_mistral):
    """Several small forwards through a growing cache (a tiny byte budget forces 7 queries per forward) give
    the shares, per head, and the heat maps that one full forward's ``output_attentions`` gives directly."""
    model = tiny_mistral.model
    ids = bench.text_ids(tiny_mistral.tokenizer, bench.default_text(), 100)
    budget = 2 * 4 * 100 * 4 * 7  # layers x heads x keys x 4 bytes x 7 queries
    assert attention.query_chunk(model, len(ids), budget) == 7
    shares = attention.Shares(attention.layers_of(model))
    attention.measure(model, ids, no_tick, shares, budget)
    report = shares.report()
    assert model.config._attn_implementation == "sdpa"  # eager only while measuring

    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            weights = model(input_ids=torch.tensor([ids]), output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    for layer, w in enumerate(weights):
        later = w[0, :, 64:, :].double()  # [heads, queries after 63, keys]
        direct = torch.stack([later[..., :k].sum(-1).mean(-1) for k in (1, 4, 16)], -1)  # [heads, 3]
        assert direct[:, 2].max() - direct[:, 2].min() > 0.02  # heads differ: the comparison can tell them apart
        close = dict(rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(torch.tensor(report["layers"][layer]["heads"], dtype=torch.float64), direct, **close)
        torch.testing.assert_close(torch.tensor(report["layers"][layer]["share"], dtype=torch.float64), direct.mean(0),
                                   **close)
        torch.testing.assert_close(torch.tensor(report["maps"][str(layer)], dtype=torch.float64),
                                   w[0, :, :16, :16].double().mean(0), **close)
    uniform = [sum(min(k, q + 1) / (q + 1) for q in range(64, 100)) / 36 for k in (1, 4, 16)]
    assert report["uniform"] == pytest.approx(uniform)
    assert report["queries"] == 36 and report["tokens"] == 100 and report["heads"] == 4


def test_bundled_model_puts_far_more_than_uniform_attention_on_its_first_tokens(smollm_hf):
    """The observation StreamingLLM builds on, on the model sinkchat ships: on average over its layers, later
    queries put several times the uniform share on the first 4 tokens, and some layers more than half."""
    ids = bench.text_ids(smollm_hf.tokenizer, bench.default_text(), 128)
    shares = attention.Shares(attention.layers_of(smollm_hf.model))
    attention.measure(smollm_hf.model, ids, no_tick, shares)
    report = shares.report()
    first4 = report["firsts"].index(4)
    assert report["share"][first4] > 4 * report["uniform"][first4], report["share"]
    assert report["sink_layers"] and len(report["layers"]) == 30
    assert all(row[first4] <= 1 + 1e-6 for layer in report["layers"] for row in layer["heads"])


def test_attention_cli_json_png_and_the_chat_help(tiny_models, tmp_path):
    folder = str(tiny_models["mistral"])
    plot = tmp_path / "attention.png"
    r = run_cli("bench", "attention", "--model", folder, "--quant", "none", "--tokens", "80", "--json",
                "--plot", str(plot))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)  # stdout is only the JSON
    assert doc["tokens"] == 80 and doc["queries"] == 16 and doc["firsts"] == [1, 4, 16]
    assert len(doc["layers"]) == 2 and len(doc["layers"][0]["heads"]) == 4
    assert list(doc["maps"]) == ["0", "1"] and len(doc["maps"]["0"]) == 16
    assert all(0 <= v <= 1 for layer in doc["layers"] for v in layer["share"])
    assert plot.read_bytes()[:8] == PNG
    kept = load_attention(folder)
    assert kept is not None and kept["share"] == doc["share"]
    help_text = sinks_markdown(folder)
    assert "Measured on" in help_text and f"**{100 * doc['share'][1]:.0f}%**" in help_text


def test_model_without_attention_in_every_layer_is_one_line_and_exit_2(tiny_models):
    """LFM2 (RoPE; a convolution in place of attention in some layers) gives no weights for those layers."""
    r = run_cli("bench", "attention", "--model", str(tiny_models["lfm2"]), "--quant", "none", "--tokens", "80", "--json")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("sinkchat: error: lfm2 gives attention weights for 1 of "
                                                             "its 2 layers")


def test_help_explains_sinks_without_a_measurement_and_quotes_one_when_kept(tmp_path):
    text = sinks_markdown("smollm2-135m", tmp_path)
    assert text.startswith("## The gauge's sinks") and text.count("\n\n") == 2  # a heading and three lines
    assert "`sinkchat bench attention --model smollm2-135m`" in text
    report = {"firsts": [1, 4, 16], "share": [0.3, 0.42, 0.5], "uniform": [0.008, 0.033, 0.13], "from": 64,
              "tokens": 1024, "layers": [{}] * 30, "sink_layers": list(range(10)), "machine": {"quant": "4bit"}}
    path = save_attention(report, "smollm2-135m", tmp_path)
    assert path == tmp_path / "attention" / "smollm2-135m.json" and path.stat().st_mode & 0o777 == 0o600
    text = sinks_markdown("smollm2-135m", tmp_path)
    assert "Measured on smollm2-135m (4bit)" in text and "**42%**" in text and "3.3%" in text
    assert "10 of 30 layers" in text and text.count("\n\n") == 2
    path.write_text("{not json")
    assert "measures that share" in sinks_markdown("smollm2-135m", tmp_path)


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_f1_help_quotes_the_loaded_models_kept_result(smollm):
    from sinkchat.tui.app import SinkchatApp
    from sinkchat.tui.help import HelpScreen

    report = {"firsts": [1, 4, 16], "share": [0.27, 0.278, 0.285], "uniform": [0.003, 0.012, 0.046], "from": 64,
              "tokens": 1024, "layers": [{}] * 30, "sink_layers": [14, 18, 25, 26], "machine": {"quant": "4bit"}}
    save_attention(report, "smollm2-135m")  # the data dir the app's store uses
    app = SinkchatApp(tui_settings(), loaded=smollm)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat is not None)
        await pilot.press("f1")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        assert "The gauge's sinks" in app.screen.about and "**28%**" in app.screen.about
        assert "4 of 30 layers" in app.screen.about


def test_result_files_are_named_safely_per_model(tmp_path):
    assert result_path("HuggingFaceTB/SmolLM2-360M-Instruct", tmp_path).parent == tmp_path / "attention"
    assert "/" not in result_path("org/name", tmp_path).name
    assert result_path("org/name", tmp_path) != result_path("org_name", tmp_path)
    folder = tmp_path / "my model"
    folder.mkdir()
    assert result_path(str(folder), tmp_path) == result_path(str(folder / ".." / "my model"), tmp_path)
    assert result_path("../../etc/passwd", tmp_path).parent == tmp_path / "attention"
