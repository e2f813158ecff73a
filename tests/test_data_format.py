"""Dataset format (docs/design.md §5): Megatron-Core's own IndexedDataset is the oracle for the token files;
per-token arrays are finite when written and when read. (Killed writers: test_data_atomic.py; damaged files:
test_data_verify.py.)"""

import json
import os

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_offgrpo.data import (
    DatasetFormatError,
    SequenceRecord,
    TrajectoryDataset,
    TrajectoryDatasetWriter,
    add_per_token_array,
)


def _groups(seed=0, n_groups=5, k=4, vocab=70000):
    rng = np.random.default_rng(seed)
    out = []
    for g in range(n_groups):
        seqs = []
        for i in range(k):
            n = int(rng.integers(4, 40))
            p = int(rng.integers(1, n))
            toks = rng.integers(0, vocab, size=n)
            seqs.append(SequenceRecord(toks, p, float(i % 2), i, answer=str(i),
                                       per_token={"ref_logp": -rng.random(n).astype(np.float32)}))
        out.append(({"problem_id": f"p{g}", "problem": f"problem {g}", "agreement": 0.75}, seqs))
    return out


def _write(prefix, groups, vocab=70000, arrays=("ref_logp",)):
    with TrajectoryDatasetWriter(prefix, vocab, arrays) as w:
        for meta, seqs in groups:
            w.add_group(meta, seqs)
        return w.commit({"tokenizer": {"name_or_path": "test"}})


@pytest.mark.parametrize("vocab", [300, 70000])  # uint16 and int32 token files
def test_megatron_reads_tokens_back_identically(tmp_path, vocab):
    prefix = str(tmp_path / "ds")
    groups = _groups(vocab=vocab)
    manifest = _write(prefix, groups, vocab)
    flat = [s for _, seqs in groups for s in seqs]

    meg = IndexedDataset(prefix)
    assert len(meg) == len(flat) == manifest["counts"]["sequences"]
    assert meg.index.dtype == (np.uint16 if vocab < 65500 else np.int32)
    for i, s in enumerate(flat):
        np.testing.assert_array_equal(meg[i].astype(np.int64), s.tokens)
    meg_ref = IndexedDataset(prefix + ".ref_logp")
    assert meg_ref.index.dtype == np.float32
    for i, s in enumerate(flat):
        np.testing.assert_array_equal(meg_ref[i], s.per_token["ref_logp"])

    ds = TrajectoryDataset(prefix)
    assert len(ds) == len(flat)
    for i in (0, 7, len(flat) - 1):
        item = ds[i]
        assert item["tokens"].dtype == torch.int64
        assert torch.equal(item["tokens"], torch.from_numpy(flat[i].tokens.astype(np.int64)))
        assert item["prompt_len"] == flat[i].prompt_len and item["reward"] == flat[i].reward
        assert item["group_id"] == i // 4 and item["rollout_index"] == i % 4
        assert item["ref_logp"].dtype == torch.float32 and torch.equal(item["ref_logp"], torch.from_numpy(flat[i].per_token["ref_logp"]))
    assert ds.groups() == {g: [4 * g + j for j in range(4)] for g in range(5)}
    assert ds.group_metadata()[3]["problem_id"] == "p3" and ds.group_metadata()[3]["k"] == 4
    assert ds.manifest["tokenizer"]["name_or_path"] == "test"
    with pytest.raises(IndexError):
        ds[len(ds)]


def _write_without_arrays(prefix):
    """The test groups written with no per-token array (the arrays are attached afterwards)."""
    groups = _groups()
    for _, seqs in groups:
        for s in seqs:
            s.per_token = {}
    _write(prefix, groups, arrays=())
    return prefix


def test_add_per_token_array_and_producer(tmp_path):
    prefix = _write_without_arrays(str(tmp_path / "ds"))
    ds = TrajectoryDataset(prefix)
    assert ds.per_token_array_names == []
    teacher = [np.full(n, -0.5, np.float32) for n in ds.sequence_lengths]
    add_per_token_array(prefix, "teacher_logp", teacher, {"model": "teacher-x"})
    ds = TrajectoryDataset(prefix)
    assert ds.manifest["per_token_arrays"]["teacher_logp"]["producer"]["model"] == "teacher-x"
    assert torch.equal(ds[3]["teacher_logp"], torch.from_numpy(teacher[3]))
    with pytest.raises(ValueError, match="shape"):
        add_per_token_array(prefix, "ref_logp", [np.zeros(1)] * len(ds), {"model": "m"})
    assert "ref_logp" not in TrajectoryDataset(prefix).manifest["per_token_arrays"]


