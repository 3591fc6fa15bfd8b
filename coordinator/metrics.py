"""Prometheus metrics of the coordinator (one registry, ``hometrain_`` prefix, base units)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from proto import PACKAGE_VERSION, PROTOCOL_VERSION



class CoordinatorMetrics:
    """Everything the coordinator exports on /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        Info("hometrain_build", "Build of this process.", registry=r).info(
            {"version": PACKAGE_VERSION, "protocol": str(PROTOCOL_VERSION), "role": "coordinator"}
        )
        self.rounds = Counter("hometrain_rounds", "Rounds completed.", registry=r)
        self.round_duration = Histogram(
            "hometrain_round_duration_seconds", "Wall time of a round, open to step.", registry=r,
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600),
        )
        self.round = Gauge("hometrain_round", "Number of the last completed round.", registry=r)
        self.loss = Gauge("hometrain_loss", "Mean token loss of the last completed round.", registry=r)
        self.learning_rate = Gauge("hometrain_learning_rate", "Learning rate of the last completed round (the schedule's position).", registry=r)
        self.grad_norm = Gauge("hometrain_grad_norm", "Global gradient norm over all stages in the last completed round, before clipping.", registry=r)
        self.tokens = Counter("hometrain_tokens", "Loss tokens trained.", registry=r)
        self.tokens_per_second = Gauge("hometrain_tokens_per_second", "Tokens per second of the last round.", registry=r)
        self.samples_dropped = Counter("hometrain_samples_dropped", "Samples handed out but not trained (failed hop, late, peer gone).", registry=r)
        self.peers = Gauge("hometrain_peers", "Peers by stage and state.", ["stage", "state"], registry=r)
        self.audits = Gauge("hometrain_audits", "Forward audits judged since the coordinator started, by whether their two losses agreed.",
                            ["verdict"], registry=r)
        self.flagged_peers = Gauge("hometrain_flagged_peers", "Live peers flagged (robust aggregation or audits): out of routing and syncs.",
                                   registry=r)
        self.wire_bytes = Gauge("hometrain_wire_bytes", "Bytes on the wire that peers reported, by kind and direction.", ["kind", "direction"], registry=r)
        self.wire_uncompressed_bytes = Gauge(
            "hometrain_wire_uncompressed_bytes", "What the same traffic would cost uncompressed (fp32), by kind and direction.", ["kind", "direction"], registry=r
        )
        self.checkpoint_seconds = Gauge("hometrain_checkpoint_publish_seconds", "Time to write the last checkpoint.", registry=r)
        self.checkpoint_bytes = Gauge("hometrain_checkpoint_bytes", "Size of the last checkpoint.", registry=r)
        self.checkpoints = Counter("hometrain_checkpoints", "Checkpoints published.", registry=r)
        self.rpc_errors = Counter("hometrain_rpc_errors", "Control-plane requests refused or failed, by kind.", ["kind"], registry=r)
        self.microbatch_failures = Counter(
            "hometrain_microbatch_failures", "Microbatches that failed because a stage's work raised (or its hop failed), by the "
            "stage it failed at.", ["stage"], registry=r)
        self.stalled = Gauge("hometrain_training_stalled", "1 while rounds train nothing (every microbatch failed or none finished in time).", registry=r)
        self.control_bytes = Counter("hometrain_control_bytes", "Control-plane message bytes, by direction.", ["direction"], registry=r)
        self.data_phase = Gauge("hometrain_data_phase", "Index of the data phase in force (0: first; see /api/status data.phases).", registry=r)
        self.data_tokens = Gauge(
            "hometrain_data_tokens", "Loss tokens trained, by data source and objective (sum by either label); survives restarts.",
            ["source", "objective"], registry=r,
        )

        self.eval_round = Gauge("hometrain_eval_round", "Round of the latest evaluated checkpoint.", registry=r)
        self.eval_perplexity = Gauge("hometrain_eval_perplexity", "Held-out perplexity of the latest evaluated checkpoint, by source.",
                                     ["source"], registry=r)
        self.eval_accuracy = Gauge("hometrain_eval_accuracy", "Multiple-choice accuracy of the latest evaluated checkpoint, by task and "
                                   "metric (acc, acc_norm).", ["task", "metric"], registry=r)
        self.eval_seconds = Gauge("hometrain_eval_seconds", "Wall time of the latest checkpoint evaluation.", registry=r)
        self.eval_failures = Counter("hometrain_eval_failures", "Checkpoint evaluations that failed.", registry=r)

    def show_evaluation(self, round: int, result: dict) -> None:
        """Point the eval gauges at ``result`` (the caller passes only the newest evaluated checkpoint's)."""
        self.eval_round.set(round)
        self.eval_seconds.set(result.get("seconds", 0.0))
        for source, value in result.get("perplexity", {}).items():
            self.eval_perplexity.labels(source).set(value)
        for task, metrics in result.get("accuracy", {}).items():
            for metric, value in metrics.items():
                self.eval_accuracy.labels(task, metric).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
