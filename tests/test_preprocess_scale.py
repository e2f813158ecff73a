"""Preprocessing at scale: the streaming build (spill grouping, chunked workers, batch tokenization, cheap vote
paths) gives the dataset of the plain in-memory pipeline, byte-identical for any number of workers, in memory that
does not grow with the input; the cheap equivalence paths agree with math-verify called directly."""

import filecmp
import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from megatron_offgrpo.data import TrajectoryDataset
from megatron_offgrpo.preprocess import BuildConfig, build_dataset, read_groups
from megatron_offgrpo.preprocess.readers import iter_parquet
from megatron_offgrpo.preprocess.synthetic import generate_rows, write_jsonl
from megatron_offgrpo.preprocess.tiny_tokenizer import TINY_TOKENIZER_DIR, load_tiny_tokenizer
from megatron_offgrpo.preprocess.tokenize import ChatTokenizer, GroupEncoder
from megatron_offgrpo.rewards import EquivalenceChecker, LabelConfig, extract_final_answer, label_group
from megatron_offgrpo.rewards.equivalence import numeric_verdict
from megatron_offgrpo.rewards.extraction import normalize_answer_string

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "examples", "data", "ot3_sample.jsonl")
DATA_FILES = (".bin", ".idx", ".meta.parquet", ".meta.groups.parquet")


def _same_files(a, b):
    return all(filecmp.cmp(a + s, b + s, shallow=False) for s in DATA_FILES)


def _scattered_inputs(tmp_path, rows, seed=0):
    """The rows shuffled (no problem's rows contiguous any more) and split over a JSONL and a Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = list(rows)
    random.Random(seed).shuffle(rows)
    half = len(rows) // 2
    jsonl, parquet = str(tmp_path / "part1.jsonl"), str(tmp_path / "part2.parquet")
    write_jsonl(rows[:half], jsonl)
    pq.write_table(pa.Table.from_pylist(rows[half:]), parquet, row_group_size=50)  # several row groups
    return [jsonl, parquet]


# ---- the cheap equivalence paths against math-verify ----


def _math_verify(gold, target):
    """The oracle: math-verify called directly on the boxed answers, no cheap path in front."""
    from math_verify import parse, verify

    return bool(verify(parse("\\boxed{" + gold + "}"), parse("\\boxed{" + target + "}")))


def test_cheap_paths_agree_with_math_verify_on_the_sample():
    groups = {}
    for row in generate_rows():
        if row["domain"] == "math":
            groups.setdefault(row["conversations"][0]["value"], (row["answer"], []))[1].append(
                extract_final_answer(row["conversations"][1]["value"]))
    checker = EquivalenceChecker(timeout_s=None)
    pairs = 0
    for reference, answers in groups.values():
        distinct = sorted({a for a in answers if a is not None} | {reference})
        for gold in distinct:
            for target in distinct:
                if gold != target:
                    pairs += 1
                    assert checker.equivalent(gold, target) == _math_verify(gold, target), (gold, target)
    c = checker.counters
    # the cheap paths decided most pairs (so this compared them, not math-verify with itself)
    assert pairs > 300 and c.numeric_path > 0.8 * pairs and c.verify_timeouts == c.verify_errors == 0


LITERALS = ["0", "-0", "0.0", "3", "3.0", "3.", "-3", "\\frac{6}{2}", "6/2", "0.5", "1/2", "\\dfrac{1}{2}", "-1/2",
            "\\frac{-1}{2}", "-\\frac{1}{2}", "\\frac{1}{3}", "0.333333", "0.333334", "0.3333", "2/3", "0.666667",
            "\\frac{22}{7}", "3.142857", "3.14159", "999999999", "999999998", "123456789.123456", "12", "012", "1e3",
            "+3", "1,000", "1000", "\\frac12", "10\\%", "0.1"]


def test_numeric_path_table_against_math_verify():
    decided = undecided = 0
    for gold in LITERALS:
        for target in LITERALS:
            ng, nt = normalize_answer_string(gold), normalize_answer_string(target)
            if ng == nt:
                continue
            verdict = numeric_verdict(gold, target)
            if verdict is None:
                undecided += 1  # not a literal pair, or too close to call: math-verify decides
            else:
                decided += 1
                assert verdict == _math_verify(gold, target), (gold, target)
    assert decided > 400 and undecided > 100
    assert numeric_verdict("0.333333", "\\frac{1}{3}") is None  # math-verify rounds floats: it says equal
    assert _math_verify("0.333333", "\\frac{1}{3}") and EquivalenceChecker().equivalent("0.333333", "\\frac{1}{3}")


def test_memo_and_parse_cache_keep_verdicts():
    answers = ["x^2", "x \\cdot x", "x^{2}", "2x", "x^2", "x \\cdot x", None, "\\sqrt{4}", "2"]
    first = label_group([f"\\boxed{{{a}}}" if a else "none" for a in answers], None, LabelConfig())
    again = label_group([f"\\boxed{{{a}}}" if a else "none" for a in answers], None, LabelConfig())
    assert first.rewards == again.rewards == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert first.counters.memo_hits > 0
    checker = EquivalenceChecker()
    for gold in set(a for a in answers if a):
        for target in set(a for a in answers if a):
            assert checker.equivalent(gold, target) == (gold == target or _math_verify(gold, target))


# ---- the streaming build against the in-memory pipeline ----


def _reference_dataset(paths, domain):
    """The plain in-memory pipeline, serial and without any of the build's machinery: read_groups (every group in
    memory), label_group, the transformers tokenizer's own chat template and encoding, min_rollouts 2."""
    chat = ChatTokenizer(load_tiny_tokenizer(TINY_TOKENIZER_DIR), 640)
    out = []
    for g in read_groups(paths, domain=domain):
        lab = label_group(g.responses, g.reference, LabelConfig())
        if lab.reject_reason is not None:
            continue
        prompt, trajs = chat.tokenize_group(g.problem, g.responses)
        seqs = [(tt.tokens.tolist(), tt.prompt_len, lab.rewards[i], i, lab.answers[i])
                for i, tt in enumerate(trajs) if tt.tokens is not None]
        if len(seqs) >= 2:
            out.append((g.problem_id, g.problem, lab.label, lab.stats.agreement, seqs))
    return out


