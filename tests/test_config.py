"""config.toml (no model): values written back keep the user's comments; unreadable files are named."""

from __future__ import annotations

import os
import stat

import pytest

from _helpers import one_line_error, run_cli
from sinkchat import config
from sinkchat.errors import SinkchatError


def test_remembering_a_value_keeps_comments_and_other_keys():
    path = config.config_file()
    path.parent.mkdir(parents=True)
    path.write_text('# my settings\nwindow = 4000  # long chats\nmodel = "mistral-7b"\n[extra]\nx = 1\n')
    config.save_config_value("theme", "sinkchat-light")
    config.save_config_value("window", 3000)
    text = path.read_text()
    assert "# my settings" in text and "# long chats" in text and "[extra]" in text
    assert config.load_config() == {"window": 3000, "model": "mistral-7b", "theme": "sinkchat-light",
                                    "extra": {"x": 1}}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not list(path.parent.glob(".*.tmp"))


def test_a_config_that_is_not_utf8_or_toml_is_one_error_naming_it():
    path = config.config_file()
    path.parent.mkdir(parents=True)
    for data in (b"window = \xff\n", b"window = = 3\n"):
        path.write_bytes(data)
        with pytest.raises(SinkchatError, match=f"cannot read config file {path}"):
            config.load_config()


def test_a_symlink_at_the_temp_name_is_not_followed(tmp_path):
    path = config.config_file()
    path.parent.mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    os.symlink(victim, path.with_name(f".{path.name}.{os.getpid()}.tmp"))
    with pytest.raises(SinkchatError, match="cannot write config file .*File exists"):
        config.save_config_value("theme", "x")
    assert victim.read_text() == "keep me"


def test_a_config_that_starts_with_a_bom_is_read():
    """Windows editors start a UTF-8 file with a byte-order mark; it is not part of the TOML."""
    path = config.config_file()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\xef\xbb\xbfwindow = 64\n")
    assert config.load_config() == {"window": 64}
    config.save_config_value("theme", "sinkchat-light")
    assert config.load_config() == {"window": 64, "theme": "sinkchat-light"}
    path.write_bytes(b"\xef\xbb\xbfwindow = 0\n")  # read, then checked: refused before any model loads
    one_line_error(run_cli("--plain"), f"{path}: window must be 1 or more (got 0)")


@pytest.mark.parametrize("line, shown", [
    ("window = true", "window must be an integer (got true)"),
    ("[window]\nx = 1", "window must be an integer (got the table {x = 1})"),
    ('window = [1, "a"]', 'window must be an integer (got [1, "a"])'),
    ("window = 1979-05-27", "window must be an integer (got 1979-05-27)"),
    ("temperature = nan", "temperature must be a finite number (got nan)"),
    ("keep_system = 1", "keep_system must be true or false (got 1)"),
    ('model = {name = "x y", "a b" = false}', 'model must be text (got the table {name = "x y", "a b" = false})'),
])
def test_a_wrong_value_in_the_config_is_shown_as_toml(line, shown):
    """What a config file holds is shown as it is written there (true, a table), not as Python."""
    path = config.config_file()
    path.parent.mkdir(parents=True)
    path.write_text(line + "\n")
    one_line_error(run_cli("--plain"), f"{path}: {shown}")