def test_reader_refuses_inconsistent_files(tmp_path):
    prefix = str(tmp_path / "ds")
    _write(prefix, _groups())
    with open(prefix + ".bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(DatasetFormatError, match="bytes"):
        TrajectoryDataset(prefix)
    with pytest.raises(DatasetFormatError, match="no manifest"):
        TrajectoryDataset(str(tmp_path / "missing"))
    m = json.load(open(prefix + ".json"))
    m["format_version"] = 99
    json.dump(m, open(prefix + ".json", "w"))
    with pytest.raises(DatasetFormatError, match="format_version"):
        TrajectoryDataset(prefix)


def test_writer_exception_cleans_temporaries(tmp_path):
    prefix = str(tmp_path / "ds")
    with pytest.raises(ValueError):
        with TrajectoryDatasetWriter(prefix, 100) as w:
            w.add_group({}, [SequenceRecord(np.arange(5), 5, 1.0, 0)])  # no response token
    assert os.listdir(tmp_path) == []
    with TrajectoryDatasetWriter(prefix, 100) as w:
        with pytest.raises(ValueError, match="empty"):
            w.commit()


def test_item_carries_its_index(tmp_path):
    prefix = str(tmp_path / "ds")
    _write(prefix, _groups())
    ds = TrajectoryDataset(prefix)
    assert [ds[i]["index"] for i in (0, 5, 19)] == [0, 5, 19]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_writer_refuses_non_finite_per_token_values(tmp_path, bad):
    prefix = str(tmp_path / "ds")
    groups = _groups()
    groups[1][1][2].per_token["ref_logp"][5] = bad  # group 1, its sequence 2 (dataset sequence 6), token 5
    with TrajectoryDatasetWriter(prefix, 70000, ("ref_logp",)) as w:
        w.add_group(*groups[0])
        with pytest.raises(ValueError, match=r"group 1 \(problem_id 'p1'\), sequence 2 of the group \(dataset sequence "
                                             r"6, rollout_index 2\): per-token array ref_logp is -?(nan|inf) at token 5"):
            w.add_group(*groups[1])
        assert w.num_sequences == 4  # the bad group left nothing behind
        for meta, seqs in groups[2:]:
            w.add_group(meta, seqs)
        w.commit()
    assert len(TrajectoryDataset(prefix)) == 16


def test_add_per_token_array_refuses_non_finite_values(tmp_path):
    prefix = _write_without_arrays(str(tmp_path / "ds"))
    ds = TrajectoryDataset(prefix)
    teacher = [np.full(n, -0.5, np.float32) for n in ds.sequence_lengths]
    teacher[9][2] = np.nan
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match=r"teacher_logp: sequence 9 \(group 2, rollout_index 1\) is nan at token 2"):
        add_per_token_array(prefix, "teacher_logp", teacher, {"model": "t"})
    assert sorted(os.listdir(tmp_path)) == before  # no temporaries, no half-attached array
    assert TrajectoryDataset(prefix).per_token_array_names == []


def test_reader_refuses_non_finite_value_on_disk(tmp_path):
    """A NaN that got into the .bin after writing (bit rot, a foreign tool): the cheap checks at construction do
    not read the .bin, the item that holds it raises naming the file, sequence, group, rollout and the fix."""
    prefix = str(tmp_path / "ds")
    _write(prefix, _groups())
    meg = IndexedDataset(prefix + ".ref_logp")
    seq, tok = 13, 3
    offset = int(meg.index.sequence_pointers[seq]) + 4 * tok
    del meg
    with open(prefix + ".ref_logp.bin", "r+b") as f:
        f.seek(offset)
        f.write(np.float32(np.nan).tobytes())
    ds = TrajectoryDataset(prefix)
    ds[12], ds[14]  # neighbours are fine
    with pytest.raises(DatasetFormatError) as e:
        ds[seq]
    msg = str(e.value)
    assert f"{prefix}.ref_logp.bin: sequence 13 (group 3, rollout_index 1) has nan at token 3" in msg
    assert "precompute_logprobs.py" in msg and "--array ref_logp" in msg
    assert "ref_logp" not in TrajectoryDataset(prefix, per_token_arrays=())[seq]
