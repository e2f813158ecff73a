"""Atomic rebuilds on real killed processes: a writer, add_per_token_array or a whole build SIGKILLed at every step
of the journaled commit (and before it) leaves the previous dataset and its rejects file byte-identical once the
next reader has run recovery; after the manifest is written, the new version wins. The next build removes what a
killed one left behind. A build that fails with an exception changes nothing."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset
from test_data_format import _groups, _write

from megatron_offgrpo.data import (
    CommitInProgressError,
    DatasetFormatError,
    TrajectoryDataset,
    TrajectoryDatasetWriter,
    add_per_token_array,
    recover_commit,
    verify_dataset,
)
from megatron_offgrpo.preprocess import BuildConfig, InputError, build_dataset
from megatron_offgrpo.data.atomic import TEST_KILL_ENV
from megatron_offgrpo.preprocess.tiny_tokenizer import TINY_TOKENIZER_DIR

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "examples", "data", "ot3_sample.jsonl")
BUILD = os.path.join(REPO, "tools", "preprocess", "build_dataset.py")


def _hashes(directory):
    """sha256 of every file in ``directory`` that is not a temporary / backup (``.tmp<pid>``)."""
    out = {}
    for name in sorted(os.listdir(directory)):
        if ".tmp" not in name:
            with open(os.path.join(directory, name), "rb") as f:
                out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def _temps(directory):
    return sorted(n for n in os.listdir(directory) if ".tmp" in n)


def _killed(fn, kill_at):
    """Run ``fn`` in a forked child with ``$MEGATRON_OFFGRPO_TEST_KILL_AT=kill_at``; assert SIGKILL ended it."""
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.environ[TEST_KILL_ENV] = kill_at
            fn()
        finally:
            os._exit(3)  # only reached if the kill point was not hit
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"child exited with {status}"
    return pid


def _write_groups(prefix, groups, kill_group=None):
    w = TrajectoryDatasetWriter(prefix, 70000, ("ref_logp",))
    for j, (meta, seqs) in enumerate(groups):
        w.add_group(meta, seqs)
        if j == kill_group:
            os.kill(os.getpid(), signal.SIGKILL)
    w.commit({"tokenizer": {"name_or_path": "test"}})


# commit() of a writer with ref_logp moves: meta(0), groups(1), ref_logp.bin(2), ref_logp.idx(3), bin(4), idx(5).
BEFORE_MANIFEST = ["add_group", "commit:journal", "commit:backups", "commit:rename0", "commit:rename3", "commit:rename5"]
AFTER_MANIFEST = ["commit:manifest", "commit:backups_removed"]


def _kill_writer(prefix, groups, point):
    return _killed(lambda: _write_groups(prefix, groups, kill_group=2 if point == "add_group" else None), point)


@pytest.mark.parametrize("point", BEFORE_MANIFEST + AFTER_MANIFEST)
def test_killed_first_write(tmp_path, point):
    prefix = str(tmp_path / "ds")
    pid = _kill_writer(prefix, _groups(seed=2), point)
    if point in AFTER_MANIFEST:
        ds = TrajectoryDataset(prefix)  # recovery finishes the commit
        assert len(ds) == 20 and verify_dataset(prefix, full=True) == []
    else:
        with pytest.raises(DatasetFormatError, match="no manifest"):
            TrajectoryDataset(prefix)
        assert not IndexedDataset.exists(prefix)  # recovery removed the files that had no previous version
    assert not os.path.exists(prefix + ".commit.json")
    assert all(f".tmp{pid}" in n and not n.endswith(".bak") for n in _temps(tmp_path))
    # the next writer removes the dead writer's temporaries and succeeds
    _write(prefix, _groups(seed=3))
    assert _temps(tmp_path) == [] and len(TrajectoryDataset(prefix)) == 20


@pytest.mark.parametrize("point", BEFORE_MANIFEST + AFTER_MANIFEST)
def test_killed_rewrite_keeps_the_previous_dataset(tmp_path, point):
    prefix = str(tmp_path / "ds")
    _write(prefix, _groups(seed=1))
    old = _hashes(tmp_path)
    new_groups = _groups(seed=2)
    _kill_writer(prefix, new_groups, point)
    # the killed writer left temporaries or backups behind (after removing its backups, only the journal)
    assert _temps(tmp_path) or (point == "commit:backups_removed" and os.path.exists(prefix + ".commit.json"))
    ds = TrajectoryDataset(prefix)  # runs recovery
    assert not os.path.exists(prefix + ".commit.json")
    assert not any(n.endswith(".bak") for n in os.listdir(tmp_path))
    assert verify_dataset(prefix, full=True) == []
    first_new = new_groups[0][1][0].tokens
    if point in AFTER_MANIFEST:
        np.testing.assert_array_equal(ds[0]["tokens"].numpy(), first_new)
    else:
        assert _hashes(tmp_path) == old  # byte-identical: every file, the manifest included
        assert not np.array_equal(ds[0]["tokens"].numpy(), first_new)


def test_manifest_is_absent_inside_the_commit_window(tmp_path):
    """A reader that skips recovery (plain load of P.json) never sees the old manifest over new files."""
    prefix = str(tmp_path / "ds")
    _write(prefix, _groups(seed=1))
    _kill_writer(prefix, _groups(seed=2), "commit:rename3")
    assert not os.path.exists(prefix + ".json")
    journal = json.load(open(prefix + ".commit.json"))
    assert journal["pid"] > 0 and journal["host"] == socket.gethostname()
    assert ["ds.json", f"ds.json.tmp{journal['pid']}.bak"] in journal["backups"]
    assert journal["manifest"]["counts"]["sequences"] == 20
    assert any("commit" in p for p in verify_dataset(prefix))  # verify is read-only: it reports the journal
    TrajectoryDataset(prefix)


def test_live_committer_is_reported_not_rolled_back(tmp_path):
    prefix = str(tmp_path / "ds")
    _write(prefix, _groups(seed=1))
    old = _hashes(tmp_path)
    _kill_writer(prefix, _groups(seed=2), "commit:rename3")
    jpath = prefix + ".commit.json"
    journal = json.load(open(jpath))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # pretend the committer is still running: a live pid on this host
        journal.update(pid=sleeper.pid, pid_start=None)
        json.dump(journal, open(jpath, "w"))
        with pytest.raises(CommitInProgressError, match=rf"a build is committing {prefix} now \(pid {sleeper.pid}"):
            TrajectoryDataset(prefix)
        with pytest.raises(CommitInProgressError, match="committing"):
            TrajectoryDatasetWriter(prefix, 100)
        assert os.path.exists(jpath)
    finally:
        sleeper.kill()
        sleeper.wait()
    # the "committer" died: the next load rolls back (the backups carry the old committer's pid in their names)
    TrajectoryDataset(prefix)
    assert _hashes(tmp_path) == old


def test_journal_of_another_host_needs_assume_dead(tmp_path):
    prefix = str(tmp_path / "ds")
    _write(prefix, _groups(seed=1))
    old = _hashes(tmp_path)
    _kill_writer(prefix, _groups(seed=2), "commit:rename5")
    journal = json.load(open(prefix + ".commit.json"))
    journal["host"] = "elsewhere-" + socket.gethostname()
    json.dump(journal, open(prefix + ".commit.json", "w"))
    with pytest.raises(CommitInProgressError, match="on host elsewhere-.*assume_dead=True"):
        TrajectoryDataset(prefix)
    assert recover_commit(prefix, assume_dead=True) == "rolled back"
    assert _hashes(tmp_path) == old and recover_commit(prefix) is None


def test_exception_inside_the_commit_rolls_back_at_once(tmp_path, monkeypatch):
    prefix = str(tmp_path / "ds")
    _write(prefix, _groups(seed=1))
    old = _hashes(tmp_path)
    real_replace, calls = os.replace, [0]

    def failing_replace(src, dst):
        calls[0] += 1
        if calls[0] == 4:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space"):
        _write(prefix, _groups(seed=2))
    monkeypatch.setattr(os, "replace", real_replace)
    assert os.listdir(tmp_path) and _temps(tmp_path) == []  # rolled back, temporaries removed, no journal
    assert _hashes(tmp_path) == old and verify_dataset(prefix, full=True) == []


def test_killed_add_per_token_array(tmp_path):
    prefix = str(tmp_path / "ds")
    _write(prefix, _groups(seed=1))
    old = _hashes(tmp_path)
    lengths = TrajectoryDataset(prefix).sequence_lengths
    # replacing an array: both new array files renamed in, killed before the manifest
    _killed(lambda: add_per_token_array(prefix, "ref_logp", [np.zeros(n, np.float32) for n in lengths],
                                        {"model": "x"}), "commit:rename1")
    ds = TrajectoryDataset(prefix)
    assert _hashes(tmp_path) == old and ds[0]["ref_logp"].abs().sum() > 0
    # a new array, killed after its .bin was renamed in: the file is removed, the manifest is the old one
    _killed(lambda: add_per_token_array(prefix, "teacher_logp", [np.zeros(n, np.float32) for n in lengths],
                                        {"model": "t"}), "commit:rename0")
    assert TrajectoryDataset(prefix).per_token_array_names == ["ref_logp"]
    assert _hashes(tmp_path) == old
    # the next attach cleans up and works
    add_per_token_array(prefix, "teacher_logp", [np.zeros(n, np.float32) for n in lengths], {"model": "t"})
    assert _temps(tmp_path) == [] and TrajectoryDataset(prefix).per_token_array_names == ["ref_logp", "teacher_logp"]


def test_stale_temps_of_live_processes_and_other_datasets_are_kept(tmp_path):
    prefix = str(tmp_path / "ds")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for name in (f"ds.tmp{dead.pid}.bin", f"ds.tmp{dead.pid}.ref_logp.idx", f"ds.json.tmp{dead.pid}",
                     f"ds.bin.tmp{dead.pid}.bak", f"ds.tmp{live.pid}.bin", f"ds2.tmp{dead.pid}.bin", "ds.tmpfile"):
            (tmp_path / name).write_bytes(b"x" * 10)
        _write(prefix, _groups())
        left = _temps(tmp_path)
    finally:
        live.kill()
        live.wait()
    assert left == sorted([f"ds.tmp{live.pid}.bin", f"ds2.tmp{dead.pid}.bin", "ds.tmpfile"])


# ---- whole builds ----


def _small_input(path, lines):
    with open(SAMPLE, encoding="utf-8") as f:
        rows = f.readlines()
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(rows[:lines])
    return str(path)


def _cfg(inp, prefix, **kw):
    return BuildConfig([inp], TINY_TOKENIZER_DIR, prefix, max_seq_len=640, domain="math", progress=False, **kw)


@pytest.fixture
def built(tmp_path):
    """A dataset built from the first 160 sample rows (with rejects), and the 400-row input of the rebuild."""
    out = tmp_path / "out"
    prefix = str(out / "ds")
    res = build_dataset(_cfg(_small_input(tmp_path / "a.jsonl", 160), prefix))
    assert sum(res.rejects.values()) > 0 and os.path.getsize(prefix + ".rejects.jsonl") > 0
    return prefix, out, _small_input(tmp_path / "b.jsonl", 400)


# build commit moves: meta(0), groups(1), bin(2), idx(3), rejects(4)
@pytest.mark.parametrize("point", ["build:read", "build:written", "commit:journal", "commit:backups",
                                   "commit:rename2", "commit:rename4", "commit:manifest"])
def test_killed_build_keeps_dataset_and_rejects(built, point):
    prefix, out, new_input = built
    old = _hashes(out)
    pid = _killed(lambda: build_dataset(_cfg(new_input, prefix)), point)
    assert _temps(out)
    ds = TrajectoryDataset(prefix)
    if point == "commit:manifest":  # the new version was complete: recovery finishes it, rejects included
        assert ds.manifest["preprocess_args"]["inputs"] == [new_input]
        assert _hashes(out)["ds.rejects.jsonl"] != old["ds.rejects.jsonl"]
    else:
        assert _hashes(out) == old  # dataset and rejects file byte-identical
    # the next build removes the killed one's temporaries (and says so) and succeeds
    left = _temps(out)
    assert all(f".tmp{pid}" in n for n in left)
    assert bool(left) == (point in ("build:read", "build:written", "commit:journal", "commit:backups", "commit:rename2"))
    res = build_dataset(_cfg(new_input, prefix))
    assert sorted(res.stale_removed) == [str(out / n) for n in left]
    assert _temps(out) == [] and verify_dataset(prefix, full=True) == []
    with open(prefix + ".rejects.jsonl") as f:
        assert sum(1 for _ in f) == sum(res.rejects.values())


def test_failing_build_changes_nothing(built, tmp_path):
    prefix, out, new_input = built
    old = _hashes(out)
    with pytest.raises(InputError, match="--tokenizer"):
        build_dataset(BuildConfig([new_input], str(tmp_path / "no_tokenizer"), prefix, progress=False))
    # every row rejected: the failure comes after the new rejects were written (to the temporary)
    with pytest.raises(InputError, match="no usable records"):
        build_dataset(BuildConfig([new_input], TINY_TOKENIZER_DIR, prefix, domain="chemistry", progress=False))
    # groups read, but every trajectory over the length limit
    with pytest.raises(InputError, match="no trajectory survived"):
        build_dataset(BuildConfig([new_input], TINY_TOKENIZER_DIR, prefix, max_seq_len=20, progress=False))
    assert _hashes(out) == old and _temps(out) == []


def test_cli_build_killed_from_outside(built):
    """No fault injection: SIGKILL the CLI from outside as soon as it has started writing its rejects."""
    prefix, out, _ = built
    old = _hashes(out)
    cmd = [sys.executable, BUILD, "--input", SAMPLE, "--tokenizer", TINY_TOKENIZER_DIR, "--output-prefix", prefix,
           "--domain", "math", "--max-seq-len", "640", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rejects_tmp = f"{prefix}.rejects.jsonl.tmp{proc.pid}"
    deadline = time.time() + 120
    while not os.path.exists(rejects_tmp) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and os.path.exists(rejects_tmp)
    assert _hashes(out) == old and len(TrajectoryDataset(prefix)) > 0
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"removed {rejects_tmp}" in done.stderr and f"pid {proc.pid}" in done.stderr
    assert _temps(out) == [] and verify_dataset(prefix) == []
