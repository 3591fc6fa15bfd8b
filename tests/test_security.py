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
