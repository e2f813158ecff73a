"""verify_dataset on real damaged files: every problem names the file and the fix; the cheap checks never read a
.bin (a flipped byte there needs full=True); Megatron-Core's index reader is the oracle for the .idx files; the
fingerprint identifies content, not the path."""

import json
import os
import shutil
import struct

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, _IndexReader
from test_data_format import _groups, _write

from megatron_offgrpo.data import (
    DatasetFormatError,
    TrajectoryDataset,
    add_per_token_array,
    check_dataset,
    dataset_fingerprint,
    verify_dataset,
)
from megatron_offgrpo.data.format import sha256_file

REBUILD = "rebuild with tools/preprocess/build_dataset.py"
RECOMPUTE = "recompute the array with tools/preprocess/precompute_logprobs.py"


@pytest.fixture
def ds(tmp_path):
    prefix = str(tmp_path / "ds")
    _write(prefix, _groups())  # 5 groups x 4 sequences, int32 tokens, ref_logp
    return prefix


def _pointer_offset(idx_path, i):
    """Byte offset of sequence i's int64 pointer inside a Megatron .idx (after the header and the int32 lengths)."""
    with open(idx_path, "rb") as f:
        header = f.read(34)
    n = struct.unpack("<Q", header[18:26])[0]
    return 34 + 4 * n + 8 * i


def _shift_pointer(idx_path, i, by):
    off = _pointer_offset(idx_path, i)
    with open(idx_path, "r+b") as f:
        f.seek(off)
        (p,) = struct.unpack("<q", f.read(8))
        f.seek(off)
        f.write(struct.pack("<q", p + by))
    return p


def _set_manifest(prefix, fn):
    m = json.load(open(prefix + ".json"))
    fn(m)
    json.dump(m, open(prefix + ".json", "w"), indent=2)


def test_sound_dataset(ds):
    assert verify_dataset(ds) == [] and verify_dataset(ds, full=True) == []
    m = TrajectoryDataset(ds).manifest
    assert all(len(rec["sha256"]) == 64 for rec in m["files"].values())  # the .bin files are hashed too
    assert m["files"][".bin"]["sha256"] == sha256_file(ds + ".bin")


def test_shifted_pointer_is_a_hash_mismatch_of_the_idx(ds):
    size = os.path.getsize(ds + ".idx")
    _shift_pointer(ds + ".idx", 3, 2)
    assert os.path.getsize(ds + ".idx") == size
    problems = verify_dataset(ds)
    assert any(p.startswith(f"{ds}.idx: sha256") and "does not match the manifest" in p and REBUILD in p
               for p in problems), problems
    with pytest.raises(DatasetFormatError, match=r"ds\.idx: sha256"):
        TrajectoryDataset(ds)


def test_inconsistent_index_under_a_consistent_manifest(ds):
    """The .idx hash matches the (rewritten) manifest, so only the pointer sanity check can tell."""
    p = _shift_pointer(ds + ".idx", 7, 2)
    _set_manifest(ds, lambda m: m["files"][".idx"].update(sha256=sha256_file(ds + ".idx")))
    problems = verify_dataset(ds)
    assert not any("sha256" in x for x in problems)
    expected = f"{ds}.idx: sequence 7: pointer {p + 2} != pointer[6] + length[6] * 4 = {p}"
    assert any(x.startswith(expected) and REBUILD in x for x in problems), problems
    # Megatron-Core itself would have read sequence 7 from the wrong offset without a word
    reader = _IndexReader(ds + ".idx", multimodal=False)
    assert int(reader.sequence_pointers[7]) == p + 2
    del reader
    with pytest.raises(DatasetFormatError, match="sequence 7: pointer"):
        TrajectoryDataset(ds)


