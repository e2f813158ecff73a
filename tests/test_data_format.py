"""Dataset format (DESIGN 5): Megatron-Core's own IndexedDataset is the oracle for the token files; a killed writer
never leaves a loadable dataset."""

import json
import os
import signal

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


def test_add_per_token_array_and_producer(tmp_path):
    prefix = str(tmp_path / "ds")
    groups = _groups()
    for _, seqs in groups:
        for s in seqs:
            s.per_token = {}
    _write(prefix, groups, arrays=())
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


def _killed_write(prefix, groups, kill_after_replaces):
    """Run the writer in a forked child that SIGKILLs itself after ``kill_after_replaces`` renames of commit()
    (-1: during add_group, before commit)."""
    pid = os.fork()
    if pid == 0:  # child
        try:
            real_replace = os.replace
            count = [0]

            def replace(src, dst):
                if count[0] == kill_after_replaces:
                    os.kill(os.getpid(), signal.SIGKILL)
                real_replace(src, dst)
                count[0] += 1

            os.replace = replace
            w = TrajectoryDatasetWriter(prefix, 70000, ("ref_logp",))
            for j, (meta, seqs) in enumerate(groups):
                w.add_group(meta, seqs)
                if kill_after_replaces < 0 and j == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
            w.commit({})
        finally:
            os._exit(3)  # only reached if the kill did not happen
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


# commit() renames: meta, groups, ref_logp.bin, ref_logp.idx, bin, idx, then the manifest.
@pytest.mark.parametrize("kill_after", [-1, 0, 3, 5, 6])
def test_killed_writer_leaves_no_loadable_dataset(tmp_path, kill_after):
    prefix = str(tmp_path / "ds")
    _killed_write(prefix, _groups(), kill_after)
    with pytest.raises(DatasetFormatError):
        TrajectoryDataset(prefix)
    if kill_after <= 5:  # up to the token index rename, Megatron-Core sees no dataset either
        assert not IndexedDataset.exists(prefix)


@pytest.mark.parametrize("kill_after", [-1, 5])
def test_killed_rewrite_of_existing_dataset(tmp_path, kill_after):
    prefix = str(tmp_path / "ds")
    _write(prefix, _groups(seed=1))
    _killed_write(prefix, _groups(seed=2), kill_after)
    if kill_after < 0:
        # killed before commit: the previous complete dataset is untouched and still loads
        ds = TrajectoryDataset(prefix)
        assert len(ds) == 20
    else:
        with pytest.raises(DatasetFormatError):
            TrajectoryDataset(prefix)
        assert not IndexedDataset.exists(prefix)


def test_writer_exception_cleans_temporaries(tmp_path):
    prefix = str(tmp_path / "ds")
    with pytest.raises(ValueError):
        with TrajectoryDatasetWriter(prefix, 100) as w:
            w.add_group({}, [SequenceRecord(np.arange(5), 5, 1.0, 0)])  # no response token
    assert os.listdir(tmp_path) == []
    with TrajectoryDatasetWriter(prefix, 100) as w:
        with pytest.raises(ValueError, match="empty"):
            w.commit()
