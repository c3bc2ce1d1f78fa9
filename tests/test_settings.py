"""Settings from the environment: parsers, *_FILE secrets, folders, and every long-running command's
options read from variables (so a start command without a shell works)."""

from __future__ import annotations

import argparse
import os
import shlex
import tomllib
from pathlib import Path

import pytest

from dynabase import cli
from dynabase.backends.secrets_pg import SecretsKeyring
from dynabase.engine.runtime import EngineSettings
from dynabase.options import resolve_env_defaults
from dynabase.settings import (
    SettingsError,
    cache_dir,
    data_dir,
    env_bool,
    env_duration,
    env_float,
    env_int,
    env_list,
    secret_from_env,
    state_dir,
)

from .conftest import ROOT

LONG_RUNNING = ("headless", "operator", "proxy", "pgbouncer-agent", "webhooks")
KEY = "q5Yk3m2dJYl0hm6pR3d1b0xg0kYp0k2m8wqN1wz2m4M="  # base64 of 32 bytes, for tests only


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what each test sets: none of the developer's or the devstack's variables."""
    for name in list(os.environ):
        if name.startswith(("DYNABASE_", "XDG_")) or name == "PORT":
            monkeypatch.delenv(name)


def parse(argv: list[str]) -> argparse.Namespace:
    args = cli.build_parser().parse_args(argv)
    resolve_env_defaults(args)
    return args


# -- parsers ------------------------------------------------------------------------------------------

def test_values_parse_and_blank_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("A", " 12 ")
    monkeypatch.setenv("B", "2.5")
    monkeypatch.setenv("C", "Yes")
    monkeypatch.setenv("D", "1h30m")
    monkeypatch.setenv("E", "a, b,,c")
    monkeypatch.setenv("BLANK", "  ")
    assert env_int("A", 1) == 12 and env_float("B", 1.0) == 2.5 and env_bool("C", False) is True
    assert env_duration("D", 0) == 5400 and env_list("E") == ["a", "b", "c"]
    monkeypatch.setenv("D", "45")
    assert env_duration("D", 0) == 45
    assert env_int("BLANK", 7) == 7 and env_duration("UNSET", 30) == 30 and env_list("BLANK") == []


@pytest.mark.parametrize(("reader", "value", "expected"), [
    (lambda: env_int("N", 8, minimum=1), "eight", "expected a whole number of at least 1"),
    (lambda: env_int("N", 8, minimum=1), "0", "expected a whole number of at least 1"),
    (lambda: env_float("N", 1.5, minimum=0), "-1", "expected a number of at least 0"),
    (lambda: env_bool("N", False), "maybe", "expected true or false"),
    (lambda: env_duration("N", 30), "10 minutes", "expected a duration such as 30, 30s, 10m"),
])
def test_a_bad_value_names_the_variable_the_value_and_the_fix(
        monkeypatch: pytest.MonkeyPatch, reader: object, value: str, expected: str) -> None:
    monkeypatch.setenv("N", value)
    with pytest.raises(SettingsError) as caught:
        reader()  # type: ignore[operator]
    message = str(caught.value)
    assert message.startswith(f"N={value!r}: {expected}") and "e.g. N=" in message and "default" in message


def test_secrets_come_from_the_variable_or_its_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("s3cr3t-value\n")
    assert secret_from_env("TOKEN") is None
    monkeypatch.setenv("TOKEN_FILE", str(secret))
    assert secret_from_env("TOKEN") == "s3cr3t-value"
    monkeypatch.setenv("TOKEN", "other-value")
    with pytest.raises(SettingsError, match="TOKEN and TOKEN_FILE are both set") as both:
        secret_from_env("TOKEN")
    assert "value" not in str(both.value)
    monkeypatch.delenv("TOKEN")
    monkeypatch.setenv("TOKEN_FILE", str(tmp_path / "absent"))
    with pytest.raises(SettingsError, match=r"TOKEN_FILE=.*absent: cannot read it \(No such file"):
        secret_from_env("TOKEN")


def test_folders_follow_xdg_and_an_empty_variable_is_not_the_working_directory(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "dynabase"
    assert data_dir() == tmp_path / "home" / ".local" / "share" / "dynabase"
    assert state_dir() == tmp_path / "home" / ".local" / "state" / "dynabase"
    for variable in ("XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME"):
        monkeypatch.setenv(variable, "")
    assert cache_dir() == tmp_path / "home" / ".cache" / "dynabase"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # invalid per the XDG spec: ignored
    assert cache_dir().is_absolute() and cache_dir() == tmp_path / "home" / ".cache" / "dynabase"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    assert cache_dir() == tmp_path / "xdg-cache" / "dynabase"
    assert data_dir() == tmp_path / "xdg-data" / "dynabase" and state_dir() == tmp_path / "xdg-state" / "dynabase"
    monkeypatch.setenv("DYNABASE_CACHE_DIR", str(tmp_path / "explicit"))
    assert cache_dir() == tmp_path / "explicit"
    # The devstack's binary cache is the same folder.
    from dynabase.devstack import binaries

    assert binaries.cache_dir() == tmp_path / "explicit"


# -- command-line options from the environment ----------------------------------------------------------

def test_railways_start_command_runs_verbatim_with_its_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Railway runs the start command in exec form: no ${VAR} expansion, so it names none."""
    deploy = tomllib.loads((ROOT / "railway.toml").read_text())["deploy"]
    argv = shlex.split(deploy["startCommand"])
    assert argv[0] == "dynabase" and not any("$" in word for word in argv)
    monkeypatch.setenv("PORT", "4321")
    monkeypatch.setenv("DYNABASE_GITOPS_URL", "https://git.example/ops.git")
    monkeypatch.setenv("DYNABASE_GITOPS_REF", "production")
    monkeypatch.setenv("DYNABASE_INTERVAL", "1m")
    monkeypatch.setenv("DYNABASE_CONFIRM_DELETION", "1h")
    args = parse(argv[1:])
    assert (args.source, args.ref, args.port, args.interval, args.confirm_deletion) == (
        "https://git.example/ops.git", "production", 4321, 60.0, 3600.0)
    assert (args.host, args.subdir) == ("0.0.0.0", "")