def test_per_token_array_lengths_must_match_the_tokens(ds):
    """A well-formed float32 IndexedDataset with one sequence one value short, recorded in the manifest."""
    lengths = TrajectoryDataset(ds).sequence_lengths
    b = IndexedDatasetBuilder(ds + ".ref_logp.bin", dtype=np.float32)
    for i, n in enumerate(lengths):
        b.add_item(torch.zeros(int(n) - (i == 11), dtype=torch.float32))
        b.end_document()
    b.finalize(ds + ".ref_logp.idx")

    def fix(m):
        for s in (".bin", ".idx"):
            m["files"][f".ref_logp{s}"] = {"bytes": os.path.getsize(ds + ".ref_logp" + s),
                                          "sha256": sha256_file(ds + ".ref_logp" + s)}

    _set_manifest(ds, fix)
    problems = verify_dataset(ds)
    assert len(problems) == 1 and problems[0].startswith(
        f"{ds}.ref_logp.idx: sequence 11 has {lengths[11] - 1} values, the token sequence {lengths[11]} tokens")
    assert RECOMPUTE in problems[0] and "--array ref_logp" in problems[0]
    # the token data is fine, so the array can be recomputed in place
    assert verify_dataset(ds, per_token_arrays=()) == []
    add_per_token_array(ds, "ref_logp", [np.zeros(n, np.float32) for n in lengths], {"model": "m"})
    assert verify_dataset(ds, full=True) == []


def test_truncated_bin_is_named_with_sizes(ds):
    size = os.path.getsize(ds + ".bin")
    with open(ds + ".bin", "r+b") as f:
        f.truncate(size - 8)
    problems = verify_dataset(ds)
    assert f"{ds}.bin: {size - 8} bytes, the manifest says {size}" in problems[0] and REBUILD in problems[0]
    assert any(f"ends at byte {size}, but {ds}.bin has {size - 8} bytes" in p for p in problems)
    with pytest.raises(DatasetFormatError, match=f"{size - 8} bytes"):
        TrajectoryDataset(ds)


def test_flipped_byte_in_bin_needs_full(ds):
    with open(ds + ".bin", "r+b") as f:
        f.seek(40)  # the low byte of a token (int32, aligned): XOR 1 keeps it inside the vocabulary
        b = f.read(1)
        f.seek(40)
        f.write(bytes([b[0] ^ 1]))
    assert verify_dataset(ds) == []  # cheap: sizes and index are intact, the .bin is not read
    TrajectoryDataset(ds)
    problems = verify_dataset(ds, full=True)
    assert len(problems) == 1 and problems[0].startswith(f"{ds}.bin: sha256") and REBUILD in problems[0]


def test_nan_in_per_token_array_needs_full(ds):
    reader = _IndexReader(ds + ".ref_logp.idx", multimodal=False)
    ptr = int(reader.sequence_pointers[9])
    del reader
    with open(ds + ".ref_logp.bin", "r+b") as f:
        for tok, v in ((1, np.nan), (3, np.inf)):  # every sequence has >= 4 tokens
            f.seek(ptr + 4 * tok)
            f.write(np.float32(v).tobytes())
    assert verify_dataset(ds) == []
    problems = verify_dataset(ds, full=True)
    finite = [p for p in problems if "non-finite" in p]
    assert len(finite) == 1, problems
    assert finite[0].startswith(f"{ds}.ref_logp.bin: 2 non-finite value(s): sequence 9 (group 2, rollout_index 1) "
                                "token 1 = nan; sequence 9 (group 2, rollout_index 1) token 3 = inf")
    assert RECOMPUTE in finite[0]
    assert any(p.startswith(f"{ds}.ref_logp.bin: sha256") for p in problems)  # the recorded hash catches it too


def test_token_ids_outside_the_vocabulary_need_full(ds):
    _set_manifest(ds, lambda m: m.update(tokenizer={"vocab_size": 1000}))  # tokens were drawn below 70000
    problems = verify_dataset(ds, full=True)
    assert any("token id(s) outside the tokenizer's vocabulary [0, 1000): sequence 0" in p for p in problems)


