"""The bootstrap's hand-written option parsing (``python -m snakepit_bridge``)."""

from __future__ import annotations

import pytest

from snakepit_bridge._cli import parse_args


def test_options_then_the_rest_is_left_for_the_script() -> None:
    ns = parse_args(["--script", "w.py", "--", "--x", "y"])
    assert ns == {"script": "w.py", "module": None, "adapter": None, "zygote": False, "rest": ["--x", "y"]}
    ns = parse_args(["--zygote", "--module=pkg.mod", "--adapter", "A", "a", "--b"])
    assert ns == {"script": None, "module": "pkg.mod", "adapter": "A", "zygote": True, "rest": ["a", "--b"]}


@pytest.mark.parametrize(
    "argv",
    [[], ["--script", "a", "--module", "b"], ["--script"], ["--bogus", "--script", "a"], ["--adapter", "A"]],
)
def test_bad_command_lines_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert "usage: python -m snakepit_bridge" in capsys.readouterr().err
