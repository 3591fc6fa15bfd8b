"""The evaluation queue: leases, hand-backs, refused results; and a volunteer's checked download of a checkpoint."""

from __future__ import annotations

import asyncio
import functools
import json
import math
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from coordinator.eval_runner import Evaluator, check_result
from peer.eval_worker import EvalError, fetch_checkpoint
from proto.run_config import EvalOptions

GOOD = {"round": 10, "perplexity": {"text": 12.5}, "accuracy": {"parity": {"acc": 0.5, "acc_norm": 0.75}}, "seconds": 3.0}


@pytest.fixture()
def queue(tmp_path):
    recorded: list[tuple[int, dict]] = []
    evaluator = Evaluator(EvalOptions(), lambda r, result: recorded.append((r, result)), local=False)
    for r in (10, 20, 30):
        (tmp_path / f"round-{r}").mkdir()
        evaluator.submit(r, tmp_path / f"round-{r}")
    return evaluator, recorded, tmp_path


def test_checkpoints_go_out_oldest_first_one_worker_each(queue):
    evaluator, recorded, _ = queue
    assert evaluator.take("a", now=0)[0] == 10 and evaluator.take("b", now=0)[0] == 20
    assert evaluator.pending() == [10, 20, 30]
    assert evaluator.finish("b", 10, GOOD) is not None, "a worker reported a round leased to another"
    assert evaluator.finish("a", 10, GOOD) is None and recorded == [(10, GOOD)]
    assert json.loads((queue[2] / "round-10" / "eval.json").read_text()) == GOOD  # kept beside the checkpoint
    assert evaluator.pending() == [20, 30]


def test_a_silent_or_leaving_worker_loses_its_checkpoint_to_the_next(queue):
    evaluator, _, _ = queue
    assert evaluator.take("a", now=0, lease_seconds=60)[0] == 10
    assert evaluator.take("b", now=61)[0] == 10, "an expired lease went back to the front of the queue"
    evaluator.give_back("b", 10)
    assert evaluator.take("c", now=62)[0] == 10
    assert evaluator.take("c", now=63)[0] == 10, "a worker asking again gives back what it held"


@pytest.mark.parametrize("bad, why", [
    ({**GOOD, "round": 11}, "round"),
    ({**GOOD, "perplexity": {"text": math.nan}}, "perplexity"),
    ({**GOOD, "perplexity": {"text": 0.5}}, "perplexity"),
    ({**GOOD, "accuracy": {"parity": {"acc": 1.5, "acc_norm": 0.5}}}, "accuracy"),
    ({**GOOD, "accuracy": {"parity": {"acc": 0.5}}}, "accuracy"),
    ({**GOOD, "seconds": -1}, "seconds"),
    ([1, 2], "JSON object"),
])
def test_a_malformed_result_is_refused_and_nothing_recorded(queue, bad, why):
    evaluator, recorded, _ = queue
    evaluator.take("a", now=0)
    assert why in check_result(bad, 10) and why in evaluator.finish("a", 10, bad)
    assert recorded == [] and 10 in evaluator.pending(), "refused: queued again for another volunteer"


def test_a_failure_is_tried_by_other_volunteers_before_it_is_recorded(queue):
    evaluator, recorded, tmp_path = queue
    for attempt, worker in enumerate("abc"):
        job = evaluator.take(worker, now=attempt)
        assert job[0] == 10, "a failed checkpoint is the next one handed out"
        assert evaluator.finish(worker, 10, {"error": f"out of memory on {worker}"}) is None
        assert (recorded == []) == (attempt < 2)
    (r, result), = recorded
    assert r == 10 and "out of memory on a" in result["error"] and "out of memory on c" in result["error"]
    assert not (tmp_path / "round-10" / "eval.json").exists()


def test_a_lease_renewed_is_not_taken_away(queue):
    evaluator, _, _ = queue
    evaluator.take("a", now=0, lease_seconds=60)
    assert evaluator.renew("a", 10, now=50, lease_seconds=60) and not evaluator.renew("b", 10, now=50)
    assert evaluator.take("b", now=100)[0] == 20, "the renewed lease still held at 100 s"


def test_results_naming_other_sources_or_tasks_are_refused():
    assert "sources" in check_result(GOOD, 10, sources={"code"}, tasks={"parity"})
    assert "tasks" in check_result(GOOD, 10, sources={"text"}, tasks={"sentiment"})
    assert check_result(GOOD, 10, sources={"text"}, tasks={"parity"}) is None
    assert check_result({**GOOD, "perplexity": {"text": math.inf}}, 10) is None  # a diverged model is a result too


def test_drain_returns_once_the_queue_is_empty(queue):
    evaluator, _, _ = queue

    async def work():
        async def finish_all():
            for _ in range(3):
                await asyncio.sleep(0.01)
                r, _ = evaluator.take("a", now=0)
                evaluator.finish("a", r, {**GOOD, "round": r})

        await asyncio.wait_for(asyncio.gather(evaluator.drain(), finish_all()), 10)

    asyncio.run(work())
    assert evaluator.pending() == []


@pytest.fixture()
def served(tmp_path):
    """A signed checkpoint with an optimizer shard, served over HTTP like the coordinator's /checkpoints/."""
    from coordinator.checkpoint import load_signing_key, public_key_hex
    from proto.manifest import sha256_file, sign_manifest

    root = tmp_path / "served" / "round-000010"
    root.mkdir(parents=True)
    (root / "config.json").write_text("{}")
    (root / "model-00001-of-00001.safetensors").write_bytes(b"weights" * 100)
    (root / "optimizer-00001-of-00001.safetensors").write_bytes(b"moments" * 100)
    key = load_signing_key(tmp_path / "key.pem")
    files = {p.name: sha256_file(p) for p in root.iterdir()}
    (root / "manifest.json").write_text(json.dumps(sign_manifest({"run": "r", "round": 10, "files": files}, key)))
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path / "served")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/round-000010/", root, public_key_hex(key)
    finally:
        server.shutdown()


def test_a_volunteer_downloads_the_model_files_checked_and_not_the_optimizer_state(served, tmp_path):
    url, root, key = served
    fetch_checkpoint(url, tmp_path / "copy", key, 10)
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == ["config.json", "manifest.json", "model-00001-of-00001.safetensors"]
    from proto.manifest import verify_directory

    verify_directory(tmp_path / "copy", key, model_only=True)
    with pytest.raises(EvalError, match="round 10, the job was round 11"):
        fetch_checkpoint(url, tmp_path / "other", key, 11)


def test_a_tampered_file_or_a_foreign_signature_is_refused(served, tmp_path):
    url, root, key = served
    (root / "model-00001-of-00001.safetensors").write_bytes(b"poisoned" * 100)
    with pytest.raises(EvalError, match="model-00001-of-00001.safetensors: sha256 .* does not match"):
        fetch_checkpoint(url, tmp_path / "copy", key, 10)
    assert not (tmp_path / "copy" / "model-00001-of-00001.safetensors").exists()
    from coordinator.checkpoint import load_signing_key, public_key_hex

    with pytest.raises(EvalError, match="not signed by this run's coordinator"):
        fetch_checkpoint(url, tmp_path / "copy2", public_key_hex(load_signing_key(tmp_path / "other.pem")), 10)