def _dataset_content(prefix):
    ds = TrajectoryDataset(prefix)
    groups = ds.group_metadata()
    out = []
    for gid, g in enumerate(groups):
        seqs = []
        for i in range(len(ds)):
            item = ds[i]
            if item["group_id"] == gid:
                seqs.append((item["tokens"].tolist(), item["prompt_len"], item["reward"], item["rollout_index"],
                             ds.answers[i]))
        out.append((g["problem_id"], g["problem"], g["label"], g["agreement"], seqs))
    return out


def test_streaming_build_equals_the_in_memory_pipeline(tmp_path):
    paths = _scattered_inputs(tmp_path, generate_rows())
    prefix = str(tmp_path / "stream")
    res = build_dataset(BuildConfig(paths, TINY_TOKENIZER_DIR, prefix, max_seq_len=640, domain="math",
                                    progress=False))
    expected = _reference_dataset(paths, "math")
    assert len(expected) > 20 and res.groups_out == len(expected)
    assert _dataset_content(prefix) == expected
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]  # spills removed


@pytest.mark.parametrize("selection", [None, dict(num_groups=15, strategy="difficulty", seed=2)])
def test_output_is_byte_identical_for_any_number_of_workers(tmp_path, selection):
    paths = _scattered_inputs(tmp_path, generate_rows(), seed=1)
    results = {}
    for workers in (1, 3):
        prefix = str(tmp_path / f"w{workers}")
        results[workers] = build_dataset(BuildConfig(paths, TINY_TOKENIZER_DIR, prefix, max_seq_len=640,
                                                     domain="math", workers=workers, progress=False,
                                                     **(selection or {})))
    assert _same_files(str(tmp_path / "w1"), str(tmp_path / "w3"))
    with open(tmp_path / "w1.rejects.jsonl", "rb") as a, open(tmp_path / "w3.rejects.jsonl", "rb") as b:
        assert a.read() == b.read()
    assert results[1].groups_out == (15 if selection else results[1].groups_in - sum(
        v for k, v in results[1].rejects.items() if k.startswith("label:")))


