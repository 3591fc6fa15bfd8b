"""Bad input, as a new user types it: a clear message, a prompt non-zero exit, never a traceback; Ctrl-C always works."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from .swarm import ENV, ROOT, free_port


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def assert_refused(proc: subprocess.CompletedProcess, *phrases: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode not in (0, None), out
    assert "Traceback" not in out, out
    for phrase in phrases:
        assert phrase in out, f"{phrase!r} not in:\n{out}"


def test_coordinator_port_that_is_no_number():
    assert_refused(run("peer", "join", "--gpu", "cpu", "--coordinator", "127.0.0.1:abc"), "'abc' is not a number", "HOST:PORT")


def test_port_out_of_range():
    assert_refused(run("coordinator", "serve", "--port", "99999"), "--port must be a TCP port from 0 to 65535", "99999")
    assert_refused(run("peer", "join", "--coordinator", "127.0.0.1:70000"), "65535", "70000")


def test_unknown_model_fails_before_anything_is_written(tmp_path):
    state = tmp_path / "run"
    started = time.monotonic()
    proc = run("coordinator", "serve", "--model", "nope", "--state-dir", str(state))
    assert_refused(proc, "--model", "nope", "tiny", "gptj-6b")
    assert time.monotonic() - started < 30 and not state.exists()


def test_too_many_stages_fails_before_anything_is_written(tmp_path):
    state = tmp_path / "run"
    assert_refused(run("coordinator", "serve", "--stages", "9", "--state-dir", str(state)), "--stages 9", "4 blocks")
    assert not state.exists()


def test_toml_of_the_wrong_type_and_toml_that_is_not_toml(tmp_path):
    typed = tmp_path / "typed.toml"
    typed.write_text('stages = "two"\n')
    assert_refused(run("coordinator", "serve", "--config", str(typed)), "stages = 'two' should be a whole number")
    broken = tmp_path / "broken.toml"
    broken.write_text("stages = \n[[sources\n")
    assert_refused(run("coordinator", "serve", "--config", str(broken)), "is not valid TOML", str(broken))
    choice = tmp_path / "choice.toml"
    choice.write_text('sync-compression = "zip"\n')
    assert_refused(run("coordinator", "serve", "--config", str(choice)), "sync-compression = 'zip' should be one of")


def test_secrets_are_refused_on_the_command_line():
    assert_refused(run("coordinator", "serve", "--join-token", "hunter2"), "visible to every user", "--join-token-file", "HOMETRAIN_JOIN_TOKEN")
    assert_refused(run("peer", "join", "--join-token", "hunter2"), "--join-token-file")


def test_address_in_use_names_the_port(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run("coordinator", "serve", "--host", "127.0.0.1", "--port", "0", "--http-port", str(port), "--state-dir", str(tmp_path / "run"),
                   timeout=120)
    assert_refused(proc, f"127.0.0.1:{port}", "--http-port")


def test_coordinator_logs_json_when_asked_and_stops_on_ctrl_c(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "coordinator", "serve", "--log-format", "json", "--host", "127.0.0.1", "--port", "0",
                             "--http-port", "0", "--state-dir", str(tmp_path / "run")],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            entry = json.loads(line)  # every line is one JSON object
            assert {"time", "level", "logger", "message"} <= set(entry)
            if "status page" in entry["message"]:
                break
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "Traceback" not in rest
    assert_refused(run("coordinator", "demo", "--quiet", "--peers", "1", "--stages", "2"), "--peers 1 cannot fill --stages 2")


def test_a_connecting_peer_explains_itself_and_stops_on_the_first_ctrl_c():
    closed = free_port()  # nothing listens there
    proc = subprocess.Popen([sys.executable, "-m", "peer", "join", "--gpu", "cpu", "--coordinator", f"127.0.0.1:{closed}"],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait until it is in its retry loop
            line = proc.stdout.readline()
            lines.append(line)
            if "cannot reach the coordinator" in line:
                break
        else:
            pytest.fail("no retry message:\n" + "".join(lines))
        assert f"127.0.0.1:{closed}" in lines[-1] and "firewall" in lines[-1] and "--connect-timeout" in lines[-1]
        assert "retrying for another" in lines[-1] and "Ctrl-C" in lines[-1]
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        out, _ = proc.communicate(timeout=10)
        assert time.monotonic() - sent < 5, "the first Ctrl-C did not stop the peer within 5 s"
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in "".join(lines) + out
    assert proc.returncode == 0


@pytest.mark.swarm
def test_a_peer_that_cannot_download_its_weights_says_what_it_tried(tmp_path):
    """The coordinator names an address this peer cannot reach: the peer retries, explains, gives up cleanly.
    (From a pretrained start: a run from the seed needs no download.)"""
    from .swarm import Swarm, save_base_model

    base = save_base_model(tmp_path / "base")
    swarm = Swarm(tmp_path / "run", "--stages", "2", "--announce-host", "127.0.0.2", "--init-from", str(base))  # it listens on 127.0.0.1 only
    try:
        peer = swarm.add_peer("--stage", "0", "--connect-timeout", "4")
        code = peer.wait(timeout=120)
    finally:
        swarm.stop()
    log = (swarm.log_dir / "peer-0.log").read_text()
    assert code == 1, log
    assert "Traceback" not in log, log
    assert "http://127.0.0.2:" in log and "a firewall?" in log and "--announce-host" in log and "Retrying in" in log, log
    assert "giving up after --connect-timeout 4s" in log, log
