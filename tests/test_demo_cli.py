"""`lorahub demo` never fills the registry that LORAHUB_HOME names (its --help promises a fresh home)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner


class FreshHomeChosen(Exception):
    pass


def test_demo_ignores_lorahub_home_from_the_environment(tmp_path, monkeypatch):
    from lorahub import demo as dm
    from lorahub.cli.app import _load_commands, app

    def chosen():
        raise FreshHomeChosen

    monkeypatch.setattr(dm, "fresh_home", chosen)
    _load_commands()
    home = tmp_path / "mine"
    r = CliRunner().invoke(app, ["demo"], env={"LORAHUB_HOME": str(home)})
    assert isinstance(r.exception, FreshHomeChosen), r.output
    assert not home.exists()


def test_demo_uses_a_home_given_on_the_command_line(tmp_path, monkeypatch):
    from lorahub import demo as dm
    from lorahub.cli.app import _load_commands, app

    class Reached(Exception):
        pass

    def fake_pipeline(kind):  # stop right after the home was chosen
        raise Reached

    monkeypatch.setattr(dm, "fresh_home", lambda: pytest.fail("a fresh home was made"))
    monkeypatch.setattr(dm, "pipeline", fake_pipeline)
    _load_commands()
    r = CliRunner().invoke(app, ["demo", "--home", str(tmp_path / "h")], env={"LORAHUB_HOME": str(tmp_path / "env")})
    assert isinstance(r.exception, Reached), r.output
    assert str(tmp_path / "h") in r.output
