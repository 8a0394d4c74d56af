"""policy.realtime in a bundle (splitedge/realtime_spec.py), read by the server against its ONNX.

Good and bad values one by one; a bundle whose manifest claims a chunk or a history its
head.onnx does not have is refused when the server loads it, in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from server.models import PolicyModels
from splitedge.bundle import write_manifest
from splitedge.errors import SplitedgeError
from splitedge.realtime_spec import FORMAT, FORMAT_V2, RealtimeSpec, realtime_spec
from tests.conftest import ZOO_BUNDLE


def section(**changes: Any) -> dict[str, Any]:
    return {"realtime": {"format": FORMAT, "chunk_length": 1, "action_history": 0, **changes}}


def test_a_bundle_without_the_section_is_a_plain_head() -> None:
    spec = realtime_spec({})
    assert (spec.chunk_length, spec.action_history, spec.control_hz) == (1, 0, None)
    assert spec.strategy == "hold"


@pytest.mark.parametrize(
    ("changes", "strategy", "text"),
    [
        ({"chunk_length": 8, "control_hz": 20}, "chunk", "chunk 8"),
        ({"action_history": 7, "control_hz": 20.0}, "delay-aware", "delay-aware (history 7)"),
        ({"control_hz": None}, "hold", "hold"),
        (
            {"format": FORMAT_V2, "action_history": 7, "history_source": "server"},
            "delay-aware",
            "delay-aware (history 7, server-kept)",
        ),
    ],
)
def test_good_sections(changes: dict[str, Any], strategy: str, text: str) -> None:
    spec = realtime_spec(section(**changes))
    assert spec.strategy == strategy and spec.describe() == text
    # what export writes reads back as the same spec
    assert realtime_spec({"realtime": spec.to_manifest()}) == spec


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"chunk_length": 0}, "chunk_length must be an integer in"),
        ({"chunk_length": 2.0}, "chunk_length must be an integer in"),
        ({"chunk_length": True}, "chunk_length must be an integer in"),
        ({"chunk_length": 257}, "chunk_length must be an integer in"),
        ({"action_history": -1}, "action_history must be an integer in"),
        ({"action_history": "3"}, "action_history must be an integer in"),
        ({"control_hz": 0}, "control_hz must be a number > 0"),
        ({"control_hz": float("nan")}, "control_hz must be a number > 0"),
        ({"format": "splitedge-realtime/9"}, "format is 'splitedge-realtime/9'"),
        ({"chunk_length": 4, "strategy": "delay-aware"}, "does not match"),
        # history_source: only in format /2, only "server" there, only with a history
        ({"action_history": 3, "history_source": "server"}, "history_source needs format"),
        ({"format": FORMAT_V2, "action_history": 3}, "is for history_source 'server'"),
        (
            {"format": FORMAT_V2, "action_history": 3, "history_source": "cloud"},
            "history_source must be one of",
        ),
        ({"format": FORMAT_V2, "history_source": "server"}, "with action_history > 0"),
    ],
)
def test_bad_sections_are_one_line(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(SplitedgeError, match=message) as e:
        realtime_spec(section(**changes), "bundle b")
    assert "\n" not in str(e.value) and str(e.value).startswith("bundle b: ")


def test_not_an_object() -> None:
    with pytest.raises(SplitedgeError, match="must be an object"):
        realtime_spec({"realtime": [1, 2]})


def test_the_dataclass_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="chunk_length"):
        RealtimeSpec(chunk_length=0)
    with pytest.raises(ValueError, match="history_source"):
        RealtimeSpec(action_history=2, history_source="cloud")


def test_export_names_who_keeps_the_history() -> None:
    """A run recorded with the device's history (before the server kept it) still exports
    as format /1, so its bundle behaves as it did; a server-history run as format /2."""
    from models.realtime_export import spec_of

    record = {"chunk_length": 1, "action_history": 7, "control_hz": 20.0}
    device = spec_of({**record, "history": "known"})
    server = spec_of({**record, "history": "server"})
    assert (device.server_history, device.to_manifest()["format"]) == (False, FORMAT)
    assert (server.server_history, server.to_manifest()["format"]) == (True, FORMAT_V2)


def relabelled(tmp_path: Path, **realtime: Any) -> Path:
    """The zoo bundle (plain head: one input, (B,) int64 out) with a realtime section added."""
    out = tmp_path / "b"
    shutil.copytree(ZOO_BUNDLE, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["policy"]["realtime"] = {"format": FORMAT, **realtime}
    del manifest["format"], manifest["files"]
    write_manifest(out, manifest)
    return out


def test_server_refuses_a_history_the_head_does_not_read(tmp_path: Path) -> None:
    bundle = relabelled(tmp_path, chunk_length=1, action_history=3)
    with pytest.raises(SplitedgeError, match="must have 2 inputs and one output"):
        PolicyModels.load(bundle)


def test_server_refuses_a_chunk_the_head_does_not_answer(tmp_path: Path) -> None:
    bundle = relabelled(tmp_path, chunk_length=4, action_history=0)
    with pytest.raises(SplitedgeError, match=r"answers shape \[1\] where the manifest"):
        PolicyModels.load(bundle)


def test_server_loads_a_plain_section(tmp_path: Path) -> None:
    models = PolicyModels.load(relabelled(tmp_path, chunk_length=1, action_history=0))
    assert models.realtime == RealtimeSpec() and models.history is None
