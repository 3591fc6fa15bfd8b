"""The wire contract shared by peer and coordinator: protobuf messages, tensor codecs, run config."""

PROTOCOL_VERSION = 4
"""Bumped whenever a message or its meaning changes; checked at Join and on every frame."""

PACKAGE_VERSION = "0.2.0"

GRPC_MAX_MESSAGE_BYTES = 64 << 20
"""Largest control-plane message either side sends or accepts (checkpoint uploads are streamed in 1 MiB chunks)."""

NO_GRADIENT = -1.0
"""The squared gradient norm a replica reports for global clipping when it trained nothing in the round."""

REACHABILITY_NONCE_BYTES = 16
"""What a peer's probe listener writes to the coordinator dialling it back (CheckReachability)."""
