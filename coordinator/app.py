"""The coordinator process, wiring only: store, data, round engine, gRPC service, HTTP status and the DHT bootstrap node."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

import grpc
import hivemind
import torch
from transformers import GPTJConfig

from proto import GRPC_MAX_MESSAGE_BYTES, PACKAGE_VERSION
from proto import hometrain_pb2 as pb
from proto import hometrain_pb2_grpc as pb_grpc
from proto.addresses import resolve_ipv4
from proto.auth import key_fingerprint
from proto.memory_plan import GIB, StageShape, plan_layer_ranges, plan_settings, plan_stage
from proto.run_config import ConfigError, CoordinatorConfig, EvalOptions, parse_eval_task

from .assignment import stage_layer_ranges, stage_needs
from .checkpoint import (
    adapter_config,
    checkpoint_dir_name,
    load_signing_key,
    public_key_hex,
    remove_incomplete,
    write_checkpoint,
)
from .data.heldout import write_heldout
from .data.probe import LABEL_TASKS
from .data.build import build_mixer, tokenizer_documents, tokenizer_special_tokens
from .http_server import StatusHTTPServer
from .membership import Membership
from .metrics import CoordinatorMetrics
from .model_presets import (
    preset_config,
    pretrained_config,
    pretrained_stage_tensors,
    stage_adapter_shapes,
    stage_parameter_counts,
    stage_tensor_shapes,
)
from .rounds import RoundEngine
from .join_tokens import JoinTokens
from .service import CoordinatorService
from .status import StatusReport
from .store import RoundRecord, Store, holds_a_run
from .data.tokenizer import load_or_train
from .eval_runner import Evaluator

log = logging.getLogger(__name__)
# The coordinator is reachable by definition: it tells libp2p so, which turns on the circuit-relay service that
# peers behind NAT reserve a slot on (they reach the data plane, and others reach them, through it).
RELAY = dict(force_reachability="public")

GRPC_BIND_SECONDS = 10.0
PEER_CACHE_BYTES = 1024 << 20  # what a peer's AQ-SGD caches may hold by default (peer join --activation-cache-mb)


class CoordinatorApp:
    """One training run's coordinator. ``await start()``, ``await serve_until_done()``, ``await shutdown()``."""

    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self.state_dir = Path(config.state_dir)
        self.checkpoint_root = self.state_dir / "checkpoints"
        self.metrics = CoordinatorMetrics()
        self.stop_requested = asyncio.Event()
        self.last_tokens_per_second: float | None = None
        self.report = StatusReport(self)
        # Set by start() as it gets to them; shutdown() stops those that exist.
        self.store: Store | None = None
        self.dht: hivemind.DHT | None = None
        self.http: StatusHTTPServer | None = None
        self.grpc_server: grpc.aio.Server | None = None
        self.evaluator: Evaluator | None = None

    # ------------------------------------------------------------ set-up

    def _check_shape(self) -> None:
        """Refuse a model and stage count that cannot work before anything is trained or written."""
        cfg = self.config
        if cfg.init_from:
            n_layer = pretrained_config(Path(cfg.init_from)).n_layer
            origin = f"--init-from {cfg.init_from}"
        else:
            n_layer = preset_config(cfg.model, 1, 0, cfg.seq_len).n_layer
            origin = f"--model {cfg.model}"
        if not (1 if not cfg.stage_memory_gb else 0) <= cfg.stages <= n_layer:
            raise ConfigError(f"--stages {cfg.stages}: {origin} has {n_layer} blocks, so it can be split into 1 to {n_layer} stages")

    def _prepare_run(self) -> None:
        """Run id, tokenizer, model config and data, created once and reused on restart; with --init-from, its
        round-0 checkpoint, re-sharded by stage. A run from the seed has none: each peer builds its own stage."""
        cfg = self.config
        database = self.state_dir / "coordinator.sqlite"
        if not holds_a_run(database):  # a new run (`coordinator token` may have made the store already)
            self._check_shape()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(database)
        self.run_id = self.store.get_meta("run_id") or uuid.uuid4().hex[:12]
        self.store.set_meta("run_id", self.run_id)
        self.signing_key = load_signing_key(self.state_dir / "signing_key.pem")
        self.key_fingerprint = key_fingerprint(public_key_hex(self.signing_key))
        self.tokenizer_dir = self.state_dir / "tokenizer"
        saved_tokenizer = (self.tokenizer_dir / "tokenizer.json").is_file()
        if cfg.init_from and not cfg.tokenizer and not saved_tokenizer:
            log.warning("--init-from without --tokenizer: a new BPE is trained whose ids mean nothing to the checkpoint's "
                        "embedding; pass --tokenizer DIR (e.g. the checkpoint's own tokenizer)")
        self.tokenizer = load_or_train(self.tokenizer_dir, tokenizer_documents(cfg), cfg.vocab_size,
                                       tokenizer_special_tokens(cfg), pretrained=cfg.tokenizer)
        eos = self.tokenizer.eos_token_id
        origin = f"the run's, in {self.tokenizer_dir}" if saved_tokenizer else (
            f"--tokenizer {cfg.tokenizer}" if cfg.tokenizer else f"BPE trained on the run's data, --vocab-size {cfg.vocab_size}")
        log.info("tokenizer: %d entries (%s), EOS id %d", len(self.tokenizer), origin, eos)
        saved = self.store.get_meta("model_config")
        if saved:
            self.model_config = GPTJConfig.from_dict(json.loads(saved))
        elif cfg.init_from:
            self.model_config = pretrained_config(Path(cfg.init_from))
        else:
            self.model_config = preset_config(cfg.model, len(self.tokenizer), eos, cfg.seq_len)
        if self.model_config.n_positions < cfg.seq_len:
            raise ConfigError(f"--seq-len {cfg.seq_len} exceeds the model's {self.model_config.n_positions} positions")
        if self.model_config.vocab_size < len(self.tokenizer):
            origin = "this run's saved model (--state-dir)" if saved else f"--init-from {cfg.init_from}"
            raise ConfigError(
                f"the tokenizer has {len(self.tokenizer)} entries (UL2's special tokens included) but {origin} has an "
                f"embedding of {self.model_config.vocab_size} rows, which cannot grow silently: pass a --tokenizer that fits "
                "(or already holds the UL2 tokens), a --init-from checkpoint with a larger vocabulary, or a new --state-dir"
            )
        self.store.set_meta("model_config", self.model_config.to_json_string())
        share = self.store.get_meta("heldout_share")
        if share is not None and float(share) != cfg.heldout_share:
            raise ConfigError(f"--heldout-share {cfg.heldout_share:g}: this run holds out {float(share):g} (--state-dir {cfg.state_dir}); "
                              "changing it would put trained documents into the held-out split, or held-out ones into training: "
                              f"pass --heldout-share {float(share):g}, or start a new run")
        self.store.set_meta("heldout_share", repr(cfg.heldout_share))
        self.layer_ranges = self._plan_stages()
        self.data = build_mixer(cfg, self.tokenizer)
        self.data_description = self.data.describe()
        write_heldout(self.state_dir / "heldout", cfg.heldout_share, self.data.heldout)  # what `coordinator eval` scores
        for source in self.data_description["sources"]:
            log.info("data source %s: %s (%s, weight %g), %d tokens", source["name"], source["path"], source["format"], source["weight"], source["tokens"])
        for i, phase in enumerate(self.data_description["phases"]):
            log.info("data phase %d: %s from %d loss tokens until %s, weights %s (--ul2-tokens, --instruction-share, [[sources]])",
                     i, phase["objective"], phase["from_tokens"], phase["until_tokens"] or "the end", phase["weights"])
        for leftover in remove_incomplete(self.checkpoint_root):
            log.warning("removed an interrupted checkpoint write: %s", leftover)
        shutil.rmtree(self.state_dir / "uploads", ignore_errors=True)  # uploads of a publish that never finished
        if not self.store.checkpoints() and cfg.init_from:
            self._publish(0, 0, None, pretrained_stage_tensors(Path(cfg.init_from), self.layer_ranges))

    def _plan_stages(self) -> list[tuple[int, int]]:
        """The stages' layer ranges: planned to fit --stage-memory-gb, or the blocks split evenly; logged with their plans."""
        cfg, config = self.config, self.model_config
        settings = plan_settings(cfg.train_config(), aqsgd_cache_bytes=PEER_CACHE_BYTES)
        try:
            if cfg.stage_memory_gb:
                ranges = plan_layer_ranges(config, settings, int(cfg.stage_memory_gb * GIB), cfg.stages)
            else:
                ranges = stage_layer_ranges(config.n_layer, cfg.stages)
        except ValueError as exc:  # a restarted run keeps its model: --stages must still fit it
            raise ConfigError(f"{exc}; change --stage-memory-gb, --stages, or lighten the stages (--compute-dtype bfloat16, "
                              "--optimizer adamw8bit, --activation-checkpointing, --micro-batch-size, --max-inflight)") from None
        how = f"planned to fit {cfg.stage_memory_gb:g} GiB (--stage-memory-gb)" if cfg.stage_memory_gb else "blocks split evenly (--stage-memory-gb plans by memory)"
        for k, (a, b) in enumerate(ranges):
            log.info("stage %d: blocks [%d, %d) needs %s; %s", k, a, b, plan_stage(StageShape.of(config, a, b), settings).describe(), how)
        return ranges

    def _publish(self, round: int, tokens: int, loss: float | None, stage_tensors: Iterable[dict[str, torch.Tensor] | Path],
                 optimizer_files: list[Path] | None = None) -> None:
        adapters = adapter_config(self.config, str((self.checkpoint_root / checkpoint_dir_name(0)).resolve())) if self.config.lora_rank and round else None
        info = write_checkpoint(
            self.checkpoint_root, run_id=self.run_id, round=round, tokens=tokens, loss=loss, config=self.model_config,
            stage_tensors=stage_tensors, tokenizer_dir=self.tokenizer_dir, signing_key=self.signing_key,
            num_stages=len(self.layer_ranges), optimizer_files=optimizer_files or (), adapter_config=adapters,
        )
        self.store.record_checkpoint(round, str(info.path), tokens, loss, info.total_bytes, info.seconds)
        self.metrics.checkpoints.inc()
        self.metrics.checkpoint_seconds.set(info.seconds)
        self.metrics.checkpoint_bytes.set(info.total_bytes)
        log.info("published checkpoint of round %d: %s (%.1f MiB, %.2fs)", round, info.path, info.total_bytes / 2**20, info.seconds)
        if getattr(self, "loop", None) is not None:  # after start-up: point joiners at it (from this worker thread)
            self.loop.call_soon_threadsafe(self._point_at_latest_checkpoint)
            if self.evaluator is not None:
                self.loop.call_soon_threadsafe(self.evaluator.submit, round, info.path)

    def _start_dht(self) -> hivemind.DHT:
        """The DHT bootstrap node, with the same identity and port across restarts.

        Peers that joined before a restart only know the old node's address: keeping it means
        they and newcomers stay one network. If the old node is still alive (its process
        outlived a killed coordinator), a fresh identity and port are used and the split logged.
        """
        cfg = self.config
        identity = self.state_dir / "dht_identity.key"
        port = cfg.dht_port or int(self.store.get_meta("dht_port") or 0)

        def announce(port: int) -> list[str] | None:  # --announce-host is where peers reach this machine: the DHT says so too
            ip = resolve_ipv4(cfg.announce_host) if cfg.announce_host and port else None
            return [f"/ip4/{ip}/tcp/{port}"] if ip else None

        try:
            dht = hivemind.DHT(start=True, host_maddrs=[f"/ip4/{cfg.host}/tcp/{port}"], identity_path=str(identity),
                               announce_maddrs=announce(port), await_ready=True, **RELAY)
        except Exception as exc:
            if cfg.dht_port:
                raise OSError(f"cannot start the DHT node on {cfg.host}:{cfg.dht_port} (--dht-port): {exc}; is another "
                              "coordinator running? stop it or pick another --dht-port") from None
            log.warning("cannot reuse the DHT identity and port %d (%s); starting a new node: peers that joined "
                        "before this restart must rejoin to see newcomers", port, exc)
            dht = hivemind.DHT(start=True, host_maddrs=[f"/ip4/{cfg.host}/tcp/0"], await_ready=True, **RELAY)
        bound = re.search(r"/tcp/(\d+)", str(dht.get_visible_maddrs()[0]))
        if bound:
            self.store.set_meta("dht_port", bound.group(1))
        return dht

    def checkpoint_url(self, round: int) -> str:
        return f"http://{self.config.public_host}:{self.http.port}/checkpoints/{checkpoint_dir_name(round)}/"

    async def start(self) -> None:
        cfg = self.config
        await asyncio.get_running_loop().run_in_executor(None, self._prepare_run)
        counts = stage_parameter_counts(self.model_config, self.layer_ranges)
        settings = plan_settings(cfg.train_config(), aqsgd_cache_bytes=PEER_CACHE_BYTES)
        memory = [plan_stage(StageShape.of(self.model_config, a, b), settings).peak for a, b in self.layer_ranges]
        self.membership = Membership(len(self.layer_ranges), cfg.heartbeat_timeout,
                                     stage_needs(counts, self.model_config.n_embd, cfg.train_config(), memory),
                                     heartbeat_interval=cfg.heartbeat_interval, heartbeat_rate=cfg.heartbeat_rate)
        if cfg.lora_rank:  # what each stage uploads: its adapters only
            shapes = [stage_adapter_shapes(self.model_config, a, b, cfg.lora_rank, cfg.lora_target_modules) for a, b in self.layer_ranges]
        else:
            shapes = [stage_tensor_shapes(self.model_config, a, b) for a, b in self.layer_ranges]
        self.engine = RoundEngine(cfg, self.store, self.data, self.membership, self._publish, self.layer_ranges,
                                  stage_shapes=shapes, spool_dir=self.state_dir / "uploads")
        self.engine.on_round_recorded.append(self._on_round)
        self.engine.on_sample_dropped.append(self.metrics.samples_dropped.inc)
        self.engine.on_failure.append(
            lambda failure: self.metrics.microbatch_failures.labels("unknown" if failure.stage is None else str(failure.stage)).inc())
        self.loop = asyncio.get_running_loop()

        self.dht = self._start_dht()
        maddrs = [str(m) for m in self.dht.get_visible_maddrs()]
        log.info("DHT bootstrap node: %s", " ".join(maddrs))

        try:
            self.http = StatusHTTPServer(cfg.host, cfg.http_port, self.report.status_threadsafe, self.report.rounds,
                                         self.report.metrics_threadsafe, self.checkpoint_root,
                                         self.state_dir / "heldout" if cfg.eval_on == "peer" else None)  # for evaluating volunteers
        except OSError as exc:
            raise OSError(f"cannot listen on {cfg.host}:{cfg.http_port} for the status page and checkpoints (--http-port): "
                          f"{exc.strerror or exc}; is another coordinator running? stop it or pick another --http-port") from None
        self.http.start()

        self.join_template = pb.JoinReply(
            num_stages=len(self.layer_ranges), run_id=self.run_id, initial_peers=maddrs,
            model_config_json=self.model_config.to_json_string(), train_config_json=cfg.train_config().to_json(),
            heartbeat_interval=cfg.heartbeat_interval, checkpoint_public_key=public_key_hex(self.signing_key),
            base_checkpoint_url=self.checkpoint_url(0) if cfg.lora_rank else "",
        )
        self._point_at_latest_checkpoint()
        self._start_evaluator()
        self.tokens = JoinTokens(self.store, cfg.join_token)
        self.membership.extra_members = [self.dht.peer_id.to_base58()]  # peers may call it (it bootstraps their DHT)
        self.service = CoordinatorService(self.engine, self.membership, self.metrics, self.join_template, self.tokens, self.layer_ranges,
                                          self.signing_key)
        if self.evaluator is not None and not self.evaluator.local:
            self.service.serve_evaluations(self.evaluator, self.checkpoint_url, pb.EvalJob(
                heldout_url=f"http://{cfg.public_host}:{self.http.port}/heldout/", options_json=json.dumps(dataclasses.asdict(self.evaluator.options)),
                checkpoint_public_key=public_key_hex(self.signing_key)))
        options = [("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES)]
        # A coordinator restarted right after a crash may find its port still held for a moment.
        deadline = time.monotonic() + GRPC_BIND_SECONDS
        while True:
            server = grpc.aio.server(options=options)
            pb_grpc.add_CoordinatorServicer_to_server(self.service, server)
            try:
                if cfg.tls_cert:
                    credentials = grpc.ssl_server_credentials([(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())])
                    self.grpc_port = server.add_secure_port(f"{cfg.host}:{cfg.port}", credentials)
                else:
                    self.grpc_port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
            except RuntimeError:  # some grpc versions raise instead of returning 0
                self.grpc_port = 0
            if self.grpc_port or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        if self.grpc_port == 0:
            raise OSError(f"cannot listen on {cfg.host}:{cfg.port} for gRPC, the control plane (--port; tried for "
                          f"{GRPC_BIND_SECONDS:.0f}s): is another coordinator running? stop it or pick another --port")
        self.grpc_server = server
        await self.grpc_server.start()
        log.info("run %s: round %d, %d stages %s, hometrain %s", self.run_id, self.engine.round, len(self.layer_ranges), self.layer_ranges, PACKAGE_VERSION)
        log.info("control plane on %s:%d (%s); status page http://%s:%d/", cfg.public_host, self.grpc_port,
                 "TLS" if cfg.tls_cert else "plaintext: --tls-cert/--tls-key serve TLS", cfg.public_host, self.http.port)
        log.info("checkpoints and member sets are signed with key %s: volunteers pin it with --coordinator-key %s",
                 self.key_fingerprint, self.key_fingerprint)

    # ------------------------------------------------------------ running

    def _on_round(self, record: RoundRecord) -> None:
        self.metrics.rounds.inc()
        self.metrics.round.set(record.round)
        self.metrics.round_duration.observe(record.duration)
        self.metrics.tokens.inc(record.tokens)
        if record.loss is not None:
            self.metrics.loss.set(record.loss)
        if record.lr is not None:
            self.metrics.learning_rate.set(record.lr)
        if record.grad_norm is not None and math.isfinite(record.grad_norm):
            self.metrics.grad_norm.set(record.grad_norm)
        if record.duration > 0:
            self.last_tokens_per_second = record.tokens / record.duration
            self.metrics.tokens_per_second.set(self.last_tokens_per_second)

    def _start_evaluator(self) -> None:
        """Unless --eval-on off: evaluate what a previous run left unevaluated, then each new checkpoint."""
        cfg = self.config
        checkpoints = self.store.checkpoints()
        done = [c for c in checkpoints if c["eval"] and "error" not in c["eval"]]
        if done:
            self.metrics.show_evaluation(done[-1]["round"], done[-1]["eval"])
        if cfg.eval_on == "off":
            return
        options = EvalOptions(heldout=str(self.state_dir / "heldout"), context=cfg.seq_len, tasks=cfg.eval_tasks, shots=cfg.eval_shots,
                              probe_items=cfg.eval_probe_items, max_tokens=cfg.eval_max_tokens, device=cfg.eval_device, seed=cfg.seed,
                              engine=cfg.eval_engine)
        tasks = dict(parse_eval_task(spec) for spec in cfg.eval_tasks)
        if cfg.eval_on == "peer":  # volunteers download the organiser's tasks beside the split
            (self.state_dir / "heldout" / "tasks").mkdir(exist_ok=True)
            for name, path in tasks.items():
                shutil.copyfile(path, self.state_dir / "heldout" / "tasks" / f"{name}.jsonl")
        self.evaluator = Evaluator(options, self._on_evaluation, local=cfg.eval_on == "coordinator")
        self.evaluator.sources = set(self.data.heldout)
        self.evaluator.tasks = (set(LABEL_TASKS) if cfg.heldout_share > 0 else set()) | set(tasks)
        self.evaluator.start()
        for c in checkpoints:  # a failure is tried again after a restart, too
            if c["eval"] is None or "error" in c["eval"]:
                self.evaluator.submit(c["round"], Path(c["path"]))

    def _on_evaluation(self, round: int, result: dict[str, Any]) -> None:
        self.store.record_evaluation(round, result)
        if "error" in result:
            self.metrics.eval_failures.inc()
            return
        evaluated = [c["round"] for c in self.store.checkpoints() if c["eval"] and "error" not in c["eval"]]
        if round >= max(evaluated):
            self.metrics.show_evaluation(round, result)

    def _point_at_latest_checkpoint(self) -> None:
        """Joiners and peers that must reload are sent to the newest published checkpoint (none yet: the seed)."""
        checkpoints = self.store.checkpoints()
        if not checkpoints:
            return
        latest = checkpoints[-1]["round"]
        self.join_template.checkpoint_url = self.checkpoint_url(latest)
        self.join_template.checkpoint_round = latest
        self.engine.latest_checkpoint = (self.checkpoint_url(latest), latest)

    async def serve_until_done(self) -> None:
        """Tick the round engine until --rounds are done or a stop is requested."""
        while not self.stop_requested.is_set():
            await self.engine.tick()
            if self.engine.phase == pb.STOPPED:
                break
            try:
                await asyncio.wait_for(self.stop_requested.wait(), 0.25)
            except asyncio.TimeoutError:
                pass
        if self.evaluator is not None and self.evaluator.pending() and not self.stop_requested.is_set():
            log.info("all %d rounds done; evaluating the checkpoints of rounds %s before stopping (Ctrl-C stops now; a "
                     "restarted coordinator evaluates what is left)", self.config.rounds, self.evaluator.pending())
            await _first_of(self.evaluator.drain(), self.stop_requested.wait())
        if self.config.linger and not self.stop_requested.is_set():
            log.info("all %d rounds done; still serving the status page and checkpoints (--linger) until Ctrl-C", self.config.rounds)
            await self.stop_requested.wait()
        await self.engine.stop()
        # Let long-polling peers see STOPPED so they leave by themselves.
        deadline = time.monotonic() + 3 * self.config.heartbeat_interval
        while self.membership.live() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)

    async def shutdown(self) -> None:
        """Stop what start() got to start, in reverse order."""
        if self.evaluator is not None:
            await self.evaluator.stop()
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=1.0)
        if self.http is not None:
            self.http.stop()
        if self.dht is not None:
            self.dht.shutdown()
        if self.store is not None:
            self.store.close()


async def _first_of(*waits) -> None:
    """Wait until the first of ``waits`` finishes; cancel the rest."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
