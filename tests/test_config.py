"""The agent's config: precedence, defaults, one-line errors, the TOML file, the CLI."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from mesh import config
from mesh.cli.agent import agent
from mesh.config import AgentConfig, HostPort, PeerSpec, load
from mesh.errors import ConfigError


@pytest.fixture(autouse=True)
def no_default_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep a real /etc/meshsync/agent.toml of the test machine out of every test."""
    monkeypatch.setattr(config, "DEFAULT_CONFIG_FILE", tmp_path / "absent" / "agent.toml")


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def load_error(flags: dict[str, object | None], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(flags, env or {}, hostname="node-1")
    message = str(info.value)
    assert "\n" not in message
    return message


# Defaults ---------------------------------------------------------------------------


def test_defaults_need_only_a_hostname() -> None:
    cfg = load({}, {}, hostname="node-1")
    assert cfg.node_id == "node-1"
    assert cfg.cluster == "meshsync"
    assert (cfg.data_dir, cfg.state_dir) == (Path("/data"), Path("/var/lib/meshsync"))
    assert cfg.pki_dir == Path("/run/secrets/meshsync")
    assert cfg.listen == HostPort("0.0.0.0", 8883)
    assert cfg.tunnel_listen == HostPort("0.0.0.0", 8873)
    assert cfg.advertise is None
    assert cfg.peers == ()
    assert cfg.dns_interval == 10.0
    assert cfg.metrics_listen == HostPort("127.0.0.1", 9108)
    assert (cfg.lsyncd_delay, cfg.lsyncd_pace) == (0.0, 0.4)
    assert (cfg.batch_quiet, cfg.batch_cap) == (0.02, 0.5)
    assert (cfg.log_format, cfg.log_level) == ("human", "info")
    assert cfg.config_file is None
    assert cfg == AgentConfig(node_id="node-1")


def test_derived_paths() -> None:
    cfg = AgentConfig(node_id="n1", data_dir=Path("/d"), state_dir=Path("/s"))
    assert cfg.state_db == Path("/s/state.db")
    assert cfg.gate_socket == Path("/s/gate.sock")
    assert cfg.keep_dir == Path("/d/.mesh-keep")
    assert cfg.status_file == Path("/s/agent.json")


def test_config_is_frozen() -> None:
    cfg = AgentConfig(node_id="n1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.node_id = "n2"  # type: ignore[misc]


def test_a_hostname_that_is_no_node_id_names_node_id() -> None:
    with pytest.raises(ConfigError, match=r"^node_id \(hostname\): 'x{70}' is invalid"):
        load({}, {}, hostname="x" * 70)


def test_tunnel_listen_defaults_to_the_listen_host() -> None:
    assert load({"listen": "10.0.0.5:1883"}, {}, hostname="n").tunnel_listen == HostPort(
        "10.0.0.5", 8873
    )
    cfg = load({"listen": "[::1]:0", "tunnel_listen": ":0"}, {}, hostname="n")
    assert cfg.tunnel_listen == HostPort("::1", 0)
    assert AgentConfig(node_id="n", listen=HostPort("127.0.0.2", 0)).tunnel_listen == HostPort(
        "127.0.0.2", 8873
    )


def test_port_zero_is_allowed_for_listeners() -> None:
    cfg = load(
        {"listen": "127.0.0.1:0", "tunnel_listen": "127.0.0.1:0", "metrics_listen": "off"},
        {},
        hostname="n",
    )
    assert (cfg.listen.port, cfg.tunnel_listen.port, cfg.metrics_listen) == (0, 0, None)


# Precedence -------------------------------------------------------------------------

PRECEDENCE = [
    # setting, TOML value, env value, flag value, attribute of each, as parsed
    ("cluster", '"from-file"', "from-env", "from-flag", ("from-file", "from-env", "from-flag")),
    (
        "listen",
        '"10.0.0.1:1"',
        "10.0.0.2:2",
        "[::1]:3",
        (HostPort("10.0.0.1", 1), HostPort("10.0.0.2", 2), HostPort("::1", 3)),
    ),
    ("dns_interval", "1.5", "2", "3", (1.5, 2.0, 3.0)),
    (
        "peers",
        '["a", "dns:tasks.mesh"]',
        "b:9",
        "",
        (
            (PeerSpec("static", "a"), PeerSpec("dns", "tasks.mesh")),
            (PeerSpec("static", "b", 9),),
            (),
        ),
    ),
    ("log_format", '"json"', "human", "JSON", ("json", "human", "json")),
    ("data_dir", '"/f"', "/e", "/g", (Path("/f"), Path("/e"), Path("/g"))),
]


@pytest.mark.parametrize(("name", "in_file", "in_env", "in_flag", "expected"), PRECEDENCE)
def test_flag_beats_env_beats_file(
    tmp_path: Path,
    name: str,
    in_file: str,
    in_env: str,
    in_flag: str,
    expected: tuple[object, object, object],
) -> None:
    path = write_toml(tmp_path, f"{name} = {in_file}\n")
    env_name = config.SETTINGS[name].env
    from_file = load({"config_file": str(path)}, {}, hostname="n")
    from_env = load({"config_file": str(path)}, {env_name: in_env}, hostname="n")
    from_flag = load({"config_file": str(path), name: in_flag}, {env_name: in_env}, hostname="n")
    got = tuple(getattr(cfg, name) for cfg in (from_file, from_env, from_flag))
    assert got == expected
    assert from_file.config_file == path


def test_flag_left_at_none_and_empty_env_var_are_not_given(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'cluster = "from-file"\n')
    cfg = load({"config_file": str(path), "cluster": None}, {"MESH_CLUSTER": ""}, hostname="n")
    assert cfg.cluster == "from-file"


def test_env_names_the_config_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'node_id = "filed"\n')
    assert load({}, {"MESH_CONFIG": str(path)}, hostname="n").node_id == "filed"


def test_default_config_file_is_read_if_it_exists(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = write_toml(tmp_path, "batch_cap = 2\n")
    monkeypatch.setattr(config, "DEFAULT_CONFIG_FILE", path)
    cfg = load({}, {}, hostname="n")
    assert (cfg.batch_cap, cfg.config_file) == (2.0, path)


# The config file ----------------------------------------------------------------------


def test_unknown_key_in_the_file_is_refused(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'lisen = "0.0.0.0:1"\n')
    message = load_error({"config_file": str(path)})
    assert message == f"config file {path}: unknown key 'lisen' (did you mean 'listen'?)"


@pytest.mark.parametrize("text", ["config_file = 'x'\n", "[agent]\nlisten = 'a:1'\n"])
def test_keys_that_are_no_file_setting_are_refused(tmp_path: Path, text: str) -> None:
    path = write_toml(tmp_path, text)
    assert "unknown key" in load_error({"config_file": str(path)})


def test_a_file_that_is_not_toml_is_one_line(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "listen = \n")
    assert load_error({"config_file": str(path)}).startswith(f"config file {path}: not valid TOML")


def test_a_missing_file_given_explicitly_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert load_error({"config_file": str(missing)}) == (
        f"config_file (--config): {str(missing)!r} does not exist"
    )
    assert load_error({}, {"MESH_CONFIG": str(missing)}).startswith("config_file (MESH_CONFIG)")


def test_a_wrong_type_in_the_file_names_the_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "dns_interval = true\n")
    assert load_error({"config_file": str(path)}) == (
        f"dns_interval ({path}): True is invalid; expected a number of seconds, over 0 to 3600"
    )


# Validation: one line naming the setting -------------------------------------------------

BAD_VALUES = [
    ("node_id", "-lead"),
    ("node_id", "has space"),
    ("cluster", "Upper"),
    ("cluster", "x" * 64),
    ("data_dir", "relative/dir"),
    ("state_dir", ""),
    ("pki_dir", "pki"),
    ("listen", "0.0.0.0"),
    ("listen", "::1:8883"),
    ("listen", "[::1:8883"),
    ("listen", "host:65536"),
    ("listen", "host:-1"),
    ("listen", "bad_host!:1"),
    ("listen", ":8883"),
    ("listen", "300.1.1.1:1"),
    ("tunnel_listen", "h:x"),
    ("advertise", "host:8883"),
    ("peers", "a:0"),
    ("peers", "dns:"),
    ("peers", "dns:name:port"),
    ("peers", "dns:10.0.0.1"),
    ("peers", "ok,not ok"),
    ("dns_interval", "0"),
    ("dns_interval", "ten"),
    ("dns_interval", "inf"),
    ("dns_interval", "3601"),
    ("metrics_listen", "on"),
    ("lsyncd_delay", "-1"),
    ("lsyncd_pace", "-0.1"),
    ("lsyncd_pace", "soon"),
    ("batch_quiet", "nan"),
    ("batch_cap", "-0.5"),
    ("max_clock_skew", "0"),
    ("stalled_after", "-1"),
    ("log_format", "xml"),
    ("log_level", "loud"),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_a_bad_flag_is_one_line_naming_setting_and_flag(name: str, value: str) -> None:
    message = load_error({name: value})
    assert message.startswith(f"{name} ({config.SETTINGS[name].flag}): ")
    assert " is invalid; expected " in message


# An empty env var counts as not set, so it cannot be a bad value.
@pytest.mark.parametrize(("name", "value"), [(n, v) for n, v in BAD_VALUES if v])
def test_a_bad_env_var_is_one_line_naming_setting_and_env_var(name: str, value: str) -> None:
    env_name = config.SETTINGS[name].env
    assert load_error({}, {env_name: value}).startswith(f"{name} ({env_name}): ")


def test_the_message_shows_the_value_and_what_is_expected() -> None:
    assert load_error({"listen": "[::1]:99999"}) == (
        "listen (--listen): '[::1]:99999' is invalid; expected a port number 0-65535 after the ':'"
    )
    assert load_error({"log_level": "loud"}) == (
        "log_level (--log-level): 'loud' is invalid; expected one of "
        "debug, info, warning, error, critical"
    )


@pytest.mark.parametrize(
    ("changes", "start"),
    [
        ({"batch_quiet": 0.6, "batch_cap": 0.5}, "batch_quiet: 0.6 is invalid"),
        ({"tunnel_listen": HostPort("", 8883)}, "tunnel_listen: '0.0.0.0:8883' is invalid"),
        (
            {"listen": HostPort("127.0.0.1", 9108)},
            "metrics_listen: '127.0.0.1:9108' is invalid",
        ),
        ({"node_id": "a/b"}, "node_id: 'a/b' is invalid"),
        ({"peers": (42,)}, "peers: 42 is invalid"),
    ],
)
def test_a_config_built_directly_checks_itself(changes: dict[str, object], start: str) -> None:
    fields: dict[str, object] = {"node_id": "n", **changes}
    with pytest.raises(ConfigError) as info:
        AgentConfig(**fields)  # type: ignore[arg-type]
    assert str(info.value).startswith(start)
    assert "\n" not in str(info.value)


# Addresses and peer entries -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "spec", "shown"),
    [
        ("dns:tasks.meshsync", PeerSpec("dns", "tasks.meshsync", 8883), "dns:tasks.meshsync:8883"),
        ("dns:tasks.stack_mesh:1884", PeerSpec("dns", "tasks.stack_mesh", 1884), None),
        ("node2", PeerSpec("static", "node2", 8883), "node2:8883"),
        ("10.0.0.2:1", PeerSpec("static", "10.0.0.2", 1), None),
        ("[fd00::2]", PeerSpec("static", "fd00::2", 8883), "[fd00::2]:8883"),
        ("[fd00::2]:9", PeerSpec("static", "fd00::2", 9), None),
    ],
)
def test_peer_entries_parse_and_print_back(text: str, spec: PeerSpec, shown: str | None) -> None:
    assert PeerSpec.parse(text) == spec
    assert str(spec) == (shown or text)
    assert PeerSpec.parse(str(spec)) == spec


def test_peers_list_skips_blanks_and_duplicates() -> None:
    cfg = load({"peers": " a , ,dns:t, a:8883,"}, {}, hostname="n")
    assert cfg.peers == (PeerSpec("static", "a"), PeerSpec("dns", "t"))


def test_host_port_prints_ipv6_in_brackets() -> None:
    assert str(HostPort.parse("[::]:8883")) == "[::]:8883"
    assert str(HostPort("0.0.0.0", 1)) == "0.0.0.0:1"


# The CLI ----------------------------------------------------------------------------------


def cli_app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """A throwaway app that registers the agent the way mesh.cli will."""

    app.command("agent")(agent)
    return app


def test_cli_config_error_is_one_line_and_exit_2() -> None:
    result = CliRunner().invoke(cli_app(), ["agent", "--node-id", "n", "--listen", "nowhere"])
    assert result.exit_code == 2
    assert result.stderr == (
        "error: listen (--listen): 'nowhere' is invalid; "
        "expected HOST:PORT, as 0.0.0.0:8883 or [::]:8883\n"
    )
    assert "Traceback" not in result.output


def test_cli_reads_env_through_config_load() -> None:
    runner = CliRunner(env={"MESH_DNS_INTERVAL": "0"})
    result = runner.invoke(cli_app(), ["agent", "--node-id", "n"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: dns_interval (MESH_DNS_INTERVAL): '0' is invalid")
    assert result.stderr.count("\n") == 1


def test_cli_runs_the_agent_with_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[AgentConfig] = []
    node = types.ModuleType("mesh.engine.agent")
    node.run_agent = started.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mesh.engine.agent", node)
    runner = CliRunner(env={"MESH_CLUSTER": "from-env", "MESH_PEERS": "a"})
    args = ["agent", "--node-id", "n1", "--peers", "dns:tasks.m", "--batch-cap", "1"]
    result = runner.invoke(cli_app(), args)
    assert result.exit_code == 0, result.output
    [cfg] = started
    assert (cfg.node_id, cfg.cluster, cfg.batch_cap) == ("n1", "from-env", 1.0)
    assert cfg.peers == (PeerSpec("dns", "tasks.m"),)


def test_cli_help_lists_every_setting() -> None:
    result = CliRunner(env={"COLUMNS": "300"}).invoke(cli_app(), ["agent", "--help"])
    assert result.exit_code == 0
    for setting in config.SETTINGS.values():
        assert setting.flag in result.output
        assert setting.env in result.output


AGENT_ALONE = """
import atexit, sys
atexit.register(lambda: print(sorted(m for m in sys.modules if m.startswith("mesh.cli.")),
                              file=sys.stderr))
sys.argv = ["mesh", *sys.argv[1:]]
from mesh.cli import main
main()
"""


@pytest.mark.parametrize(("args", "code"), [
    (["agent", "--help"], 0),
    (["agent", "--node-id", "n", "--listen", "nowhere"], 2),
    (["agent", "--no-such-flag"], 2),
])
def test_mesh_agent_is_built_alone_and_says_the_same(args: list[str], code: int) -> None:
    """``mesh agent`` (``mesh.cli.main``) builds no other command: their modules cost
    the agent's start, a restart's critical path, 0.15 s. Its help and its errors
    are the ones the whole app gives."""
    env = {**os.environ, "COLUMNS": "300"}
    alone = subprocess.run([sys.executable, "-c", AGENT_ALONE, *args], capture_output=True,
                           text=True, env=env, timeout=60, check=False)
    assert alone.returncode == code, alone.stderr
    loaded = alone.stderr.strip().splitlines()[-1]
    assert loaded == "['mesh.cli.agent']", loaded
    whole = CliRunner(env={"COLUMNS": "300"}).invoke(cli_app(), args)
    assert whole.exit_code == code
    if code == 0:
        def body(text: str) -> list[str]:  # but the usage line, which names the program
            return [line for line in text.splitlines() if "Usage:" not in line]

        assert body(alone.stdout) == body(whole.output)
        for setting in config.SETTINGS.values():
            assert setting.flag in alone.stdout and setting.env in alone.stdout
    elif "nowhere" in args:
        assert alone.stderr.splitlines()[0] == whole.stderr.strip()
