"""What the organiser watches: the status page in a real browser, and both /metrics endpoints."""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .swarm import ROOT, Swarm, free_port

pytestmark = pytest.mark.swarm
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    s = Swarm(tmp_path_factory.mktemp("observe"), "--stages", "2", "--rounds", "0", "--checkpoint-every", "3")
    s.peer_metrics_port = free_port()
    s.add_peer("--metrics-port", str(s.peer_metrics_port))
    s.add_peer()
    try:
        s.wait_for(lambda: s.status()["round"] >= 4, 180, "4 rounds")
        # Peers report their byte counters with their heartbeats.
        s.wait_for(lambda: s.status()["wire"]["activations"]["bytes"] > 0, 30, "a heartbeat with byte counters")
        yield s
    finally:
        s.stop()


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def check_conventions(found: dict) -> None:
    for name, family in found.items():
        assert name.startswith("hometrain_"), name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), name
        for sample in family.samples:
            for label in sample.labels:
                assert label not in ("peer", "peer_id", "id"), f"{name} has an unbounded label {label}"


def test_coordinator_metrics(swarm):
    text = fetch(f"http://127.0.0.1:{swarm.http_port}/metrics")
    found = families(text)
    check_conventions(found)
    expected = {
        "hometrain_build_info": "gauge", "hometrain_rounds": "counter", "hometrain_round_duration_seconds": "histogram",
        "hometrain_loss": "gauge", "hometrain_tokens": "counter", "hometrain_tokens_per_second": "gauge",
        "hometrain_samples_dropped": "counter", "hometrain_peers": "gauge", "hometrain_wire_bytes": "gauge",
        "hometrain_wire_uncompressed_bytes": "gauge", "hometrain_checkpoint_publish_seconds": "gauge",
        "hometrain_checkpoint_bytes": "gauge", "hometrain_rpc_errors": "counter",
    }
    for name, kind in expected.items():
        assert name in found, f"{name} missing from the coordinator's /metrics"
        assert found[name].type == kind, f"{name} is a {found[name].type}, expected {kind}"
    rounds = next(s for s in found["hometrain_rounds"].samples if s.name == "hometrain_rounds_total").value
    assert rounds >= 4
    online = {(s.labels["stage"], s.labels["state"]): s.value for s in found["hometrain_peers"].samples}
    assert online[("0", "online")] == 1 and online[("1", "online")] == 1
    activations = [s for s in found["hometrain_wire_bytes"].samples if s.labels == {"kind": "activations", "direction": "sent"}]
    assert activations and activations[0].value > 0


def test_peer_metrics(swarm):
    found = families(fetch(f"http://127.0.0.1:{swarm.peer_metrics_port}/metrics"))
    check_conventions(found)
    for name in ("hometrain_build_info", "hometrain_peer_stage", "hometrain_peer_microbatches", "hometrain_wire_bytes", "hometrain_wire_uncompressed_bytes"):
        assert name in found, f"{name} missing from the peer's /metrics"
    assert found["hometrain_peer_microbatches"].samples[0].value > 0


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) is not installed")
def test_promtool_accepts_both_endpoints(swarm):
    for url in (f"http://127.0.0.1:{swarm.http_port}/metrics", f"http://127.0.0.1:{swarm.peer_metrics_port}/metrics"):
        proc = subprocess.run(["promtool", "check", "metrics"], input=fetch(url), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{url}: {proc.stdout}{proc.stderr}"


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.mark.skipif(chromium() is None, reason="Chromium (Debian package chromium) is not installed")
def test_status_page_in_headless_chromium(swarm, tmp_path):
    url = f"http://127.0.0.1:{swarm.http_port}/"
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run([chromium(), *CHROMIUM_FLAGS, *profile, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    status = swarm.status()
    for peer in status["peers"]:
        assert peer["id"] in dom
    assert 'id="stage-map"' in dom and 'id="peers"' in dom
    plot = re.search(r'<svg[^>]*id="loss-plot".*?</svg>', dom, re.S)
    assert plot, "no loss plot on the page"
    assert len(re.findall(r'class="point"', plot.group(0))) >= 4, "the loss plot has fewer points than completed rounds"
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "status_page.png"
    subprocess.run([chromium(), *CHROMIUM_FLAGS, "--user-data-dir=" + str(tmp_path / "profile2"), "--hide-scrollbars",
                    "--window-size=1280,1800", f"--screenshot={shot}", url], capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000
