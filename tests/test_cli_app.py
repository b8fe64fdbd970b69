"""The CLI shell: lazy command loading must agree with what the command modules register."""

from __future__ import annotations


from lorahub.cli import app as app_mod


def _registered():
    app_mod._load_commands()
    out = {}
    for c in app_mod.app.registered_commands:
        out[c.name or c.callback.__name__] = c.callback.__module__.rsplit(".", 1)[1]
    for g in app_mod.app.registered_groups:
        cmds = g.typer_instance.registered_commands
        out[g.name] = cmds[0].callback.__module__.rsplit(".", 1)[1]
    return out


def test_command_index_matches_registration():
    assert _registered() == app_mod.COMMAND_INDEX
    assert set(app_mod.COMMAND_INDEX.values()) == set(app_mod.COMMAND_MODULES)


def test_every_command_has_help_and_home(cli):
    for name in app_mod.COMMAND_INDEX:
        r = cli(name, "--help")
        assert r.returncode == 0, (name, r.stderr)
        if name != "captions":
            assert "--home" in r.stdout, name


def test_lazy_main_runs_only_the_needed_module(cli, tmp_path):
    r = cli("search", "anything", "--json", home=tmp_path / "h")
    assert r.returncode == 0, r.stderr
    r = cli("no-such-command")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("lorahub ")