def test_flags_win_over_variables_and_defaults_apply_without_either(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "4321")
    monkeypatch.setenv("DYNABASE_GITOPS_URL", "/srv/gitops")
    assert parse(["headless", "--port", "9000"]).port == 9000
    monkeypatch.setenv("DYNABASE_REDIS_URL", "redis://r:6379/0")
    monkeypatch.setenv("DYNABASE_PROXY_LISTEN", "127.0.0.1:6543")
    monkeypatch.setenv("DYNABASE_PROXY_BUSY_POLL_US", "300")
    proxy = parse(["proxy"])
    assert (proxy.listen, proxy.redis_url, proxy.busy_poll_us, proxy.metrics_port) == (
        ("127.0.0.1", 6543), "redis://r:6379/0", 300, 9187)
    monkeypatch.setenv("DYNABASE_NAMESPACES", "team-a,team-b")
    monkeypatch.setenv("DYNABASE_DRIFT_INTERVAL", "5m")
    operator = parse(["operator"])
    assert (operator.namespace, operator.drift_interval, operator.concurrency) == (["team-a", "team-b"], 300.0, 8)
    assert parse(["operator", "--namespace", "only"]).namespace == ["only"]
    monkeypatch.setenv("DYNABASE_PGBOUNCER_UPSTREAM_HOST", "/run/postgresql")
    monkeypatch.setenv("HOME", "/home/someone")
    agent = parse(["pgbouncer-agent"])
    assert (agent.postgres_host, agent.postgres_port, agent.workdir) == (
        "/run/postgresql", 5432, "/home/someone/.local/state/dynabase/pgbouncer")
    monkeypatch.setenv("DYNABASE_WEBHOOKS_CONFIG", "/etc/dynabase/tiers.yaml")
    webhooks = parse(["webhooks"])
    assert webhooks.listen == ("0.0.0.0", 4321) and webhooks.mode == "kube"  # $PORT, as Railway gives it
    monkeypatch.setenv("DYNABASE_WEBHOOKS_LISTEN", "127.0.0.1:8088")
    assert parse(["webhooks"]).listen == ("127.0.0.1", 8088)


@pytest.mark.parametrize(("argv", "variable", "value", "expected"), [
    (["headless", "--source", "x"], "PORT", "http", "expected a whole number from 0 to 65535"),
    (["proxy", "--redis-url", "redis://r"], "DYNABASE_PROXY_BUSY_POLL_US", "20000",
     "expected a whole number from 0 to 10000"),
    (["operator"], "DYNABASE_DRIFT_INTERVAL", "soon", "expected a duration"),
    (["webhooks", "--config", "c.yaml"], "DYNABASE_WEBHOOKS_MODE", "svn", "expected one of kube, git"),
])
def test_a_bad_variable_stops_the_command_with_its_name(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        argv: list[str], variable: str, value: str, expected: str) -> None:
    monkeypatch.setenv(variable, value)
    assert cli.main(argv) == cli.EXIT_INVALID
    err = capsys.readouterr().err
    assert f"dynabase {argv[0]}: {variable}={value!r}: {expected}" in err


