"""End to end: build_dataset.py turns the shipped sample into a dataset that the reader and Megatron-Core load;
tokens decode back to the chat-templated text; rewards agree with math-verify called directly; every input
trajectory is either written or rejected with a reason; the result does not depend on the number of workers."""

import filecmp
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_offgrpo.data import TrajectoryDataset, verify_dataset
from megatron_offgrpo.preprocess import BuildConfig, InputError, build_dataset, select_groups
from megatron_offgrpo.preprocess.synthetic import generate_rows, student_pass_rates
from megatron_offgrpo.preprocess.tiny_tokenizer import TINY_TOKENIZER_DIR, build_tiny_tokenizer, load_tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "examples", "data", "ot3_sample.jsonl")
RATES = os.path.join(REPO, "examples", "data", "student_pass_rates.jsonl")
BUILD = os.path.join(REPO, "tools", "preprocess", "build_dataset.py")


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, BUILD, *map(str, args), "--no-progress"], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def cli_build(tmp_path_factory):
    """The README command on the shipped sample, through the CLI, with 2 process workers."""
    out = tmp_path_factory.mktemp("cli")
    prefix, plot = str(out / "ot3"), str(out / "stats.png")
    cmd = [sys.executable, os.path.join(REPO, "tools", "preprocess", "build_dataset.py"), "--input", SAMPLE,
           "--tokenizer", TINY_TOKENIZER_DIR, "--output-prefix", prefix, "--domain", "math", "--max-seq-len", "640",
           "--workers", "2", "--student-pass-rates", RATES, "--teacher", "synthetic", "--stats-plot", plot,
           "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return prefix, plot, proc.stdout


def test_shipped_files_are_in_sync_with_their_generators():
    rows = list(generate_rows())
    with open(SAMPLE, encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == rows
    with open(RATES, encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == student_pass_rates(rows)
    assert os.path.getsize(SAMPLE) < 1_000_000
    shipped, built = load_tiny_tokenizer(), build_tiny_tokenizer()
    assert shipped.get_vocab() == built.get_vocab() and shipped.chat_template == built.chat_template
    assert shipped.eos_token == "<|im_end|>"


def test_cli_dataset_loads_and_matches_the_input(cli_build):
    prefix, plot, stdout = cli_build
    ds = TrajectoryDataset(prefix)
    meg = IndexedDataset(prefix)
    assert len(meg) == len(ds) > 0
    assert "groups out" in stdout and "rejected" in stdout and "all_positive" in stdout
    # counted with --no-progress too (the count used to come from the disabled progress bar: 0)
    assert int(re.search(r"rows read\D+(\d+)", stdout).group(1)) == sum(1 for _ in open(SAMPLE)) > 0
    assert int(re.search(r"duplicate problem ids rejected\D+(\d+)", stdout).group(1)) == 0
    assert verify_dataset(prefix, full=True) == []

    tok = load_tiny_tokenizer()
    rows_by_problem = {}
    with open(SAMPLE, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            rows_by_problem.setdefault(row["conversations"][0]["value"], []).append(row["conversations"][1]["value"])
    groups = ds.group_metadata()
    from math_verify import parse, verify

    for i in range(0, len(ds), 37):
        item = ds[i]
        np.testing.assert_array_equal(meg[i].astype(np.int64), item["tokens"].numpy())
        g = groups[item["group_id"]]
        response = rows_by_problem[g["problem"]][item["rollout_index"]]
        # independent oracle for the layout: the tokenizer's own chat template of (user, assistant)
        expected = tok.apply_chat_template([{"role": "user", "content": g["problem"]},
                                            {"role": "assistant", "content": response}], tokenize=False).rstrip("\n")
        assert tok.decode(item["tokens"].tolist()) == expected
        prompt = tok.apply_chat_template([{"role": "user", "content": g["problem"]}], add_generation_prompt=True,
                                         tokenize=False)
        assert tok.decode(item["tokens"][: item["prompt_len"]].tolist()) == prompt
        # reward = math-verify equivalence of this rollout's answer with the group label
        ans = ds.answers[i]
        same = ans is not None and verify(parse("\\boxed{" + g["label"] + "}"), parse("\\boxed{" + ans + "}"))
        assert item["reward"] == float(same), (g["label"], ans)

    m = ds.manifest
    assert m["tokenizer"]["vocab_size"] == len(tok) and len(m["tokenizer"]["sha256"]) == 64
    assert m["sources"][0]["sha256"] and m["teacher"]["model"] == "synthetic"
    assert m["preprocess_args"]["max_seq_len"] == 640
    with open(plot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_nothing_silently_dropped(cli_build):
    prefix, _, _ = cli_build
    ds = TrajectoryDataset(prefix)
    with open(prefix + ".rejects.jsonl") as f:
        rejects = [json.loads(line) for line in f]
    stats = ds.manifest["statistics"]
    assert sum(stats["rejects"].values()) == len(rejects)
    n_rows = sum(1 for _ in open(SAMPLE))
    read_rejects = sum(1 for r in rejects if r["stage"] == "read")
    rejected_groups = {r["problem_id"] for r in rejects if r["stage"] == "label"}
    traj_rejects = sum(1 for r in rejects if r["stage"] == "tokenize" and r["rollout_index"] is not None)
    assert {r["reason"] for r in rejects} >= {"domain_filtered", "low_agreement", "no_answer", "over_max_seq_len"}
    # every math row is one trajectory: written + rejected-with-its-group + rejected-alone = all
    per_group_k = {}
    with open(SAMPLE) as f:
        from megatron_offgrpo.preprocess.readers import problem_id_for
        for line in f:
            row = json.loads(line)
            if row["domain"] == "math":
                pid = problem_id_for(row["conversations"][0]["value"].strip())
                per_group_k[pid] = per_group_k.get(pid, 0) + 1
    in_rejected_groups = sum(per_group_k[p] for p in rejected_groups)
    assert len(ds) + in_rejected_groups + traj_rejects == n_rows - read_rejects
    gt = stats["group_types"]
    assert sum(gt.values()) == ds.num_groups and gt["all_positive"] > 0 and gt["mixed"] > 0
    assert 0 < stats["vote_accuracy"] < 1  # the sample has groups whose majority is wrong


def test_workers_do_not_change_the_output(cli_build, tmp_path):
    prefix, _, _ = cli_build
    other = str(tmp_path / "w1")
    build_dataset(BuildConfig([SAMPLE], TINY_TOKENIZER_DIR, other, max_seq_len=640, domain="math", workers=1,
                              student_pass_rates=RATES, teacher="synthetic", progress=False))
    for suffix in (".bin", ".idx", ".meta.parquet", ".meta.groups.parquet"):
        assert filecmp.cmp(prefix + suffix, other + suffix, shallow=False), suffix


def test_overlong_truncate_vs_reject_and_selection(tmp_path):
    common = dict(inputs=[SAMPLE], tokenizer=TINY_TOKENIZER_DIR, domain="math", progress=False, max_seq_len=250,
                  num_groups=10, strategy="difficulty", student_pass_rates=RATES, seed=3)
    rej = build_dataset(BuildConfig(output_prefix=str(tmp_path / "r"), overlong="reject", **common))
    tru = build_dataset(BuildConfig(output_prefix=str(tmp_path / "t"), overlong="truncate", **common))
    assert rej.rejects.get("tokenize:over_max_seq_len", 0) > 0
    assert "tokenize:over_max_seq_len" not in tru.rejects
    ds = TrajectoryDataset(str(tmp_path / "t"))
    assert ds.sequence_lengths.max() <= 250 and len(ds) > len(TrajectoryDataset(str(tmp_path / "r")))
    assert tru.groups_out == 10 and tru.not_selected > 0
    assert sum(tru.selection.after_agreement.values()) == 10
    again = build_dataset(BuildConfig(output_prefix=str(tmp_path / "t2"), overlong="truncate", **common))
    assert filecmp.cmp(str(tmp_path / "t.bin"), str(tmp_path / "t2.bin"), shallow=False)


def test_strict_cli_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "p", "responses": ["\\\\boxed{1}"]}\n{"problem": "p"\n')
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "preprocess", "build_dataset.py"), "--input",
                           str(bad), "--tokenizer", TINY_TOKENIZER_DIR, "--output-prefix", str(tmp_path / "o"),
                           "--strict", "--no-progress"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"{bad}:2" in proc.stderr and "malformed_json" in proc.stderr
    assert not os.path.exists(str(tmp_path / "o.json"))


def test_select_groups_table():
    agree = [1.0] * 8 + [0.5, 0.6, 0.8, 0.9]
    frac = [1.0] * 8 + [0.5, 0.6, 0.8, 0.9]
    a, rep = select_groups(agree, frac, 4, "uniform", seed=1)
    assert a == select_groups(agree, frac, 4, "uniform", seed=1)[0] and len(a) == 4 and a == sorted(a)
    # difficulty without student data: equal allocation over the 5 non-empty agreement strata (4 -> 1 each of 4)
    d, rep = select_groups(agree, frac, 5, "difficulty", seed=1)
    assert rep.after_agreement == {"[0,0.5)": 0, "[0.5,0.625)": 2, "[0.625,0.75)": 0, "[0.75,0.875)": 1,
                                   "[0.875,1)": 1, "=1": 1}
    assert rep.before_agreement["=1"] == 8
    # with student pass rates: teacher solves (frac 1) and student fails (0) first
    rates = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, None, 1.0] + [0.0] * 4
    counts = np.zeros(12)
    for seed in range(300):
        s, rep = select_groups(agree, frac, 3, "difficulty", seed=seed, student_pass_rates=rates)
        assert len(s) == 3 and s == sorted(s)
        counts[s] += 1
    assert rep.missing_pass_rate == 1 and sum(rep.after_pass_rate.values()) == 3
    # weights: teacher-solved & student-failed 1.01, unknown student 0.51, student-perfect 0.01
    assert counts[[1, 3, 5]].min() > counts[6] > counts[[0, 2, 4, 7]].max()
    assert counts[[0, 2, 4, 7]].sum() < 0.05 * 900
    with pytest.raises(ValueError):
        select_groups(agree, frac, 3, "hardest")


def test_cli_duplicate_problem_ids_rejected_and_counted(tmp_path):
    inp = tmp_path / "dup.jsonl"
    answers = ["\\boxed{4}"] * 3
    rows = [{"problem": "What is 2+2?", "responses": answers, "problem_id": "q1"},
            {"problem": "What is 1+3?", "responses": answers, "problem_id": "q1"},  # line 2: id taken by line 1
            {"problem": "What is 3+1?", "responses": answers, "problem_id": "q2"}]
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefix = tmp_path / "o"
    proc = _cli("--input", inp, "--tokenizer", TINY_TOKENIZER_DIR, "--output-prefix", prefix)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(re.search(r"duplicate problem ids rejected\D+(\d+)", proc.stdout).group(1)) == 1
    assert int(re.search(r"rows read\D+(\d+)", proc.stdout).group(1)) == 3
    rejects = [json.loads(line) for line in open(f"{prefix}.rejects.jsonl")]
    assert [(r["reason"], r["file"], r["line"], r["detail"]) for r in rejects] == [
        ("duplicate_problem_id", str(inp), 2, f"duplicate problem_id 'q1' (first seen at {inp}:1)")]
    ds = TrajectoryDataset(str(prefix))
    assert [g["problem_id"] for g in ds.group_metadata()] == ["q1", "q2"]
    assert ds.manifest["statistics"]["rejects"] == {"read:duplicate_problem_id": 1}


def _one_line_error(proc):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_cli_missing_tokenizer_fails_before_reading_input(tmp_path):
    # the input does not exist either: the tokenizer is checked first, so that is what the error is about
    proc = _cli("--input", tmp_path / "never_read.jsonl", "--tokenizer", tmp_path / "no" / "tok", "--output-prefix",
                tmp_path / "o")
    line = _one_line_error(proc)
    assert line.startswith(f"error: --tokenizer {tmp_path / 'no' / 'tok'}: no such file or directory")
    assert "local tokenizer directory" in line and "Repo id" not in line
    assert os.listdir(tmp_path) == []


def test_tokenizer_that_is_not_one(tmp_path):
    (tmp_path / "tok").mkdir()
    with pytest.raises(InputError, match=rf"--tokenizer {tmp_path / 'tok'}: cannot load a tokenizer from it"):
        build_dataset(BuildConfig([SAMPLE], str(tmp_path / "tok"), str(tmp_path / "o"), progress=False))


def test_cli_empty_input(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    line = _one_line_error(_cli("--input", empty, "--tokenizer", TINY_TOKENIZER_DIR, "--output-prefix", tmp_path / "o"))
    assert line.startswith(f"error: {empty}: no records") and "--input" in line
    assert sorted(os.listdir(tmp_path)) == ["empty.jsonl"]


def test_cli_every_row_rejected(tmp_path):
    line = _one_line_error(_cli("--input", SAMPLE, "--tokenizer", TINY_TOKENIZER_DIR, "--output-prefix",
                                tmp_path / "o", "--domain", "chemistry"))
    assert line.startswith(f"error: {SAMPLE}: no usable records: all 768 rows were rejected (read:domain_filtered 768)")
    assert "--strict" in line and os.listdir(tmp_path) == []


def test_cli_flags_are_the_build_config_fields():
    """Every flag of build_dataset.py (the names scripts use) maps onto its BuildConfig field; defaults and choices
    come from the dataclass alone."""
    import argparse
    from dataclasses import fields

    from megatron_offgrpo.preprocess.build import add_build_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_build_arguments(parser)
    required = ["--input", "a.jsonl", "b.parquet", "--tokenizer", "tok", "--output-prefix", "out/p"]
    argv = required + ["--max-seq-len", "123", "--overlong", "truncate", "--domain", "math", "--min-agreement",
                       "0.75", "--label-source", "reference", "--verify-timeout", "2.5", "--num-groups", "7",
                       "--strategy", "difficulty", "--student-pass-rates", "r.jsonl", "--seed", "3", "--min-rollouts",
                       "4", "--workers", "2", "--strict", "--rejects", "rej.jsonl", "--teacher", "t", "--spill-dir",
                       "/scratch", "--no-progress"]
    assert config_from_args(parser.parse_args(argv)) == BuildConfig(
        inputs=["a.jsonl", "b.parquet"], tokenizer="tok", output_prefix="out/p", max_seq_len=123, overlong="truncate",
        domain="math", min_agreement=0.75, label_source="reference", verify_timeout_s=2.5, num_groups=7,
        strategy="difficulty", student_pass_rates="r.jsonl", seed=3, min_rollouts=4, workers=2, strict=True,
        rejects_path="rej.jsonl", teacher="t", spill_dir="/scratch", progress=False)
    assert config_from_args(parser.parse_args(required)) == BuildConfig(["a.jsonl", "b.parquet"], "tok", "out/p")
    assert {a.dest for a in parser._actions} >= {f.name for f in fields(BuildConfig)}
    for bad in (["--overlong", "drop"], ["--strategy", "hardest"], ["--max-seq-len", "many"]):
        with pytest.raises(SystemExit):
            parser.parse_args(required + bad)
    with pytest.raises(SystemExit):
        parser.parse_args(required[3:])  # --input is required
