"""Table integrity without reading the table: start-up flat in table size, blocks checked on touch.

Synthetic bundles (models.meki.synthetic) have sparse all-zero tables of 8 and 64 MiB, so
size costs no disk; each start is measured in a fresh process from /proc/self/io.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from edge.llm.runtime import LlmRuntime
from edge.llm.sampling import Sampler
from edge.llm.spec import BLOCK_BYTES
from models.meki.fold import fold_run
from models.meki.model import MeKiConfig
from models.meki.synthetic import synthetic_bundle
from splitedge.cli import main
from splitedge.errors import SplitedgeError
from tests.test_llm_runtime import SMALL
from tests.test_meki_fold import build_run

MIB = 1 << 20


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("llm-synthetic")
    return {mib: _made(root / f"t{mib}", mib) for mib in (8, 64)}


def _made(out: Path, mib: int) -> Path:
    synthetic_bundle(out, mib * MIB)
    return out


@pytest.fixture(scope="module")
def folded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small MeKi bundle with a random (non-zero) fp16 table."""
    root = tmp_path_factory.mktemp("llm-tar")
    val = np.random.default_rng(0).integers(1, SMALL["vocab_size"], size=200)
    build_run(root / "run", MeKiConfig(meki="both", **SMALL), val)
    fold_run(root / "run", root / "b", dtype="fp16", val_tokens=100)
    return root / "b"


def test_start_up_reads_no_table_and_does_not_grow_with_it(synthetic):
    from edge.llm.startup import _open_new, evict, fresh

    got = {}
    for mib, bundle in synthetic.items():
        evict(bundle)
        got[mib] = fresh(_open_new, str(bundle), [1, 2, 3], 2)
        assert got[mib]["table_bytes"] == mib * MIB
        assert got[mib]["table_hashed_at_start"] == 0 and got[mib]["resident_at_start"] == 0
        decoder = (bundle / "decoder.onnx").stat().st_size
        manifest = (bundle / "manifest.json").stat().st_size
        # the open reads the manifest and the decoder once; everything else is under 1 MiB
        assert got[mib]["rchar"] <= manifest + decoder + MIB, got[mib]
        assert got[mib]["blocks_verified"] >= 1  # the prompt's blocks, on first touch
    # 8x the table: start-up reads grow only by the bigger manifest and decoder
    grow = {
        f: (synthetic[64] / f).stat().st_size - (synthetic[8] / f).stat().st_size
        for f in ("decoder.onnx", "manifest.json")
    }
    assert got[64]["rchar"] - got[8]["rchar"] <= sum(grow.values()) + 64 * 1024, (got, grow)


def test_a_corrupt_block_is_refused_on_first_read_naming_it(synthetic, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(synthetic[8], bundle)
    record = json.loads((bundle / "manifest.json").read_text())["llm"]["table"]["record_bytes"]
    pos = 5 * BLOCK_BYTES + 100  # inside block 5 of 8
    with open(bundle / "table.bin", "r+b") as f:
        f.seek(pos)
        f.write(b"\x01")
    rt = LlmRuntime(bundle)  # opens: nothing of the table is read yet
    assert rt.table is not None and rt.table.bytes_hashed == 0
    rt.forward([0])  # block 0 is intact
    with pytest.raises(SplitedgeError, match=r"table.bin block 5 of 8 \(bytes 5242880-6291455\)"):
        rt.forward([pos // record])
    assert rt.table.blocks_verified == 1
    rt.close()


def test_pages_a_verified_block_does_not_need_are_dropped(synthetic):
    rt = LlmRuntime(synthetic[64])
    assert rt.table is not None
    rt.table.drop_cache()
    record = rt.table.record.itemsize  # 4 KiB: one page per token
    tokens = [3, 3 + BLOCK_BYTES // record, 5]  # blocks 0, 1, 0
    for t in tokens:
        rt.forward([t])
    assert rt.table.blocks_verified == 2 and rt.table.bytes_hashed == 2 * BLOCK_BYTES
    resident = rt.table.resident_bytes()
    assert resident is not None and resident <= 3 * record  # not the 2 MiB just hashed
    rt.close()


def test_an_uncompressed_tar_is_read_in_place(folded, tmp_path):
    tar = tmp_path / "b.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(folded, arcname="b")
    with tarfile.open(tar) as tf:
        offset = tf.getmember("b/table.bin").offset_data
    greedy = Sampler(greedy=True)
    from_dir = LlmRuntime(folded).generate_ids([5, 6, 7], 12, greedy, stop_at_eot=False)
    rt = LlmRuntime(tar)
    assert rt.table is not None and rt.table.path == tar.resolve()
    assert rt.table.offset == offset > 0  # the member inside the tar, not a copy
    assert rt.generate_ids([5, 6, 7], 12, greedy, stop_at_eot=False).ids == from_dir.ids
    rt.close()
    assert not list(Path("/tmp").glob("splitedge-bundle-*/b/table.bin"))  # nothing extracted


def test_a_compressed_tar_is_refused_with_the_reason(folded, tmp_path, capsys):
    tgz = tmp_path / "b.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(folded, arcname="b")
    rc = main(["llm", "generate", "--bundle", str(tgz), "Hi"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "compressed tar" in err and "tar xf" in err
    assert len(err.strip().splitlines()) == 1


def test_a_bundle_without_block_digests_is_hashed_whole_at_open(folded, tmp_path):
    bundle = tmp_path / "old"
    shutil.copytree(folded, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["llm"]["table"]["blocks"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    rt = LlmRuntime(bundle)
    assert rt.table is not None and rt.table.bytes_hashed == rt.table.size_bytes
    rt.close()
    with open(bundle / "table.bin", "r+b") as f:
        f.write(b"\xff\xff")
    with pytest.raises(SplitedgeError, match="does not match its sha256"):
        LlmRuntime(bundle)


def test_report_sections_survive_a_regenerated_report():
    from edge.llm.startup import marked_sections, replace_section

    text = replace_section("# bench\n\ntable\n", "## Start-up\nrows\n")
    text = replace_section(text, "new rows\n")  # rewritten in place, not appended twice
    text = replace_section(text, "zoo line\n", name="zoo")
    assert text.count("<!-- startup -->") == 1 and "new rows" in text and "\nrows" not in text
    assert marked_sections(text) == [
        "<!-- startup -->\nnew rows\n<!-- /startup -->\n",
        "<!-- zoo -->\nzoo line\n<!-- /zoo -->\n",
    ]
