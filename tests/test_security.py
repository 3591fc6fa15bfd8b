"""A private run's control plane, read as an outsider would: tokens, per-peer credentials, revocation, the signed member set."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

from proto import PROTOCOL_VERSION
from proto import hometrain_pb2 as pb
from proto import hometrain_pb2_grpc as pb_grpc
from proto.auth import CREDENTIAL_METADATA, verify_member_set
from tests.swarm import ENV, Swarm

SECRET = "organiser-secret"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    state = tmp_path_factory.mktemp("private")
    token = state / "join-token"
    token.write_text(SECRET + "\n")
    s = Swarm(state, "--stages", "2", "--rounds", "3", "--join-token-file", str(token))
    channel = grpc.insecure_channel(f"127.0.0.1:{s.port}")
    s.stub = pb_grpc.CoordinatorStub(channel)
    try:
        yield s
    finally:
        channel.close()
        s.stop()


def join(stub, token: str = SECRET, name: str = "volunteer") -> pb.JoinReply:
    return stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION, join_token=token, name=name, device="cpu", requested_stage=-1), timeout=10)


def heartbeat(stub, peer_id: str, credential: str, dht_peer_id: str = "") -> pb.HeartbeatReply:
    metadata = ((CREDENTIAL_METADATA, credential),) if credential else None
    return stub.Heartbeat(pb.HeartbeatRequest(peer_id=peer_id, dht_peer_id=dht_peer_id), timeout=10, metadata=metadata)


def refused(call, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value.details()
    return caught.value.details()


def token_cli(run, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coordinator", "token", *args, "--state-dir", str(run.state_dir)],
                          capture_output=True, text=True, env=ENV, timeout=60, check=True)


def test_join_needs_a_live_token_and_returns_a_credential_shown_nowhere(run):
    assert "--join-token-file" in refused(lambda: join(run.stub, token=""), grpc.StatusCode.PERMISSION_DENIED)
    refused(lambda: join(run.stub, token="guess"), grpc.StatusCode.PERMISSION_DENIED)
    reply = join(run.stub)
    assert reply.peer_id and len(reply.credential) >= 40
    assert heartbeat(run.stub, reply.peer_id, reply.credential).known
    shown = run.get_text("/") + run.get_text("/api/status") + run.get_text("/metrics") + run.log_tail(400)
    assert reply.peer_id in run.get_text("/api/status")
    assert reply.credential not in shown and SECRET not in shown


def test_a_peer_id_alone_grants_nothing(run):
    victim, intruder = join(run.stub, name="victim"), join(run.stub, name="intruder")
    for credential in ("", intruder.credential, victim.credential[:-1] + "x"):
        details = refused(lambda: heartbeat(run.stub, victim.peer_id, credential), grpc.StatusCode.UNAUTHENTICATED)
        assert victim.peer_id in details and "credential" in details
    metadata = ((CREDENTIAL_METADATA, intruder.credential),)
    refused(lambda: run.stub.Leave(pb.LeaveRequest(peer_id=victim.peer_id), timeout=10, metadata=metadata), grpc.StatusCode.UNAUTHENTICATED)
    refused(lambda: run.stub.GetRoundState(pb.RoundStateRequest(peer_id=victim.peer_id), timeout=10, metadata=metadata),
            grpc.StatusCode.UNAUTHENTICATED)
    refused(lambda: run.stub.ReportStep(pb.StepReport(peer_id=victim.peer_id, round=1, checksum="0" * 64), timeout=10, metadata=metadata),
            grpc.StatusCode.UNAUTHENTICATED)
    assert heartbeat(run.stub, victim.peer_id, victim.credential).known  # the victim is still a member
    assert any(p["id"] == victim.peer_id and p["state"] == "joining" for p in run.status()["peers"])


def test_a_revoked_token_is_refused_at_the_next_call(run, tmp_path):
    token_file = tmp_path / "alice.token"
    token_cli(run, "create", "--name", "alice", "--out", str(token_file))
    issued = token_file.read_text().strip()
    alice = join(run.stub, token=issued, name="alice")
    assert heartbeat(run.stub, alice.peer_id, alice.credential).known
    listed = token_cli(run, "list").stdout
    token_id = next(line.split()[0] for line in listed.splitlines() if line.endswith("alice"))
    assert issued not in listed
    token_cli(run, "revoke", token_id)
    assert "revoked" in refused(lambda: heartbeat(run.stub, alice.peer_id, alice.credential), grpc.StatusCode.PERMISSION_DENIED)
    assert not heartbeat(run.stub, alice.peer_id, alice.credential).known  # no longer a member: told to join again...
    refused(lambda: join(run.stub, token=issued), grpc.StatusCode.PERMISSION_DENIED)  # ...which its token no longer allows
    assert join(run.stub).peer_id  # the run's own token still admits


def test_the_member_set_is_signed_and_follows_the_peers(run):
    peer = join(run.stub, name="member")
    dht_id = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
    reply = heartbeat(run.stub, peer.peer_id, peer.credential, dht_peer_id=dht_id)
    assert reply.members_epoch > 0  # a private run: the data plane serves members only
    metadata = ((CREDENTIAL_METADATA, peer.credential),)
    members = run.stub.Members(pb.MembersRequest(peer_id=peer.peer_id), timeout=10, metadata=metadata)
    assert dht_id in members.dht_peer_ids and members.run_id == peer.run_id and members.epoch >= reply.members_epoch
    assert verify_member_set(peer.checkpoint_public_key, members.run_id, members.epoch, members.dht_peer_ids, members.signature)
    assert not verify_member_set(peer.checkpoint_public_key, members.run_id, members.epoch, [*members.dht_peer_ids, "intruder"], members.signature)
    refused(lambda: run.stub.Members(pb.MembersRequest(peer_id=peer.peer_id), timeout=10), grpc.StatusCode.UNAUTHENTICATED)


def test_observers_need_a_token_and_a_real_peer_id(run):
    observe = lambda token, dht_id: run.stub.Observe(  # noqa: E731
        pb.ObserveRequest(protocol_version=PROTOCOL_VERSION, join_token=token, dht_peer_id=dht_id), timeout=10)
    refused(lambda: observe("guess", "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"), grpc.StatusCode.PERMISSION_DENIED)
    assert "base58" in refused(lambda: observe(SECRET, "not a peer id"), grpc.StatusCode.INVALID_ARGUMENT)
    assert observe(SECRET, "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N").seconds > 0


def self_signed(directory) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and localhost, made here: what an organiser without a CA would serve."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hometrain test coordinator")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "coordinator.crt", directory / "coordinator.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_the_control_plane_speaks_tls_when_given_a_certificate(tmp_path):
    cert, key = self_signed(tmp_path)
    s = Swarm(tmp_path / "run", "--stages", "1", "--rounds", "1", "--tls-cert", cert, "--tls-key", key)
    try:
        assert "TLS" in s.log_tail(200)
        roots = open(cert, "rb").read()
        with grpc.secure_channel(f"127.0.0.1:{s.port}", grpc.ssl_channel_credentials(root_certificates=roots)) as channel:
            reply = join(pb_grpc.CoordinatorStub(channel), token="")
            assert reply.credential and heartbeat(pb_grpc.CoordinatorStub(channel), reply.peer_id, reply.credential).known
        with grpc.insecure_channel(f"127.0.0.1:{s.port}") as channel:  # plaintext gets nowhere
            with pytest.raises(grpc.RpcError):
                join(pb_grpc.CoordinatorStub(channel), token="")
        (tmp_path / "other").mkdir()
        stranger = open(self_signed(tmp_path / "other")[0], "rb").read()
        with grpc.secure_channel(f"127.0.0.1:{s.port}", grpc.ssl_channel_credentials(root_certificates=stranger)) as channel:
            with pytest.raises(grpc.RpcError):  # a certificate the peer was not told to trust
                join(pb_grpc.CoordinatorStub(channel), token="")
    finally:
        s.stop()


def test_a_pinned_or_remembered_coordinator_key_refuses_another(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from peer.coordinator_key import UntrustedCoordinator, trust_coordinator_key
    from proto.auth import key_fingerprint

    def public() -> str:
        return Ed25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()

    first, other = public(), public()
    assert trust_coordinator_key(first, "c:1", pinned=key_fingerprint(first)) == key_fingerprint(first)
    with pytest.raises(UntrustedCoordinator, match="--coordinator-key"):
        trust_coordinator_key(other, "c:1", pinned=key_fingerprint(first))
    state = str(tmp_path / "peer-state")
    trust_coordinator_key(first, "c:1", state_dir=state)  # first use: remembered
    assert trust_coordinator_key(first, "c:1", state_dir=state) == key_fingerprint(first)
    with pytest.raises(UntrustedCoordinator, match="signed with"):
        trust_coordinator_key(other, "c:1", state_dir=state)
    trust_coordinator_key(other, "elsewhere:1", state_dir=state)  # another coordinator has its own key


def test_a_checkpoint_of_another_run_or_round_or_too_large_is_refused(tmp_path):
    import functools
    import http.server
    import threading

    from peer.weights import _get, check_identity
    from proto.manifest import ManifestError

    check_identity({"run": "r1", "round": 5}, "r1", 5)
    with pytest.raises(ManifestError, match="run"):
        check_identity({"run": "r2", "round": 5}, "r1", 5)
    with pytest.raises(ManifestError, match="round"):
        check_identity({"run": "r1", "round": 4}, "r1", 5)
    (tmp_path / "shard").write_bytes(b"x" * 4096)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/shard"
        assert len(_get(url, limit=4096)) == 4096
        with pytest.raises(ManifestError, match="4096 bytes, more than the 1000"):
            _get(url, limit=1000)
    finally:
        server.shutdown()


def test_a_shard_is_checked_before_it_is_kept(tmp_path):
    """What a PUBLISH upload must be before the coordinator signs it: each of the stage's tensors once, with its shape,
    floating point and finite, and (when the stage's replicas agreed on a checksum this round) exactly those weights."""
    import json
    import struct

    import torch
    from safetensors.torch import save_file

    from coordinator.uploads import WEIGHTS, UploadError, check_shard
    from proto.manifest import parameter_checksum

    shapes = {"a": (2, 3), "b": (4,)}
    good = {"a": torch.randn(2, 3), "b": torch.randn(4)}
    agreed = parameter_checksum(good)

    def shard(tensors, name="shard.safetensors"):
        path = tmp_path / name
        save_file(tensors, str(path))
        return path

    check_shard(shard(good), WEIGHTS, shapes, agreed)  # the agreed weights pass
    for tensors, why in (({**good, "b": torch.randn(5)}, "expected floating point"), ({**good, "b": torch.arange(4)}, "expected floating point"),
                         ({**good, "b": torch.tensor([1.0, float("nan"), 0.0, 0.0])}, "NaN"), ({"a": good["a"]}, "missing"),
                         ({**good, "b": good["b"] + 1e-3}, "not those the stage's replicas agreed on")):
        with pytest.raises(UploadError, match=why):
            check_shard(shard(tensors), WEIGHTS, shapes, agreed)
    # A header naming one tensor twice: readers would keep one of the two silently, and not all the same one.
    entry = {"dtype": "F32", "shape": [4], "data_offsets": [24, 40]}
    header = ('{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"b":' + json.dumps(entry) + ',"b":' + json.dumps(entry) + "}").encode()
    twice = tmp_path / "twice.safetensors"
    twice.write_bytes(struct.pack("<Q", len(header)) + header + bytes(40))
    with pytest.raises(UploadError, match="more than once"):
        check_shard(twice, WEIGHTS, shapes)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(UploadError, match="header claims"):
        check_shard(huge, WEIGHTS, shapes)


def test_an_unrequested_upload_is_refused_and_the_coordinator_serves_on(run):
    reply = join(run.stub, name="uploader")
    metadata = ((CREDENTIAL_METADATA, reply.credential),)

    def chunks():
        yield pb.CheckpointChunk(peer_id=reply.peer_id, round=1, stage=reply.stage, part="weights", total_bytes=1 << 20, sha256="0" * 64,
                                 data=b"\0" * 1024)

    answer = run.stub.UploadCheckpoint(chunks(), timeout=10, metadata=metadata)
    assert not answer.accepted and "was requested" in answer.message
    assert heartbeat(run.stub, reply.peer_id, reply.credential).known  # still serving


def test_an_evaluating_worker_id_alone_grants_nothing(tmp_path):
    token = tmp_path / "join-token"
    token.write_text(SECRET + "\n")
    s = Swarm(tmp_path / "run", "--stages", "1", "--rounds", "1", "--eval-on", "peer", "--join-token-file", str(token))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{s.port}") as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            ask = lambda worker_id="", credential="": stub.NextEvaluation(  # noqa: E731
                pb.EvalJobRequest(protocol_version=PROTOCOL_VERSION, join_token=SECRET, worker_id=worker_id), timeout=10,
                metadata=((CREDENTIAL_METADATA, credential),) if credential else None)
            job = ask()
            assert job.worker_id in s.get_text("/api/status")
            assert job.credential and job.credential not in s.get_text("/") + s.get_text("/api/status") + s.log_tail(400)
            refused(lambda: ask(job.worker_id), grpc.StatusCode.UNAUTHENTICATED)  # its id, which the status page shows: not enough
            refused(lambda: ask(job.worker_id, "forged"), grpc.StatusCode.UNAUTHENTICATED)
            report = pb.EvalReport(join_token=SECRET, worker_id=job.worker_id, round=0, error="forged failure")
            refused(lambda: stub.ReportEvaluation(report, timeout=10), grpc.StatusCode.UNAUTHENTICATED)
            assert ask(job.worker_id, job.credential).worker_id == job.worker_id  # the worker itself goes on
    finally:
        s.stop()
