"""The evaluation CLI end to end, regrading, benchmark loading and its errors (docs/design.md §8).

End to end: ``python -m megatron_offgrpo.eval`` on the shipped synthetic benchmark with a tiny HF model whose
every answer is planted (``tests/eval_helpers.save_chain_model``: it answers ``\\boxed{0.4}`` to any prompt), on
the HF backend; the oracle is exact fractions over the benchmark file, independent of the grader.
Planted samples: a hand-written ``samples.jsonl`` with known correctness, regraded by the CLI, gives the
hand-computed avg@n / pass@k / maj@n / truncation counts."""

import json
import os
import subprocess
import sys
from fractions import Fraction

import pytest

from eval_helpers import REPO, SYNTHETIC, parse_exact, save_chain_model
from megatron_offgrpo.eval.benchmarks import (
    REGISTRY,
    BenchmarkError,
    load_benchmark,
    load_benchmark_file,
    load_hub_benchmark,
)
from megatron_offgrpo.eval.cli import main as cli_main
from megatron_offgrpo.eval.runner import SamplesFileError, read_samples
from megatron_offgrpo.eval.synthetic import synthetic_benchmark_rows, training_problems

PLANTED_ANSWER = "0.4"


def _generation_available() -> bool:
    try:
        import megatron_offgrpo.inference.generation  # noqa: F401
    except ImportError:
        return False
    return True


