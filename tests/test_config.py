"""config.toml (no model): values written back keep the user's comments; unreadable files are named."""

from __future__ import annotations

import os
import stat

import pytest

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