def test_a_required_option_names_its_flag_and_variable(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["headless"]) == cli.EXIT_INVALID
    assert "--source is required: pass it or set DYNABASE_GITOPS_URL" in capsys.readouterr().err
    assert cli.main(["proxy"]) == cli.EXIT_INVALID
    assert "--redis-url is required: pass it or set DYNABASE_REDIS_URL" in capsys.readouterr().err


def test_a_bad_flag_is_refused_by_argparse_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["headless", "--interval", "often"])
    assert "argument --interval: 'often': expected a duration" in capsys.readouterr().err


def test_every_option_of_a_long_running_command_names_its_variable() -> None:
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name in LONG_RUNNING:
        for action in commands[name]._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and "[$" in action.help, f"{name} {action.option_strings[0]}: {action.help}"


# -- where tenant passwords go ------------------------------------------------------------------------------

def test_headless_keeps_passwords_in_postgres_with_a_key_and_refuses_files_nobody_chose(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DYNABASE_POSTGRES_DSN", "postgresql://localhost/postgres")
    with pytest.raises(SettingsError, match="DYNABASE_SECRETS_KEY") as refused:
        EngineSettings.from_env(headless=True)
    assert "openssl rand -base64 32" in str(refused.value)
    assert EngineSettings.from_env().secrets_store == "files"  # plan/apply: a one-off run on this machine
    monkeypatch.setenv("DYNABASE_SECRETS_DIR", str(tmp_path))  # a folder chosen (a volume): files
    assert EngineSettings.from_env(headless=True).secrets_store == "files"
    monkeypatch.delenv("DYNABASE_SECRETS_DIR")
    assert EngineSettings.from_env(headless=True, secrets_store="files").secrets_store == "files"
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    monkeypatch.setenv("DYNABASE_SECRETS_KEY_FILE", str(key_file))
    settings = EngineSettings.from_env(headless=True)
    assert settings.secrets_store == "postgres" and settings.secrets_keyring is not None
    assert KEY not in repr(settings)
    monkeypatch.delenv("DYNABASE_SECRETS_KEY_FILE")
    monkeypatch.setenv("DYNABASE_SECRETS_STORE", "postgres")
    with pytest.raises(SettingsError, match="DYNABASE_SECRETS_STORE=postgres needs DYNABASE_SECRETS_KEY"):
        EngineSettings.from_env()


@pytest.mark.parametrize(("key", "expected"), [
    ("not base64!", "key 1 is not base64 (11 characters)"),
    ("c2hvcnQ=", "key 1 decodes to 5 bytes, not 32"),
    (KEY + ",", "key 2 is empty"),
])
def test_a_bad_key_is_refused_without_showing_it(key: str, expected: str) -> None:
    with pytest.raises(SettingsError) as caught:
        SecretsKeyring.parse(key)
    message = str(caught.value)
    assert message.startswith(f"DYNABASE_SECRETS_KEY: {expected}") and "openssl rand -base64 32" in message
    assert key.rstrip(",") not in message


def test_keys_may_be_urlsafe_or_unpadded_and_the_first_seals() -> None:
    urlsafe = KEY.replace("+", "-").replace("/", "_").rstrip("=")
    other = "A" * 43 + "="
    ring = SecretsKeyring.parse(f"{urlsafe}, {other}")
    old = SecretsKeyring.parse(other)
    sealed_by, sealed = old.seal("ns/t", "pw")
    assert ring.open("ns/t", sealed_by, sealed) == "pw"  # an older key still opens its rows
    assert ring.seal("ns/t", "pw")[0] == SecretsKeyring.parse(KEY).primary_id != sealed_by


def test_without_a_home_the_folders_ask_for_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """An image's numeric user may have neither HOME nor a passwd entry: never fall back to the working directory."""
    import pwd

    def no_entry(uid: int) -> pwd.struct_passwd:
        raise KeyError(uid)

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    with pytest.raises(SettingsError, match=r"no home folder for ~/\.cache: set HOME, or XDG_CACHE_HOME"):
        cache_dir()
    monkeypatch.setenv("XDG_STATE_HOME", "/var/lib/dynabase/state")
    assert state_dir() == Path("/var/lib/dynabase/state/dynabase")
