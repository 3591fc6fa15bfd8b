"""The wire contract shared by peer and coordinator: protobuf messages, tensor codecs, run config."""

PROTOCOL_VERSION = 1
"""Bumped whenever a message or its meaning changes; checked at Join and on every frame."""

PACKAGE_VERSION = "0.1.0"