def test_old_manifest_without_bin_hashes_still_loads(ds):
    def drop(m):
        for s in (".bin", ".ref_logp.bin"):
            del m["files"][s]["sha256"]

    _set_manifest(ds, drop)
    assert len(TrajectoryDataset(ds)) == 20
    rep = check_dataset(ds, full=True)
    assert rep.problems == []
    assert len(rep.notes) == 2 and all("records no sha256" in n for n in rep.notes)
    assert verify_dataset(ds, full=True) == []


def test_missing_files_manifest_and_counts(ds, tmp_path):
    os.remove(ds + ".meta.groups.parquet")
    _set_manifest(ds, lambda m: m["counts"].update(sequences=21))
    problems = verify_dataset(ds)
    assert f"{ds}.meta.groups.parquet: listed in the manifest but missing; {REBUILD}" in problems
    assert any(p.startswith(f"{ds}.idx: 20 sequences, the manifest counts 21") for p in problems)
    assert any(p.startswith(f"{ds}.meta.parquet: 20 rows, the manifest counts 21") for p in problems)
    with pytest.raises(DatasetFormatError) as e:
        TrajectoryDataset(ds)
    assert str(e.value).count("\n  - ") == len(problems)  # every problem listed, not just the first
    assert "no manifest" in verify_dataset(str(tmp_path / "nothing"))[0]
    _set_manifest(ds, lambda m: m.update(format="other"))
    assert "format 'other'" in verify_dataset(ds)[0]


def test_garbage_index_is_reported_not_raised(ds):
    with open(ds + ".ref_logp.idx", "r+b") as f:
        f.write(b"NOTANIDX!")
    problems = verify_dataset(ds)
    assert any(p.startswith(f"{ds}.ref_logp.idx: Megatron-Core cannot read this index") and RECOMPUTE in p
               for p in problems)
    assert verify_dataset(ds, per_token_arrays=()) == []
    assert len(TrajectoryDataset(ds, per_token_arrays=())) == 20


def test_fingerprint_is_content_not_path(ds, tmp_path):
    fp = dataset_fingerprint(ds)
    assert len(fp) == 64 and fp == TrajectoryDataset(ds).fingerprint()
    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path, moved, ignore=shutil.ignore_patterns("elsewhere"))
    _set_manifest(str(moved / "ds"), lambda m: m.update(created_unix=0.0, preprocess_args={"output_prefix": "x"}))
    assert dataset_fingerprint(str(moved / "ds")) == fp
    other = str(tmp_path / "other")
    _write(other, _groups(seed=5))
    assert dataset_fingerprint(other) != fp
    # attaching an array changes the whole-dataset fingerprint, not the fingerprint over the arrays a run uses
    lengths = TrajectoryDataset(ds).sequence_lengths
    add_per_token_array(ds, "teacher_logp", [np.zeros(n, np.float32) for n in lengths], {"model": "t"})
    assert dataset_fingerprint(ds) != fp
    assert dataset_fingerprint(ds, per_token_arrays=["ref_logp"]) == fp
    assert TrajectoryDataset(ds, per_token_arrays=["ref_logp"]).fingerprint() == fp


def test_verify_cli_exit_codes(ds):
    import subprocess
    import sys

    cli = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "preprocess",
                       "verify_dataset.py")
    run = lambda *a: subprocess.run([sys.executable, cli, *a], capture_output=True, text=True, timeout=120)  # noqa: E731
    out = run(ds, "--full")
    assert out.returncode == 0 and "OK (full checks)" in out.stdout, out.stderr
    with open(ds + ".bin", "r+b") as f:  # a flipped byte: only the full check sees it
        f.seek(40)
        b = f.read(1)
        f.seek(40)
        f.write(bytes([b[0] ^ 1]))
    assert run(ds).returncode == 0
    out = run(ds, "--full")
    assert out.returncode == 1 and f"error: {ds}.bin: sha256" in out.stderr
