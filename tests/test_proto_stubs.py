"""The committed gRPC/protobuf stubs are what proto/hometrain.proto generates."""

from __future__ import annotations

import pathlib

import pytest

from proto.generate import ROOT, generate


def test_stubs_are_up_to_date(tmp_path: pathlib.Path):
    pytest.importorskip("grpc_tools")
    generate(tmp_path)
    for name in ("hometrain_pb2.py", "hometrain_pb2_grpc.py"):
        assert (tmp_path / "proto" / name).read_text() == (ROOT / "proto" / name).read_text(), f"run python -m proto.generate: {name} is stale"
