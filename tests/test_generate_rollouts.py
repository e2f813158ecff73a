"""Student rollouts (megatron_offgrpo/inference/rollouts.py, tools/preprocess/generate_rollouts.py).

* Grading and the round trip, on planted completions (the generation engine replaced by a stub returning them):
  the pass-rate file equals math-verify's verdicts computed here independently (reference answer, or the
  hand-known majority answer); it loads with ``load_student_pass_rates`` and reaches build_dataset's selection;
  the rollouts file builds into a dataset whose groups and rewards are the ones majority voting over the written
  rollouts gives (checked with math-verify directly on the rows).
* The real CLI on a tiny random model (HF backend): every sample is accounted for, the outputs parse, a bad input
  row is rejected naming its line; a failing run leaves no output behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gen_models import TINY_TOKENIZER, write_tiny_hf_model
from megatron_offgrpo.inference import rollouts as rollouts_mod
from megatron_offgrpo.inference.generation import Completion, ResolvedModel
from megatron_offgrpo.inference.rollouts import RolloutConfig, generate_rollouts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = 256

# problem -> (reference answer or None, planted completions: (text, finish_reason))
PLANTED = {
    "What is 2+3?": ("5", [
        ("<think>\n2+3=5\n</think>\n\nThe answer is $\\boxed{5}$.", "stop"),
        ("So we get \\boxed{5}", "stop"),
        ("I think it is \\boxed{6}", "stop"),
        ("Let me compute... \\boxed{5} and then I keep going without end", "length"),  # truncated: incorrect
    ]),
    "What is half of 14?": (None, [
        ("\\boxed{7}", "stop"),
        ("Half of 14 is \\boxed{7.0}", "stop"),
        ("\\boxed{8}", "stop"),
        ("The result: \\boxed{7}", "stop"),
    ]),
    "Compute 1/2 + 0.": ("\\frac{1}{2}", [
        ("\\boxed{0.5}", "stop"),
        ("\\boxed{\\frac{1}{2}}", "stop"),
        ("", "stop"),  # empty: graded incorrect, left out of the rollouts
        ("\\boxed{2}", "stop"),
    ]),
    "Name a prime number greater than 10.": (None, [
        ("I am not sure.", "stop"),
        ("Hmm.", "stop"),
        ("No idea", "stop"),
        ("Maybe later", "stop"),
    ]),
}


def _write_problems(path: str) -> None:
    with open(path, "w") as f:
        for i, (problem, (answer, _)) in enumerate(PLANTED.items()):
            row = {"problem": problem, "id": f"p{i}"}
            if answer is not None:
                row["answer"] = answer
            f.write(json.dumps(row) + "\n")


@pytest.fixture
def planted(monkeypatch):
    """The engine replaced by the planted completions (token ids: the tiny tokenizer's bytes, EOS on a stop)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER, local_files_only=True)
    calls = {}

    def fake_resolve(path, work_dir=None, hf_template=None):
        return ResolvedModel(path, {"source": path, "kind": "hf", "step": None, "fingerprint": "planted"})

    def fake_generate(model, prompts, settings, **kw):
        calls["prompts"], calls["settings"] = prompts, settings
        out = []
        for conv in prompts:
            (msg,) = conv
            _, completions = PLANTED[msg["content"]]
            assert len(completions) == settings.n
            out.append([Completion(t, tok(t, add_special_tokens=False)["input_ids"] + ([EOS] if r == "stop" else []), r)
                        for t, r in completions])  # fmt: skip
        return out

    import megatron_offgrpo.inference.generation as generation

    monkeypatch.setattr(generation, "resolve_model", fake_resolve)
    monkeypatch.setattr(generation, "generate", fake_generate)
    return calls


def _verify(gold: str, answer: str) -> bool:
    """math-verify directly (the independent oracle), gold first as the project does."""
    from math_verify import parse, verify

    return bool(verify(parse(gold), parse(answer)))


def _boxed_or_none(text: str):
    from math_verify import parse

    return text if parse(text) else None


def test_planted_rollouts_grade_round_trip_through_build_dataset_and_drive_selection(planted, tmp_path):
    from megatron_offgrpo.preprocess.build import BuildConfig, build_dataset
    from megatron_offgrpo.preprocess.readers import parse_row
    from megatron_offgrpo.preprocess.selection import load_student_pass_rates

    problems = str(tmp_path / "problems.jsonl")
    _write_problems(problems)
    out = str(tmp_path / "student" / "rollouts.jsonl")
    res = generate_rollouts(RolloutConfig(model="planted-model", inputs=[problems], output=out, n=4, progress=False))
    assert [m[0]["content"] for m in planted["prompts"]] == list(PLANTED)  # the problem as the user turn, in order

    # --- pass rates, against math-verify computed here ---
    expected_rates = {}
    for i, (problem, (answer, completions)) in enumerate(PLANTED.items()):
        gold = answer
        if gold is None:  # the vote's label, known by hand for the planted groups
            gold = {"What is half of 14?": "7", "Name a prime number greater than 10.": None}[problem]
        correct = sum(1 for text, reason in completions
                      if gold is not None and reason == "stop" and text and _verify(gold, text))  # fmt: skip
        expected_rates[f"p{i}"] = correct / 4
    assert expected_rates == {"p0": 0.5, "p1": 0.75, "p2": 0.5, "p3": 0.0}  # the planted story, stated plainly
    assert load_student_pass_rates(res.pass_rates) == expected_rates
    with open(res.pass_rates) as f:
        rows = {r["problem_id"]: r for r in map(json.loads, f)}
    assert rows["p0"]["label_source"] == "reference" and rows["p1"]["label_source"] == "vote"
    assert rows["p3"]["label"] is None and rows["p3"]["note"] == "no_answer"
    assert res.notes["truncated_samples"] == 1 and res.notes["left_out_truncated"] == 1
    assert res.notes["left_out_empty_response"] == 1
    assert res.rollouts_written == 16 - 2 and res.mean_pass_rate == pytest.approx(sum(expected_rates.values()) / 4)

    # --- the rollouts file: OT3 rows the readers accept, the left-out samples in the rejects file ---
    with open(out) as f:
        written = [json.loads(line) for line in f]
    assert len(written) == res.rollouts_written
    for row in written:
        problem, responses, extras = parse_row(row)
        assert problem in PLANTED and len(responses) == 1 and extras["problem_id"] == row["problem_id"]
        assert extras["answer"] == PLANTED[problem][0]
    with open(res.rejects_path) as f:
        left_out = sorted((r["problem_id"], r["reason"], r["rollout_index"]) for r in map(json.loads, f))
    assert left_out == [("p0", "truncated", 3), ("p2", "empty_response", 2)]

    # --- build_dataset on the rollouts, with the pass-rate file driving the selection ---
    prefix = str(tmp_path / "ds" / "student")
    built = build_dataset(BuildConfig(inputs=[out], tokenizer=TINY_TOKENIZER, output_prefix=prefix, max_seq_len=512,
                                      domain="math", student_pass_rates=res.pass_rates, progress=False))  # fmt: skip
    import pyarrow.parquet as pq

    groups = pq.read_table(prefix + ".meta.groups.parquet").to_pylist()
    seqs = pq.read_table(prefix + ".meta.parquet").to_pylist()
    by_pid = {g["problem_id"]: g for g in groups}
    # p3 has no answer at all: no vote label, the group is rejected by the build; the others are kept
    assert sorted(by_pid) == ["p0", "p1", "p2"]
    for pid, g in by_pid.items():
        problem = g["problem"]
        texts = [r["conversations"][1]["value"] for r in written if r["problem_id"] == pid]
        rewards = [s["reward"] for s in sorted(seqs, key=lambda s: s["rollout_index"]) if s["group_id"] == g["group_id"]]
        # the majority answer of the written rollouts, by math-verify pairwise equivalence
        answers = [a for a in map(_boxed_or_none, texts)]
        label = max((a for a in answers if a), key=lambda a: sum(1 for b in answers if b and _verify(a, b)))
        assert rewards == [1.0 if t and _verify(label, t) else 0.0 for t in texts], problem
        assert g["student_pass_rate"] == pytest.approx(expected_rates[pid])
    assert built.selection.missing_pass_rate == 0


def test_cli_on_a_tiny_model_accounts_for_every_sample(tmp_path):
    model = write_tiny_hf_model(str(tmp_path / "model"), seed=0, eos_scale=3.0)
    problems = tmp_path / "problems.jsonl"
    problems.write_text(
        json.dumps({"problem": "What is 2+3?", "answer": "5"}) + "\n"
        + json.dumps({"problem": "Compute 7*8."}) + "\n"
        + json.dumps({"answer": "1"}) + "\n"  # no problem: rejected, named by line
        + json.dumps({"problem": "Solve 3y + 4 = 19.", "id": "solve"}) + "\n"
    )
    out = tmp_path / "r" / "rollouts.jsonl"
    cmd = [sys.executable, os.path.join(REPO, "tools", "preprocess", "generate_rollouts.py"), "--model", model,
           "--input", str(problems), "--output", str(out), "--n", "3", "--temperature", "1.0", "--max-tokens", "40",
           "--backend", "hf", "--no-progress", "--keep-truncated"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rollouts written" in proc.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    rates = [json.loads(line) for line in (tmp_path / "r" / "rollouts.pass_rates.jsonl").read_text().splitlines()]
    rejects = [json.loads(line) for line in (tmp_path / "r" / "rollouts.jsonl.rejects.jsonl").read_text().splitlines()]
    assert [r["num_samples"] for r in rates] == [3, 3, 3] and rates[2]["problem_id"] == "solve"
    from megatron_offgrpo.preprocess.readers import problem_id_for

    # without an id: the id build_dataset gives the same problem text in the teacher's data
    assert [r["problem_id"] for r in rates[:2]] == [problem_id_for("What is 2+3?"), problem_id_for("Compute 7*8.")]
    read_rejects = [r for r in rejects if r["stage"] == "read"]
    assert [(r["reason"], r["line"], r["field"]) for r in read_rejects] == [("missing_field", 3, "problem")]
    left_out = [r for r in rejects if r["stage"] == "generate"]
    assert len(rows) + len(left_out) == 9  # every sample is either written or listed with its reason
    assert {r["finish_reason"] for r in rows} <= {"stop", "length"}
    assert all(r["conversations"][0] == {"from": "human", "value": p} for r in rows
               for p in [r["conversations"][0]["value"]]) and {r["problem_id"] for r in rows} <= {
        rates[0]["problem_id"], rates[1]["problem_id"], "solve"}  # fmt: skip
    meta = json.loads((tmp_path / "r" / "rollouts.jsonl.meta.json").read_text())
    assert meta["result"]["samples"] == 9 and meta["result"]["model"]["kind"] == "hf"

    # a run that fails (no such model) exits 2 with one error line and writes nothing
    bad_out = tmp_path / "bad" / "rollouts.jsonl"
    cmd_bad = [c if c != model else str(tmp_path / "missing") for c in cmd]
    cmd_bad[cmd_bad.index(str(out))] = str(bad_out)
    proc = subprocess.run(cmd_bad, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and "does not exist" in proc.stderr
    assert not bad_out.parent.exists() or not os.listdir(bad_out.parent)


def test_bad_settings_are_refused_before_anything_runs(tmp_path):
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"problem": "x"}) + "\n")
    with pytest.raises(ValueError, match="prompt_template"):
        generate_rollouts(RolloutConfig(model="m", inputs=[str(problems)], output=str(tmp_path / "o.jsonl"),
                                        prompt_template="no placeholder"))  # fmt: skip
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    from megatron_offgrpo.preprocess.records import InputError

    with pytest.raises(InputError, match="no records"):
        generate_rollouts(RolloutConfig(model="m", inputs=[str(empty)], output=str(tmp_path / "o.jsonl")))
    assert rollouts_mod.LABEL_SOURCES == ("auto", "reference", "vote")