def _run_cli(args, timeout=300):
    # One HF generate call for the whole (small) benchmark: fewer Python round trips on a busy CI machine.
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OFFGRPO_HF_BATCH_SIZE="80")
    return subprocess.run([sys.executable, "-m", "megatron_offgrpo.eval", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---- the shipped synthetic benchmark --------------------------------------------------------------------------


def test_synthetic_benchmark_is_shipped_reproducible_and_held_out():
    rows = _read_jsonl(SYNTHETIC)
    assert rows == synthetic_benchmark_rows(exclude=training_problems())  # regenerating gives the shipped file
    assert len(rows) == 40 and len({r["problem"] for r in rows}) == 40
    assert not {r["problem"] for r in rows} & training_problems()  # held out from the training sample
    assert all(parse_exact(r["answer"]) is not None for r in rows)
    bench = load_benchmark(SYNTHETIC)
    assert bench.name == "synthetic_arith" and len(bench.problems) == 40
    assert bench.problems[0].problem_id == rows[0]["id"] and bench.problems[0].answer == rows[0]["answer"]
    assert bench.source["kind"] == "file" and len(bench.source["sha256"]) == 64


# ---- end to end ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not _generation_available(), reason="megatron_offgrpo.inference.generation is not installed")
def test_cli_end_to_end_then_regrade_reproduces_summary(tmp_path, capsys):
    model = str(tmp_path / "model")
    save_chain_model(model, f"\\boxed{{{PLANTED_ANSWER}}}")
    out = str(tmp_path / "eval")
    r = _run_cli(["--model", model, "--benchmark", SYNTHETIC, "--n", "2", "--max-tokens", "24", "--seed", "5",
                  "--backend", "hf", "--output", out])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "avg@2" in r.stdout and "wrote" in r.stdout

    rows = _read_jsonl(SYNTHETIC)
    value = Fraction(PLANTED_ANSWER)
    solved = [parse_exact(row["answer"]) == value for row in rows]
    assert sum(solved) >= 1  # the planted answer solves at least one problem (0.4 = \frac{2}{5})
    expected = 100.0 * sum(solved) / len(rows)

    samples = _read_jsonl(os.path.join(out, "samples.jsonl"))
    assert len(samples) == 40 * 2
    assert [(s["problem_id"], s["sample_index"]) for s in samples] == [(row["id"], j) for row in rows for j in range(2)]
    for s in samples:
        assert s["response"] == f"\\boxed{{{PLANTED_ANSWER}}}" and s["finish_reason"] == "stop"
        assert s["num_tokens"] == len(PLANTED_ANSWER) + 9  # \boxed{ } + the answer + <|im_end|>
        assert s["extracted_answer"] == PLANTED_ANSWER
    by_id = {row["id"]: ok for row, ok in zip(rows, solved)}
    assert [s["correct"] for s in samples] == [by_id[s["problem_id"]] for s in samples]

    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["benchmark"] == "synthetic_arith" and summary["num_problems"] == 40 and summary["n"] == 2
    assert summary["avg_at_n"] == pytest.approx(expected)
    assert summary["pass_at_k"] == {"1": pytest.approx(expected), "2": pytest.approx(expected)}
    assert summary["maj_at_n"] == pytest.approx(expected)
    assert summary["ci"]["low"] <= summary["avg_at_n"] <= summary["ci"]["high"]
    assert summary["truncated"]["count"] == 0 and summary["no_answer"]["count"] == 0
    assert summary["settings"]["temperature"] == 0.6 and summary["settings"]["top_p"] == 0.95
    assert summary["settings"]["max_tokens"] == 24 and summary["settings"]["seed"] == 5
    assert summary["model"]["kind"] == "hf" and summary["model"]["fingerprint"]
    assert summary["backend"] == "hf"
    assert summary["tokens"]["generated"] == sum(s["num_tokens"] for s in samples)
    assert summary["tokens"]["per_s"] > 0 and summary["timings"]["generation_s"] > 0
    problems = _read_jsonl(os.path.join(out, "problems.jsonl"))
    assert problems[0]["messages"] == [{"role": "user", "content": rows[0]["problem"] +
                                        "\nReturn your final response within \\boxed{}"}]

    # Regrade: the same summary, byte for byte; the samples file too.
    before = {f: open(os.path.join(out, f), "rb").read() for f in ("summary.json", "samples.jsonl")}
    assert cli_main(["--regrade", out, "--no-progress"]) == 0
    for f, data in before.items():
        assert open(os.path.join(out, f), "rb").read() == data, f

    # An output directory that holds samples is not overwritten by accident.
    assert cli_main(["--model", model, "--benchmark", SYNTHETIC, "--n", "1", "--backend", "hf", "--output", out]) == 2
    assert "--regrade" in capsys.readouterr().err


@pytest.mark.skipif(not _generation_available(), reason="megatron_offgrpo.inference.generation is not installed")
def test_truncated_generations_count_as_wrong(tmp_path):
    model = str(tmp_path / "model")
    save_chain_model(model, f"\\boxed{{{PLANTED_ANSWER}}}")
    out = str(tmp_path / "eval")
    bench = tmp_path / "two.jsonl"
    bench.write_text('{"problem": "What is 2/5?", "answer": "\\\\frac{2}{5}"}\n{"problem": "x", "answer": "0.4"}\n')
    # 11 new tokens stop exactly after the closing brace, before <|im_end|>: a complete box, but truncated.
    assert cli_main(["--model", model, "--benchmark", str(bench), "--n", "2", "--max-tokens", "11",
                     "--backend", "hf", "--output", out, "--no-progress"]) == 0
    samples = _read_jsonl(os.path.join(out, "samples.jsonl"))
    assert [s["finish_reason"] for s in samples] == ["length"] * 4
    assert all(s["truncated"] and not s["correct"] and s["extracted_answer"] == PLANTED_ANSWER for s in samples)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["avg_at_n"] == 0.0 and summary["maj_at_n"] == 0.0
    assert summary["truncated"] == {"count": 4, "fraction": 1.0}


def _vllm_status() -> str:
    if not _generation_available():
        return "megatron_offgrpo.inference.generation is not installed"
    from megatron_offgrpo.inference.generation import available_backends

    return available_backends().get("vllm", "unavailable: not reported")


@pytest.mark.skipif(_vllm_status() != "ok", reason=f"vLLM backend: {_vllm_status()} (scripts/setup_vllm.sh)")
def test_cli_with_the_vllm_backend_gives_the_planted_scores(tmp_path):
    """The cluster engine through the same CLI: the planted answers, scores and finish reasons as with HF."""
    model = str(tmp_path / "model")
    save_chain_model(model, f"\\boxed{{{PLANTED_ANSWER}}}")
    out = str(tmp_path / "eval")
    assert cli_main(["--model", model, "--benchmark", SYNTHETIC, "--n", "1", "--max-tokens", "24",
                     "--backend", "vllm", "--output", out, "--no-progress"]) == 0
    rows = _read_jsonl(SYNTHETIC)
    solved = [parse_exact(row["answer"]) == Fraction(PLANTED_ANSWER) for row in rows]
    samples = _read_jsonl(os.path.join(out, "samples.jsonl"))
    assert [s["response"] for s in samples] == [f"\\boxed{{{PLANTED_ANSWER}}}"] * 40
    assert [s["correct"] for s in samples] == solved and {s["finish_reason"] for s in samples} == {"stop"}
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["backend"] == "vllm" and summary["avg_at_n"] == pytest.approx(100.0 * sum(solved) / 40)


# ---- planted samples, regraded ------------------------------------------------------------------------------


def _write_samples(path, problems):
    with open(path, "w") as f:
        for pid, ref, responses in problems:
            for j, resp in enumerate(responses):
                text, finish = resp if isinstance(resp, tuple) else (resp, "stop")
                f.write(json.dumps({"benchmark": "planted", "problem_id": pid, "sample_index": j, "reference": ref,
                                    "response": text, "finish_reason": finish,
                                    "correct": None}) + "\n")


def test_regrade_of_planted_samples_gives_hand_computed_metrics(tmp_path):
    out = tmp_path / "planted"
    out.mkdir()
    box = lambda a: f"reasoning... so the answer is $\\boxed{{{a}}}$"  # noqa: E731
    _write_samples(out / "samples.jsonl", [
        # a: 3 of 4 correct (1/2 written three ways), maj correct
        ("a", "\\frac{1}{2}", [box("1/2"), box("0.5"), box("3"), box("\\dfrac{1}{2}")]),
        # b: 1 of 4 correct, the majority (5, twice) is wrong; one sample has no box
        ("b", "4", [box("5"), box("4"), box("5"), "I give up"]),
        # c: 0 correct: two truncated samples box the right answer but count wrong and do not vote
        ("c", "10", [(box("10"), "length"), (box("10"), "length"), box("9"), box("11")]),
        # d: 4 of 4
        ("d", "x^2 + 1", [box("x^2+1"), box("1 + x^2"), box("x^{2}+1"), box("x^2 + 1")]),
    ])
    assert cli_main(["--regrade", str(out), "--no-progress"]) == 0
    s = json.load(open(out / "summary.json"))
    # avg@4 = (3 + 1 + 0 + 4) / 16
    assert s["avg_at_n"] == pytest.approx(50.0)
    # pass@1 = avg; pass@2 per problem = 1 - C(4-c, 2)/C(4, 2): a 1, b 1 - 3/6, c 0, d 1
    assert s["pass_at_k"]["1"] == pytest.approx(50.0)
    assert s["pass_at_k"]["2"] == pytest.approx(100 * (1 + 0.5 + 0 + 1) / 4)
    assert s["pass_at_k"]["4"] == pytest.approx(75.0)
    # maj@4: a yes, b no (5 wins), c no (9 and 11 tie, 9 first, wrong), d yes
    assert s["maj_at_n"] == pytest.approx(50.0)
    assert s["truncated"] == {"count": 2, "fraction": 2 / 16}
    assert s["no_answer"] == {"count": 1, "fraction": 1 / 16}
    assert s["benchmark"] == "planted" and s["num_problems"] == 4 and s["n"] == 4
    rows = _read_jsonl(out / "samples.jsonl")
    assert [r["correct"] for r in rows] == [True, True, False, True, False, True, False, False,
                                           False, False, False, False, True, True, True, True]
    grading = json.load(open(out / "grading.json"))
    assert grading["majority_answers"] == {"a": "1/2", "b": "5", "c": "9", "d": "x^2+1"}


def test_regrade_takes_references_from_problems_jsonl(tmp_path):
    out = tmp_path / "noref"
    out.mkdir()
    (out / "problems.jsonl").write_text(json.dumps({"problem_id": "a", "problem": "?", "answer": "3"}) + "\n")
    (out / "samples.jsonl").write_text("".join(
        json.dumps({"problem_id": "a", "sample_index": j, "response": f"\\boxed{{{v}}}"}) + "\n"
        for j, v in enumerate(["3", "4"])))
    assert cli_main(["--regrade", str(out), "--no-progress"]) == 0
    assert [r["correct"] for r in _read_jsonl(out / "samples.jsonl")] == [True, False]
    assert json.load(open(out / "summary.json"))["avg_at_n"] == pytest.approx(50.0)


def test_bad_samples_file_names_line_and_field(tmp_path):
    out = tmp_path / "bad"
    out.mkdir()
    _write_samples(out / "samples.jsonl", [("a", "1", ["\\boxed{1}", "\\boxed{2}"])])
    with open(out / "samples.jsonl", "a") as f:
        f.write(json.dumps({"problem_id": "b", "sample_index": 0, "reference": "3"}) + "\n")
    with pytest.raises(SamplesFileError, match=r"samples.jsonl: line 3: field 'response' is missing"):
        read_samples(str(out / "samples.jsonl"))
    lines = (out / "samples.jsonl").read_text().splitlines()[:2]
    (out / "samples.jsonl").write_text(lines[0] + "\n")
    assert cli_main(["--regrade", str(out), "--no-progress"]) == 0  # one problem, one sample: fine
    (out / "samples.jsonl").write_text(lines[0] + "\n" + lines[0] + "\n")
    with pytest.raises(SamplesFileError, match="line 2: problem 'a' sample_index 0 appears twice"):
        read_samples(str(out / "samples.jsonl"))


# ---- benchmark files and their errors -----------------------------------------------------------------------


@pytest.mark.parametrize("content, message", [
    ('{"problem": "p", "answer": "1"}\n{"problem": "q"}\n', r"line 2: field 'answer' is missing"),
    ('{"answer": "1"}\n', r"line 1: field 'problem' is missing"),
    ('{"problem": "p", "answer": "1"}\n\n{"problem": "q", "answer": ""}\n', r"line 3: field 'answer' is empty"),
    ('{"problem": "   ", "answer": "1"}\n', r"line 1: field 'problem' must be non-empty text"),
    ('{"problem": "p", "answer": "1"\n', r"line 1: not valid JSON"),
    ('["p", "1"]\n', r"line 1: expected a JSON object"),
    ('{"id": "x", "problem": "p", "answer": 1}\n{"id": "x", "problem": "q", "answer": 2}\n',
     r"line 2: problem id 'x' already used at line 1"),
    ('{"problem": "p", "answer": true}\n', r"line 1: field 'answer' is not usable"),
])
def test_bad_benchmark_file_errors_name_file_line_field(tmp_path, content, message):
    path = tmp_path / "bench.jsonl"
    path.write_text(content)
    with pytest.raises(BenchmarkError, match=message) as e:
        load_benchmark_file(str(path))
    assert str(path) in str(e.value)


def test_bad_benchmark_errors_on_the_command_line_and_parquet(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"problem": ["p", "q"], "answer": [1.0, 2.5], "subset": ["A", "B"]}), good)
    bench = load_benchmark_file(str(good))
    assert [(p.problem_id, p.answer, p.subset) for p in bench.problems] == [("0", "1", "A"), ("1", "2.5", "B")]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"problem": ["p", "q"], "solution": ["a", "b"]}), bad)
    with pytest.raises(BenchmarkError, match=r"bad.parquet: row 0: field 'answer' is missing"):
        load_benchmark_file(str(bad))

    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"problem": "p", "answer": "1"}\n{"question": "q", "answer": "2"}\n')
    assert cli_main(["--model", str(tmp_path), "--benchmark", str(jsonl), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(jsonl) in err and "line 2" in err and "'problem'" in err
    assert cli_main(["--model", str(tmp_path), "--benchmark", "aime2099", "--output", str(tmp_path / "o")]) == 2
    assert "unknown benchmark 'aime2099'" in capsys.readouterr().err
    assert cli_main(["--regrade", str(tmp_path / "nothing")]) == 2
    assert "no such file" in capsys.readouterr().err


# ---- hub benchmarks (the loader replaced: nothing is downloaded) -----------------------------------------------


def _fake_hub(tables):
    calls = []

    def loader(name, config, split, revision):
        calls.append((name, config, split, revision))
        return tables[(name, config)]

    return loader, calls


def _aime_rows():
    rows = []
    for year in (2022, 2023, 2024):
        for part in ("I", "II"):
            for k in range(1, 16):
                rows.append({"id": len(rows), "problem": f"{year} {part} {k}", "solution": "...", "answer": str(k),
                             "url": f"https://artofproblemsolving.com/wiki/index.php/{year}_AIME_{part}_Problems/Problem_{k}"})
    return rows


def test_hub_benchmarks_select_rows_assert_counts_and_pin_revisions():
    aime = _aime_rows()
    amc = [{"id": i, "problem": f"amc {i}", "answer": float(i) + 0.0,
            "url": f"https://artofproblemsolving.com/wiki/index.php/{2022 if i < 43 else 2023}_AMC_12{'A' if i % 2 else 'B'}_Problems/Problem_{i}"}
           for i in range(83)]
    loader, calls = _fake_hub({("AI-MO/aimo-validation-aime", None): aime, ("AI-MO/aimo-validation-amc", None): amc})
    b = load_hub_benchmark("aime24", loader=loader)
    assert len(b.problems) == 30 and all(p.problem.startswith("2024") for p in b.problems)
    assert b.problems[0].problem_id == "2024-I-1" and b.problems[15].problem_id == "2024-II-1"
    assert {p.subset for p in b.problems} == {"AIME2024-I", "AIME2024-II"}
    assert calls[0] == ("AI-MO/aimo-validation-aime", None, "train", REGISTRY["aime24"].sources[0].revision)
    assert len(calls[0][3]) == 40  # a commit hash, not a branch
    c = load_hub_benchmark("amc23", loader=loader)
    assert len(c.problems) == 40 and c.problems[0].answer == "43"  # float 43.0 -> "43"
    assert b.fingerprint() != c.fingerprint()

    loader, _ = _fake_hub({("AI-MO/aimo-validation-aime", None): aime[:-1]})
    with pytest.raises(BenchmarkError, match=r"89 rows, expected 90"):
        load_hub_benchmark("aime24", loader=loader)
    aime25 = {("opencompass/AIME2025", f"AIME2025-{p}"): [{"question": f"{p}{k}", "answer": str(k)} for k in range(15)]
              for p in ("I", "II")}
    loader, calls = _fake_hub(aime25)
    b = load_hub_benchmark("aime25", loader=loader)
    assert [p.problem_id for p in b.problems][:2] == ["2025-I-1", "2025-I-2"] and b.problems[15].problem_id == "2025-II-1"
    assert [c[1] for c in calls] == ["AIME2025-I", "AIME2025-II"] and all(c[2] == "test" for c in calls)
    short = dict(aime25)
    short[("opencompass/AIME2025", "AIME2025-II")] = aime25[("opencompass/AIME2025", "AIME2025-II")][:14]
    with pytest.raises(BenchmarkError, match=r"AIME2025-II.*14 rows, expected 15"):
        load_hub_benchmark("aime25", loader=_fake_hub(short)[0])
    math = [{"problem": f"m{i}", "answer": "1", "unique_id": f"test/x/{i}.json"} for i in range(500)]
    m = load_hub_benchmark("math500", loader=_fake_hub({("HuggingFaceH4/MATH-500", None): math})[0])
    assert len(m.problems) == 500 and m.problems[3].problem_id == "test/x/3.json"
