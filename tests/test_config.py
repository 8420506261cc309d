"""Section 1, Config: the SETTINGS table resolved into a Config (flags > env > defaults), refusals of
unusable values, and the two views the table drives (`--help` and docs/configuration.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

import abstractgateway as gw
from processes import run_gateway

ROOT = Path(__file__).resolve().parents[1]


def _setting(name: str) -> gw.Setting:
    return next(s for s in gw.SETTINGS if s.name == name)


# -- the table ----------------------------------------------------------------------------------------


def test_every_setting_has_a_unique_name_env_var_and_flag_and_a_help_text():
    names = [s.name for s in gw.SETTINGS]
    envs = [s.env for s in gw.SETTINGS]
    flags = [s.flag for s in gw.SETTINGS if s.flag]
    assert len(set(names)) == len(names) and len(set(envs)) == len(envs) and len(set(flags)) == len(flags)
    assert all(env.startswith("ABSTRACTGATEWAY_") for env in envs)
    assert all(flag.startswith("--") for flag in flags)
    assert all(s.help.strip() for s in gw.SETTINGS)
    assert all(s.choices and s.default in s.choices for s in gw.SETTINGS if s.kind == "choice")


# -- resolution: flags > env > defaults ---------------------------------------------------------------


def test_defaults_come_from_the_table_and_computed_defaults_follow_the_data_dir(tmp_path):
    config = gw.Config.load(environ={"ABSTRACTGATEWAY_DATA_DIR": str(tmp_path)})
    assert config.data_dir == tmp_path and config.sources["data_dir"] == "env"
    assert config.db_path == tmp_path / "gateway.sqlite3" and config.sources["db_path"] == "default"
    assert config.flows_dir == tmp_path / "flows" and config.sources["flows_dir"] == "default"
    for setting in gw.SETTINGS:
        if not callable(setting.default) and setting.name != "data_dir":
            assert config.sources[setting.name] == "default", setting.name
            assert getattr(config, setting.name) == gw._parse_setting(setting, setting.default), setting.name


def test_the_default_data_dir_is_the_platforms_user_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    config = gw.Config.load(environ={})
    assert config.data_dir == tmp_path / "xdg" / "abstractgateway"
    assert config.db_path == tmp_path / "xdg" / "abstractgateway" / "gateway.sqlite3"


def test_a_flag_wins_over_the_env_which_wins_over_the_default(tmp_path):
    env = {"ABSTRACTGATEWAY_DATA_DIR": str(tmp_path), "ABSTRACTGATEWAY_PORT": "9001",
           "ABSTRACTGATEWAY_POLL_S": "0.5"}
    config = gw.Config.load(environ=env, overrides={"port": "9002", "tick_workers": None})
    assert (config.port, config.sources["port"]) == (9002, "flag")
    assert (config.poll_s, config.sources["poll_s"]) == (0.5, "env")
    # a flag left unset (None) is no override: the default stays
    assert (config.tick_workers, config.sources["tick_workers"]) == (4, "default")
    # an env var set to the empty string counts as unset
    config = gw.Config.load(environ={**env, "ABSTRACTGATEWAY_PORT": ""})
    assert (config.port, config.sources["port"]) == (8080, "default")


def test_config_replace_changes_only_the_settings_it_names(tmp_path):
    config = gw.Config.load(environ={"ABSTRACTGATEWAY_DATA_DIR": str(tmp_path), "ABSTRACTGATEWAY_POLL_S": "0.5"})
    changed = config.replace(store_backend="file")
    assert (changed.store_backend, config.store_backend) == ("file", "sqlite")
    assert changed.poll_s == 0.5 and changed.data_dir == config.data_dir and changed.sources == config.sources
    with pytest.raises(TypeError, match="no_such_setting"):
        config.replace(no_such_setting=1)


def test_a_flag_for_data_dir_moves_the_computed_paths_too(tmp_path):
    config = gw.Config.load(environ={"ABSTRACTGATEWAY_DATA_DIR": str(tmp_path / "env")},
                            overrides={"data_dir": str(tmp_path / "flag")})
    assert config.db_path == tmp_path / "flag" / "gateway.sqlite3"
    assert config.flows_dir == tmp_path / "flag" / "flows"


def test_the_os_environment_is_read_when_none_is_given(tmp_path, monkeypatch):
    monkeypatch.setenv("ABSTRACTGATEWAY_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ABSTRACTGATEWAY_TICK_MAX_STEPS", "7")
    config = gw.Config.load()
    assert config.tick_max_steps == 7 and config.sources["tick_max_steps"] == "env"


@pytest.mark.parametrize("raw, expected", [("1", True), ("true", True), ("YES", True), (" on ", True),
                                           ("0", False), ("false", False), ("No", False), ("off", False)])
def test_booleans_accept_the_usual_spellings(raw, expected):
    assert gw.Config.load(environ={"ABSTRACTGATEWAY_CONSOLE": raw}).console is expected


def test_values_are_parsed_to_their_kind(tmp_path):
    config = gw.Config.load(environ={"ABSTRACTGATEWAY_SQLITE_SYNCHRONOUS": "normal",
                                     "ABSTRACTGATEWAY_STORE_BACKEND": " File ",
                                     "ABSTRACTGATEWAY_LEASE_TTL_S": "ignored: not a setting",
                                     "ABSTRACTGATEWAY_RUNNER_LEASE_TTL_S": "2.5",
                                     "ABSTRACTGATEWAY_DB_PATH": "~/x.sqlite3"})
    assert config.synchronous == "NORMAL" and config.store_backend == "file"  # choices: case-insensitive
    assert config.lease_ttl_s == 2.5 and isinstance(config.lease_ttl_s, float)
    assert config.db_path == Path("~/x.sqlite3").expanduser()
    assert config.max_sse == 32 and isinstance(config.max_sse, int)


# -- validation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("env, value, says", [
    ("ABSTRACTGATEWAY_PORT", "http", "invalid literal"),
    ("ABSTRACTGATEWAY_POLL_S", "fast", "could not convert"),
    ("ABSTRACTGATEWAY_CONSOLE", "maybe", "expected a boolean"),
    ("ABSTRACTGATEWAY_STORE_BACKEND", "postgres", "expected one of sqlite, file"),
    ("ABSTRACTGATEWAY_TICK_WORKERS", "0", "must be at least 1"),
    ("ABSTRACTGATEWAY_PORT", "-1", "must be at least 0"),
    ("ABSTRACTGATEWAY_POLL_S", "0", "must be at least 0.001"),
    ("ABSTRACTGATEWAY_RUNNER_LEASE_TTL_S", "0.01", "must be at least 0.1"),
])
def test_an_unusable_value_is_refused_naming_the_variable(env, value, says):
    with pytest.raises(gw.ConfigError) as caught:
        gw.Config.load(environ={env: value})
    assert str(caught.value).startswith(f"{env}: ") and says in str(caught.value)
    assert value in str(caught.value)


def test_zero_is_allowed_where_the_table_says_so():
    config = gw.Config.load(environ={"ABSTRACTGATEWAY_PORT": "0", "ABSTRACTGATEWAY_LOCKOUT_MAX_S": "0",
                                     "ABSTRACTGATEWAY_AUDIT_LOG_MAX_BYTES": "0"})
    assert (config.port, config.lockout_max_s, config.audit_log_max_bytes) == (0, 0.0, 0)


def test_bad_mount_settings_are_refused_at_start(tmp_path):
    for value in ("noequals", f"bad name={tmp_path}", "rel=relative/dir", f"x={tmp_path / 'missing'}",
                  f"a={tmp_path};a={tmp_path}"):
        with pytest.raises(gw.ConfigError):
            gw.Config.load(environ={"ABSTRACTGATEWAY_WORKSPACE_MOUNTS": value})
    config = gw.Config.load(environ={"ABSTRACTGATEWAY_WORKSPACE_MOUNTS": f"a={tmp_path}\n# comment\nb={tmp_path}"})
    assert set(config.workspace_mounts) == {"a", "b"}


def test_mounts_resolve_symlinks_and_default_to_none(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert gw.Config.load(environ={}).workspace_mounts == {}
    config = gw.Config.load(environ={"ABSTRACTGATEWAY_WORKSPACE_MOUNTS": f" proj = {tmp_path / 'link'} "})
    assert config.workspace_mounts == {"proj": real}


def test_a_config_error_is_a_one_line_message_and_exit_2_on_the_command_line(tmp_path):
    out = run_gateway(["check", "--data-dir", str(tmp_path)],
                      env={"ABSTRACTGATEWAY_SQLITE_SYNCHRONOUS": "sometimes", "PATH": ""}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == ("abstractgateway: ABSTRACTGATEWAY_SQLITE_SYNCHRONOUS: expected one of FULL, NORMAL, "
                                  "got 'sometimes'")


# -- the views the table drives ------------------------------------------------------------------------


def test_help_lists_every_setting_with_its_default_from_the_table():
    parser = gw.build_parser()
    help_text = parser.format_help()
    assert gw.settings_table(markdown=False) in help_text
    for setting in gw.SETTINGS:
        line = next(line for line in help_text.splitlines() if line.split() and line.split()[0] == setting.env)
        assert line.split(None, 1)[1] == setting.describe_default()
    # each subcommand's flags come from the table too, and each flag's help names its env var
    subcommands = parser._subparsers._group_actions[0].choices
    helps = {name: " ".join(sub.format_help().split()) for name, sub in subcommands.items()}
    for setting in gw.SETTINGS:
        if setting.flag:
            offering = [name for name, text in helps.items() if f"{setting.flag} " in text]
            assert offering, f"{setting.flag} is on no subcommand"
            assert all(f"[env {setting.env}]" in helps[name] for name in offering), setting.flag
    assert "--port" in helps["serve"] and "--port" not in helps["backup"]


def test_command_line_flags_become_flag_sourced_settings(tmp_path):
    args = gw.build_parser().parse_args(["serve", "--data-dir", str(tmp_path), "--port", "0", "--tool-mode", "local",
                                         "--provider", "ollama", "--model", "m", "--llm-concurrency", "2"])
    config = gw._config_from_args(args)
    assert (config.data_dir, config.port, config.tool_mode, config.provider, config.model, config.llm_concurrency) == (
        tmp_path, 0, "local", "ollama", "m", 2)
    assert {config.sources[n] for n in ("data_dir", "port", "tool_mode", "provider", "model", "llm_concurrency")} == {
        "flag"}
    assert config.sources["host"] in ("default", "env")  # not given: not a flag
    with pytest.raises(SystemExit):  # argparse refuses a choice outside the table's
        gw.build_parser().parse_args(["serve", "--tool-mode", "remote"])


def test_docs_settings_table_matches_the_code():
    text = (ROOT / "docs" / "configuration.md").read_text()
    start, end = "<!-- settings-table:start -->\n", "\n<!-- settings-table:end -->"
    assert text[text.index(start) + len(start):text.index(end)] == gw.settings_table()
    # the installed entry point prints the same table
    help_text = run_gateway(["--help"], capture_output=True, text=True, timeout=60).stdout
    assert gw.settings_table(markdown=False) in help_text


def test_abstractflow_gateway_names_are_read_when_the_current_ones_are_unset():
    """Deployments carried over from AbstractFlow's gateway keep their environment, as on the original."""
    config = gw.Config.load(environ={
        "ABSTRACTFLOW_GATEWAY_AUTH_TOKEN": "legacy-token-0123456789abcdef", "ABSTRACTFLOW_RUNTIME_DIR": "/srv/old",
        "ABSTRACTFLOW_FLOWS_DIR": "/srv/flows", "ABSTRACTFLOW_PROVIDER": "ollama", "ABSTRACTFLOW_MODEL": "old-model",
        "ABSTRACTGATEWAY_MODEL": "new-model", "ABSTRACTFLOW_GATEWAY_RUNNER": "0",
        "ABSTRACTFLOW_GATEWAY_AUDIT_LOG": "0"})
    assert (config.auth_token, str(config.data_dir), str(config.flows_dir)) == (
        "legacy-token-0123456789abcdef", "/srv/old", "/srv/flows")
    assert (config.provider, config.model, config.runner) == ("ollama", "new-model", False)  # the current name wins
    assert config.audit_log is True  # as on the original, the audit settings have no older names
    assert config.sources["auth_token"] == "env (ABSTRACTFLOW_GATEWAY_AUTH_TOKEN)" and config.sources["model"] == "env"
