import re

from coordinator.status_page import render_page, svg_line_plot

NOW = 1_700_000_000.0


def _status():
    peer = lambda pid, name, stage, state: {  # noqa: E731
        "id": pid, "name": name, "stage": stage, "device": "cuda:0 RTX 3090", "state": state,
        "last_seen": NOW - 3, "throughput": 4.5, "microbatches": 17,
        "bytes_sent": {"activations": 1_000_000, "gradients": 258_000}, "bytes_received": {"activations": 2048},
    }
    return {
        "run": "run-42", "model": {"preset": "gptj-tiny", "n_layer": 8, "n_embd": 256, "parameters": 12_345_678},
        "round": 12, "current_round": 13, "phase": "waiting", "reason": "stage 1 has no replica",
        "loss": 3.21, "tokens": 1_234_567, "tokens_per_second": 890.5, "samples_dropped": 2,
        "peers": [peer("peer-aaa", "alice", 0, "online"), peer("peer-bbb", "bob", 0, "online"),
                  peer("peer-ccc", "carol", 1, "gone")],
        "stages": [{"index": 0, "layers": [0, 4], "replicas": 2, "online": 2, "throughput": 9.0},
                   {"index": 1, "layers": [4, 8], "replicas": 1, "online": 0, "throughput": 0.0}],
        "checkpoints": [{"round": 10, "path": "checkpoints/round-000010", "tokens": 1_000_000, "loss": 3.3,
                         "url": "http://coord:8000/checkpoints/round-000010/", "bytes": 50_000_000}],
        "wire": {"activations": {"bytes": 1000, "uncompressed_bytes": 4000},
                 "gradients": {"bytes": 0, "uncompressed_bytes": 0}},
        "progress": {"microbatches_target": 64, "microbatches_done": 30, "microbatches_dropped": 1, "in_flight": 4},
        "now": NOW,
    }


def _rounds(n=12):
    return [{"round": i + 1, "loss": 5.0 - 0.1 * i, "tokens": 100_000, "samples": 200, "dropped": i % 2,
             "duration": 30.0, "tokens_per_second": 3000.0 + i} for i in range(n)]


def _svg(page, svg_id):
    m = re.search(rf'<svg id="{svg_id}".*?</svg>', page, re.S)
    assert m, svg_id
    return m.group(0)


def test_realistic_page():
    page = render_page(_status(), _rounds())
    assert '<meta http-equiv="refresh" content="5">' in page
    for pid in ("peer-aaa", "peer-bbb", "peer-ccc"):
        assert pid in page
    assert 'id="peers"' in page and 'id="stage-map"' in page
    assert _svg(page, "loss-plot").count('<circle class="point"') == 12
    assert "stage 0" in page and "stage 1" in page and "blocks 0–3" in page and "blocks 4–7" in page
    assert "warning" in page and "no replica" in page
    assert "1.2 MiB" in page and "3s ago" in page
    assert "http://coord:8000/checkpoints/round-000010/manifest.json" in page
    assert "http://coord:8000/checkpoints/round-000010/config.json" in page
    assert "4.00×" in page and "–" in page
    assert "<script" not in page.lower() and "http-equiv" in page


def test_history_table_shows_last_20_but_plot_has_all():
    page = render_page(_status(), _rounds(300))
    assert _svg(page, "loss-plot").count('<circle class="point"') == 300
    table = re.search(r'<table id="rounds">.*?</table>', page, re.S).group(0)
    assert table.count("<tr>") == 21


def test_empty_input():
    page = render_page({}, [])
    assert "no data yet" in page and 'id="loss-plot"' in page
    assert render_page(None, None)


def test_missing_and_none_fields():
    status = {"peers": [{"id": "p", "bytes_sent": None, "last_seen": None}], "stages": [{"online": None}, "x"],
              "checkpoints": [{"url": None}], "wire": {"x": None}, "loss": None, "model": "odd", "progress": None}
    page = render_page(status, [{"round": 1, "loss": None}, {}])
    assert "no data yet" in page


def test_peer_name_is_escaped():
    status = _status()
    status["peers"][0]["name"] = "<script>alert(1)</script>"
    page = render_page(status, _rounds())
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_svg_plot_few_points():
    assert "no data yet" in svg_line_plot([(1, 2.0)], 300, 200, "t", "y")
    svg = svg_line_plot([(1, 2.0), (2, 1.0)], 300, 200, "t", "y")
    assert "<polyline" in svg and svg.count('class="point"') == 2
