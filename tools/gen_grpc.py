#!/usr/bin/env python
"""Regenerate cosyjax/serving/cosyvoice_pb2.py and cosyvoice_pb2_grpc.py from cosyvoice.proto.

Usage::

    python tools/gen_grpc.py          # needs grpcio-tools (pip install "cosyjax[dev]")
    python tools/gen_grpc.py --check  # exit 1 if the committed modules differ from a fresh generation

protoc writes ``from cosyjax.serving import cosyvoice_pb2`` into the service module (the proto is
compiled relative to the repository root, so its descriptor is registered as
``cosyjax/serving/cosyvoice.proto``, not under upstream's bare ``cosyvoice.proto``); that import is
rewritten to the package-relative ``from . import cosyvoice_pb2`` so the package can be vendored or
renamed.  The generated modules check at import that the installed protobuf / grpcio are at least
the versions that generated them (see the server extra in pyproject.toml).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO = "cosyjax/serving/cosyvoice.proto"
OUTPUTS = ("cosyvoice_pb2.py", "cosyvoice_pb2_grpc.py")
ABSOLUTE_IMPORT = re.compile(r"^from cosyjax\.serving import cosyvoice_pb2 as", re.MULTILINE)


def generate(out_dir: str) -> None:
    """Run protoc (grpc_tools) on the proto into ``out_dir`` and fix the service module's import."""
    try:
        from grpc_tools import protoc
    except ImportError:
        sys.exit('tools/gen_grpc.py needs grpcio-tools: pip install grpcio-tools (or "cosyjax[dev]")')
    import importlib.resources

    well_known = str(importlib.resources.files("grpc_tools") / "_proto")  # google/protobuf/*.proto
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main(["grpc_tools.protoc", f"--proto_path={ROOT}", f"--proto_path={well_known}",
                          f"--python_out={tmp}", f"--grpc_python_out={tmp}", os.path.join(ROOT, PROTO)])
        if rc != 0:
            sys.exit(f"protoc failed on {PROTO} (exit status {rc})")
        generated = os.path.join(tmp, os.path.dirname(PROTO))
        for name in OUTPUTS:
            with open(os.path.join(generated, name), encoding="utf-8") as f:
                text = f.read()
            if name.endswith("_grpc.py"):
                text, count = ABSOLUTE_IMPORT.subn("from . import cosyvoice_pb2 as", text)
                if count != 1:
                    sys.exit(f"{name}: expected one 'from cosyjax.serving import cosyvoice_pb2' line, found {count}")
            with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
                f.write(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="compare a fresh generation with the committed modules instead of writing them")
    args = parser.parse_args(argv)
    target = os.path.join(ROOT, os.path.dirname(PROTO))
    if not args.check:
        generate(target)
        print(f"wrote {', '.join(os.path.join(os.path.dirname(PROTO), n) for n in OUTPUTS)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp)
        stale = []
        for name in OUTPUTS:
            with open(os.path.join(tmp, name), encoding="utf-8") as a:
                fresh = a.read()
            committed = os.path.join(target, name)
            current = open(committed, encoding="utf-8").read() if os.path.exists(committed) else None
            if fresh != current:
                stale.append(name)
    if stale:
        print(f"stale generated module(s): {', '.join(stale)}; run python tools/gen_grpc.py", file=sys.stderr)
        return 1
    print("generated gRPC modules are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
