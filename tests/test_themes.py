"""Theme files (no model): shipped ones parse; a broken one is named with a reason a person can act on."""

from __future__ import annotations

import pytest

from sinkchat.tui import themes


def test_shipped_themes_parse_with_gauge_colours():
    found, problems = themes.discover([themes.shipped_dir()])
    assert problems == []
    assert {"sinkchat-dark", "sinkchat-light", "sinkchat-contrast", "sinkchat-moss"} <= set(found)
    for theme in found.values():
        assert set(themes.GAUGE_DEFAULTS) <= set(theme.variables), theme.name


@pytest.mark.parametrize(
    "text, reason",
    [
        ('primary = "not-a-colour"\n', 'primary = "not-a-colour" is not a colour'),
        ('name = "x"\n', "missing the required key 'primary'"),
        ('primary = "#fff"\nsparkle = 1\n', "unknown key(s) sparkle"),
        ('primary = "#fff"\nvariables = 3\n', "[variables] must be a table"),
        ('primary = "#fff"\n[variables]\ngauge-sink = "nope"\n', 'variables.gauge-sink = "nope" is not a colour'),
        ("primary = \n", "not valid TOML"),
        ('primary = "#fff"\ndark = "yes"\n', 'dark = "yes" must be true or false'),
    ],
)
def test_a_broken_theme_is_reported_and_skipped(tmp_path, text, reason):
    (tmp_path / "bad.toml").write_text(text)
    (tmp_path / "good.toml").write_text('primary = "#ff8800"\n')
    found, problems = themes.discover([tmp_path])
    assert set(found) == {"good"}
    [problem] = problems
    assert problem.path == tmp_path / "bad.toml" and reason in problem.text()


def test_a_user_theme_overrides_a_shipped_one(tmp_path):
    (tmp_path / "mine.toml").write_text('name = "sinkchat-dark"\nprimary = "#010203"\n')
    found, _ = themes.discover([themes.shipped_dir(), tmp_path])
    assert found["sinkchat-dark"].primary == "#010203"