def test_parquet_and_datasets_directory_are_read_by_batches(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = list(generate_rows(num_problems=6, k=4))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet", row_group_size=5)
    assert [r for _, r in iter_parquet(str(tmp_path / "x.parquet"), batch_rows=3)] == [
        {k: r.get(k) for k in ("conversations", "domain", "source", "answer")} for r in rows]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    write_jsonl(rows, str(tmp_path / "x.jsonl"))
    as_jsonl = [(g.problem, g.responses, g.reference) for g in read_groups([str(tmp_path / "x.jsonl")])]
    assert [(g.problem, g.responses, g.reference) for g in read_groups([str(tmp_path / "ds")])] == as_jsonl
    assert [(g.problem, g.responses, g.reference) for g in read_groups([str(tmp_path / "x.parquet")])] == as_jsonl


def test_worker_encoder_matches_transformers():
    chat = ChatTokenizer(load_tiny_tokenizer(TINY_TOKENIZER_DIR), 300, "truncate")
    encoder = GroupEncoder(chat.encoder_state())
    rows = [r for r in generate_rows(num_problems=10, k=3) if r["domain"] == "math"]
    problem = rows[0]["conversations"][0]["value"]
    responses = [r["conversations"][1]["value"] for r in rows] + ["ünïcödé <|im_end|> <think>"]
    expected = chat.tokenize_group(problem, responses)
    got = encoder.tokenize_group(chat.prompt_text(problem), responses)
    assert got[0] == expected[0]
    for a, b in zip(got[1], expected[1]):
        assert (a.prompt_len, a.truncated, a.reject_reason) == (b.prompt_len, b.truncated, b.reject_reason)
        np.testing.assert_array_equal(a.tokens, b.tokens)
    assert any(t.truncated for t in got[1])


# ---- bounded memory ----

_MEASURE = textwrap.dedent("""
    import json, os, resource, sys, tracemalloc, warnings
    warnings.filterwarnings("ignore")
    import psutil
    import megatron_offgrpo.data.writer as writer_module
    from megatron_offgrpo.preprocess.build import BuildConfig, build_dataset
    from megatron_offgrpo.preprocess.tiny_tokenizer import TINY_TOKENIZER_DIR


    class CountingWriter:
        # Stands in for the dataset writer, whose per-sequence metadata columns stay in memory until its commit
        # (data/writer.py): what is measured is the pipeline in front of it. It keeps counts and a checksum only.
        def __init__(self, prefix, vocab_size):
            self.num_sequences = self.groups = self.checksum = self.tokens = 0
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            pass
        def add_group(self, meta, seqs):
            self.groups += 1
            self.num_sequences += len(seqs)
            self.checksum += sum(int(s.tokens.sum()) for s in seqs)
            self.tokens += sum(len(s.tokens) for s in seqs)
        def commit(self, manifest, extra_moves=()):
            # Every row has been through the pipeline: what is still alive now is what grows with the input.
            LIVE.append(tracemalloc.get_traced_memory()[0])
            TOKENS.append(self.tokens)
            for src, dst in extra_moves:
                os.replace(src, dst)
            return {"counts": {"groups": self.groups, "checksum": self.checksum}}


    LIVE, TOKENS = [], []


    def main():
        writer_module.TrajectoryDatasetWriter = CountingWriter
        base = psutil.Process().memory_info().rss
        tracemalloc.start()
        res = build_dataset(BuildConfig([sys.argv[1]], TINY_TOKENIZER_DIR, sys.argv[2], max_seq_len=4096,
                                        domain="math", workers=int(sys.argv[3]), progress=False))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        print("RESULT " + json.dumps({"base": base, "peak": peak, "kids": kids, "rows": res.rows_read,
                                      "out": res.trajectories_out, "groups": res.groups_out, "live": LIVE[0],
                                      "tokens": TOKENS[0]}))


    if __name__ == "__main__":
        main()
""")


def _peak(script, inp, prefix, workers):
    proc = subprocess.run([sys.executable, script, inp, prefix, str(workers)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT ")[-1])


def test_memory_stays_bounded_on_100k_trajectories(tmp_path):
    script = tmp_path / "measure.py"
    script.write_text(_MEASURE)
    sizes = {}
    # x 16 rollouts: 20k and 100k rows, the rows of a problem scattered; both large enough that the tasks in flight
    # are full (the window of results in flight is the same), so what differs is what grows with the input.
    for n_problems in (1250, 6250):
        rows = list(generate_rows(num_problems=n_problems, k=16, seed=7))
        random.Random(0).shuffle(rows)
        inp = str(tmp_path / f"rows{n_problems}.jsonl")
        write_jsonl(rows, inp)
        del rows
        sizes[n_problems] = (os.path.getsize(inp), _peak(str(script), inp, str(tmp_path / f"ds{n_problems}"), 2))
    (small_bytes, small), (big_bytes, big) = sizes[1250], sizes[6250]
    assert small["rows"] == 20_000 and big["rows"] == 100_000 and big["out"] > 80_000 and big["groups"] > 2500
    growth = (big["peak"] - big["base"]) - (small["peak"] - small["base"])
    extra_input = big_bytes - small_bytes
    extra_held_in_memory = extra_input + 8 * (big["tokens"] - small["tokens"])  # text + int64 tokens
    print(f"input {small_bytes / 2**20:.0f} -> {big_bytes / 2**20:.0f} MiB; main process: live Python memory after "
          f"the last group {small['live'] / 2**20:.1f} -> {big['live'] / 2**20:.1f} MiB, peak RSS over its baseline "
          f"{(small['peak'] - small['base']) / 2**20:.0f} -> {(big['peak'] - big['base']) / 2**20:.0f} MiB; workers' "
          f"peak RSS {small['kids'] / 2**20:.0f} -> {big['kids'] / 2**20:.0f} MiB; the in-memory pipeline held "
          f"{extra_held_in_memory / 2**20:.0f} MiB more for the bigger input")
    # What stays alive grows only by the index (16 bytes a row, a few dozen a problem): not with the input's text.
    assert big["live"] - small["live"] < 0.25 * extra_input, sizes
    # The peaks (allocator high-water marks, the tokenizer's bounded word cache in the workers) stay well below
    # what holding the rows and their tokens, as the in-memory pipeline did, would add.
    assert growth < 0.5 * extra_held_in_memory, sizes
    assert big["kids"] - small["kids"] < 0.5 * extra_held_in_memory, sizes
