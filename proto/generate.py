"""Regenerate proto/hometrain_pb2*.py from proto/hometrain.proto (needs grpcio-tools).

Run from anywhere: ``python -m proto.generate``. The stubs are committed so that installing
the project needs no code generation; a test checks they match the .proto file.
"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def generate(out_dir: pathlib.Path = ROOT) -> None:
    """Write the stubs under ``out_dir/proto``; raises RuntimeError if protoc fails."""
    from grpc_tools import protoc

    (out_dir / "proto").mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{ROOT}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", "proto/hometrain.proto"]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on proto/hometrain.proto: {' '.join(args)}")


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
