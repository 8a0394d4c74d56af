"""The committed generated code must be what protoc makes of policy.proto today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

GENERATED = ("policy_pb2.py", "policy_pb2.pyi", "policy_pb2_grpc.py")


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    (tmp_path / "protos").mkdir()
    (tmp_path / "protos" / "policy.proto").write_bytes(
        (ROOT / "protos" / "policy.proto").read_bytes()
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I.",
            "--python_out=.",
            "--pyi_out=.",
            "--grpc_python_out=.",
            "protos/policy.proto",
        ],
        cwd=tmp_path,
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "protos" / name).read_text()
        committed = (ROOT / "protos" / name).read_text()
        assert fresh == committed, f"protos/{name} drifted from policy.proto: run `make protos`"


def test_no_pickle_on_the_wire() -> None:
    text = (ROOT / "protos" / "policy.proto").read_text()
    assert "pickle" not in text.replace("No pickle on the wire", "")
