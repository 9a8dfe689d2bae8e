"""Settings: one home for every default and check; layers resolve in order and bad values name their source."""

from __future__ import annotations

import dataclasses
import math
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sinkchat import cli, config
from sinkchat.settings import SettingError, Settings, help_for

FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def test_layers_resolve_defaults_config_saved_flags_in_that_order():
    s, warnings = Settings.resolve(
        {"window": 300, "sinks": None},  # a None flag is "not given"
        config={"window": 100, "sinks": 2, "top_k": 7},
        saved={"window": 200, "sinks": 3},
    )
    assert (s.window, s.sinks, s.top_k, s.max_new_tokens) == (300, 3, 7, Settings().max_new_tokens)
    assert warnings == []


def test_unknown_config_key_is_a_warning_naming_it():
    s, warnings = Settings.resolve(config={"windw": 64}, config_source="/x/config.toml")
    assert s == Settings()
    assert warnings == ["/x/config.toml: unknown setting 'windw' (ignored)"]


@pytest.mark.parametrize(
    "layer, key, value, message",
    [
        ("config", "window", "64", 'cfg.toml: window must be an integer (got "64")'),
        ("config", "sinks", 2.5, "cfg.toml: sinks must be an integer (got 2.5)"),
        ("config", "sinks", True, "cfg.toml: sinks must be an integer (got true)"),
        ("config", "keep_system", "yes", 'cfg.toml: keep_system must be true or false (got "yes")'),
        ("config", "model", 3, "cfg.toml: model must be text (got 3)"),
        ("saved", "window", 0, "chat 3: window must be 1 or more (got 0)"),
        ("flags", "temperature", math.nan, "--temperature must be a finite number (got nan)"),
        ("flags", "temperature", math.inf, "--temperature must be a finite number (got inf)"),
        ("flags", "temperature", 1e9, "--temperature must be at most 100 (got 1000000000.0)"),
        ("flags", "top_p", 0.0, "--top-p must be in (0, 1] (got 0.0)"),
        ("flags", "quant", "3bit", '--quant must be one of auto, 4bit, int4, nf4, 8bit, none (got "3bit")'),
        ("flags", "max_new_tokens", 10**12, "--max-new-tokens must be at most 10000000 (got 1000000000000)"),
        ("flags", "seed", -1, "--seed must be 0 or more (got -1)"),
        ("flags", "evict", "messages", '--evict must be one of tokens, turns (got "messages")'),
        ("flags", "pin_max", -1, "--pin-max must be 0 or more (got -1)"),
        ("flags", "pin_max", 1001, "--pin-max must be at most half the window, 1000 (got 1001)"),
        ("config", "pin_max", 1200, "cfg.toml: pin_max must be at most half the window, 1000 (got 1200)"),
        ("flags", "recall", 2048, "--recall must be at most the window, 2000 (got 2048)"),
        ("config", "recall", 4096, "cfg.toml: recall must be at most the window, 2000 (got 4096)"),
    ],
)
def test_bad_values_name_their_source(layer, key, value, message):
    kwargs = {"config": {}, "saved": {}, "flags": {}}
    kwargs[layer] = {key: value}
    with pytest.raises(SettingError) as err:
        Settings.resolve(kwargs["flags"], config=kwargs["config"], config_source="cfg.toml",
                         saved=kwargs["saved"], saved_source="chat 3")
    assert str(err.value) == message


# any value of a type other than the field's own is refused with one line naming the field
ANY = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=8),
                st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))


@given(name=st.sampled_from(sorted(FIELDS)), value=ANY)
def test_every_field_takes_only_values_of_its_type_and_range(name, value):
    try:
        s, _ = Settings.resolve(config={name: value}, config_source="config.toml")
    except SettingError as exc:
        assert str(exc).startswith(f"config.toml: {name} ") and "\n" not in str(exc)
        return
    got = getattr(s, name)
    kind = str(FIELDS[name].type).removesuffix(" | None")
    assert got == value or (value is None and got == FIELDS[name].default)
    assert value is None or not isinstance(value, bool) or kind == "bool"
    assert value is None or type(value).__name__ == kind or (kind == "float" and isinstance(value, int))


def test_pin_budget_is_a_quarter_of_the_window_unless_set():
    assert Settings(window=64).pin_budget == 16 and Settings(window=64, pin_max=0).pin_budget == 0
    with pytest.raises(SettingError, match="pin_max must be at most half the window, 32"):
        Settings(window=64, pin_max=40)
    with pytest.raises(SettingError) as caught:  # a smaller window for a chat saved with a budget
        Settings.resolve({"window": 32}, saved={"pin_max": 32}, saved_source="chat 1's saved settings")
    assert str(caught.value) == ("chat 1's saved settings: pin_max must be at most half the window, 16 (got 32) "
                                 "for --window; give --pin-max too")


def test_recall_larger_than_a_resumed_chats_window_names_both_flags():
    with pytest.raises(SettingError) as caught:
        Settings.resolve({"window": 64}, saved={"recall": 128}, saved_source="chat 1's saved settings")
    assert str(caught.value) == ("chat 1's saved settings: recall must be at most the window, 64 (got 128) "
                                 "for --window; give --recall too")
    assert Settings.resolve({"window": 64, "recall": 64}, saved={"recall": 128})[0].recall == 64


def test_recall_and_window_from_one_config_file_is_one_plain_error():
    """Both values from the same file: no "for <the file>: window; give --recall too" (it read as if the window
    came from somewhere else)."""
    with pytest.raises(SettingError) as caught:
        Settings.resolve(config={"window": 32, "recall": 64}, config_source="/home/u/config.toml")
    assert str(caught.value) == "/home/u/config.toml: recall must be at most the window, 32 (got 64)"
    with pytest.raises(SettingError) as caught:  # the window from a flag, recall from the file: say both
        Settings.resolve({"window": 32}, config={"recall": 64}, config_source="/home/u/config.toml")
    assert str(caught.value) == ("/home/u/config.toml: recall must be at most the window, 32 (got 64) "
                                 "for --window; give --recall too")


def test_settings_are_frozen_and_checked_on_replace():
    s = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.window = 5  # type: ignore[misc]
    with pytest.raises(SettingError, match="window must be 1 or more"):
        s.replace(window=0)


def test_saved_fields_exclude_presentation():
    assert "theme" not in Settings().saved()
    assert {"model", "sinks", "window", "temperature", "seed"} <= Settings().saved().keys()


def test_help_shows_the_default_from_the_one_place():
    assert help_for("window").endswith("[default: 2000]")
    assert help_for("keep_system").endswith("[default: false]")


def run(monkeypatch, capsys, *args) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["sinkchat", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.run()
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "toml, message",
    [
        ('window = "64"\n', 'window must be an integer (got "64")'),
        ("sinks = 2.5\n", "sinks must be an integer (got 2.5)"),
        ("temperature = nan\n", "temperature must be a finite number (got nan)"),
        ("window = [1, 2\n", "cannot read config file"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_the_file(monkeypatch, capsys, toml, message):
    path = config.config_file()
    path.parent.mkdir(parents=True)
    path.write_text(toml)
    code, err = run(monkeypatch, capsys, "--plain")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("sinkchat: error: ") and str(path) in err and message in err


def test_resume_needs_a_positive_chat_number(monkeypatch, capsys):
    for bad in ("abc", "0", "-3", "١"):  # Arabic-Indic one: a digit to str.isdigit, not a chat number
        code, err = run(monkeypatch, capsys, "--plain", f"--resume={bad}")
        assert code == 2 and "--resume takes a chat number" in err, err
