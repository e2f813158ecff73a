"""The CPU demo's learnable synthetic tasks (megatron_offgrpo/preprocess/demo_tasks.py) and the shipped files.

Oracles, independent of the generator: each problem's answer recomputed from its text with a regex and plain
Python (repeat / reverse the digits / add one); a response's claimed answer read from its ``\\boxed{}`` with a
regex; the project's rewards module (math-verify majority vote, what ``build_dataset.py`` uses) must label every
shipped group with the true answer and reward exactly the rollouts whose box holds it; the evaluation CLI's own
benchmark loader reads the shipped benchmark; ``transformers`` and the project's HF config reader for the
initial model.
"""

import json
import os
import re
from collections import Counter

import pytest

from megatron_offgrpo.preprocess.demo_tasks import (
    TASKS,
    before_after_rows,
    split_problems,
    training_rows,
    write_initial_model,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DIR = os.path.join(REPO, "examples", "demo")
TRAIN = os.path.join(DEMO_DIR, "train.jsonl")
BENCHMARK = os.path.join(DEMO_DIR, "benchmark.jsonl")
BOXED = re.compile(r"\\boxed\{(-?\d+)\}")


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _oracle_answer(problem: str) -> int:
    """The answer from the problem text alone (written here, not taken from the generator)."""
    if m := re.fullmatch(r"Repeat the number (\d+)\.", problem):
        return int(m.group(1))
    if m := re.fullmatch(r"Reverse the digits of (\d+)\.", problem):
        return int(m.group(1)[::-1])
    if m := re.fullmatch(r"What number comes after (\d+)\?", problem):
        return int(m.group(1)) + 1
    raise AssertionError(f"unexpected problem text {problem!r}")


def _groups(rows):
    """problem -> (ground truth answer, [responses]) in file order."""
    groups = {}
    for r in rows:
        problem, response = r["conversations"][0]["value"], r["conversations"][1]["value"]
        groups.setdefault(problem, (r["answer"], []))[1].append(response)
    return groups


# ---- determinism and the shipped files --------------------------------------------------------------------------


def _cli_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_demo_data", os.path.join(REPO, "tools", "preprocess",
                                                                                  "make_demo_data.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_cli_regenerates_the_shipped_files_byte_for_byte(tmp_path):
    assert _cli_main()(["data", "--out-dir", str(tmp_path)]) == 0
    for name in ("train.jsonl", "benchmark.jsonl"):
        with open(tmp_path / name, "rb") as a, open(os.path.join(DEMO_DIR, name), "rb") as b:
            assert a.read() == b.read(), f"examples/demo/{name} is not what make_demo_data.py writes"


def test_same_seed_same_output_other_seed_other_output():
    a = split_problems(20, 5, seed=3)
    b = split_problems(20, 5, seed=3)
    c = split_problems(20, 5, seed=4)
    assert a == b and list(training_rows(a.train, 8, 3)) == list(training_rows(b.train, 8, 3))
    assert a.train != c.train and a.benchmark != c.benchmark
    assert list(training_rows(a.train, 8, 3)) != list(training_rows(a.train, 8, 4))  # the rollouts' own seed


def test_bad_arguments_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="has 900 distinct problems, 1000 requested"):
        split_problems(990, 10, tasks=("copy",))
    with pytest.raises(ValueError, match="unknown demo task 'add'"):
        split_problems(1, 1, tasks=("add",))
    with pytest.raises(ValueError, match="mixed_fraction"):
        list(training_rows(split_problems(1, 0).train, 8, 0, mixed_fraction=1.5))
    assert _cli_main()(["data", "--out-dir", "/nonexistent-never-written", "--tasks", "add"]) == 2


# ---- the benchmark is held out ----------------------------------------------------------------------------------


def test_benchmark_is_disjoint_from_training_and_its_answers_are_right():
    train, bench = _read_jsonl(TRAIN), _read_jsonl(BENCHMARK)
    train_problems = {r["conversations"][0]["value"] for r in train}
    bench_problems = [r["problem"] for r in bench]
    assert len(set(bench_problems)) == len(bench_problems)  # no repeats
    assert not set(bench_problems) & train_problems
    # Disjoint as task instances too, not only as texts: the operands of a benchmark problem never appear in a
    # training problem of the same task.
    def instance(text):
        return (re.sub(r"\d+", "N", text), tuple(re.findall(r"\d+", text)))
    assert not {instance(p) for p in bench_problems} & {instance(p) for p in train_problems}
    for r in bench:
        assert int(r["answer"]) == _oracle_answer(r["problem"]), r
        assert set(r) == {"id", "problem", "answer", "subset"}
    assert Counter(r["subset"] for r in bench) == {t: len(bench) // len(TASKS) for t in TASKS}
    for r in train:
        assert int(r["answer"]) == _oracle_answer(r["conversations"][0]["value"])


def test_the_eval_cli_reads_the_benchmark_with_one_subset_per_task():
    from megatron_offgrpo.eval.benchmarks import load_benchmark

    bench = load_benchmark(BENCHMARK)
    rows = _read_jsonl(BENCHMARK)
    assert [(p.problem_id, p.problem, p.answer, p.subset) for p in bench.problems] == [
        (r["id"], r["problem"], r["answer"], r["subset"]) for r in rows]


# ---- the teacher rollouts: the majority vote gives the intended labels -------------------------------------------


def test_majority_vote_labels_every_shipped_group_with_the_truth_and_rewards_exactly_the_right_rollouts():
    from megatron_offgrpo.rewards import ALL_POSITIVE, MIXED, LabelConfig, label_group

    groups = _groups(_read_jsonl(TRAIN))
    config = LabelConfig(min_agreement=0.5)  # build_dataset.py's default
    types = Counter()
    for problem, (truth, responses) in groups.items():
        assert len(responses) == 8
        claimed = [int(BOXED.findall(r)[-1]) for r in responses]
        intended = [1.0 if c == _oracle_answer(problem) else 0.0 for c in claimed]
        out = label_group(responses, truth, config)
        assert out.reject_reason is None, (problem, out.reject_reason)
        assert out.reference_match is True  # math-verify: the vote's label is equivalent to the truth
        assert int(out.label) == int(truth) == _oracle_answer(problem), problem
        assert list(out.rewards) == intended, problem
        assert sum(intended) > len(responses) / 2  # the truth is the strict majority
        types[out.stats.group_type] += 1
        # A wrong rollout reasons consistently with its wrong claim: its <think> line names the claimed number.
        for r, c in zip(responses, claimed):
            assert str(c) in r.split("</think>")[0]
    assert set(types) == {ALL_POSITIVE, MIXED}  # offline GRPO sees both (the bias, and +/- advantages)
    assert 0.25 < types[MIXED] / len(groups) < 0.9


# ---- the initial model ------------------------------------------------------------------------------------------


def test_initial_model_is_a_seeded_hf_qwen3_of_the_tiny_shape_with_the_shipped_tokenizer(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_offgrpo.models.architecture import model_config_from_hf, tiny_architecture
    from megatron_offgrpo.preprocess.tiny_tokenizer import load_tiny_tokenizer

    a, b, c = (str(tmp_path / n) for n in ("a", "b", "c"))
    write_initial_model(a, hidden_size=64, num_layers=2, seed=7)
    write_initial_model(b, hidden_size=64, num_layers=2, seed=7)
    write_initial_model(c, hidden_size=64, num_layers=2, seed=8)
    with pytest.raises(FileExistsError, match="remove it"):
        write_initial_model(a)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]  # no temporary directory left

    with open(os.path.join(a, "config.json")) as f:
        arch = model_config_from_hf(json.load(f))
    want = tiny_architecture(261, 2, 64)
    for field in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                  "head_dim", "vocab_size", "qk_norm", "tie_word_embeddings"):
        assert getattr(arch, field) == getattr(want, field), field
    ma, mb, mc = (AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32) for p in (a, b, c))
    sa, sb, sc = ma.state_dict(), mb.state_dict(), mc.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # same seed, same weights
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])
    assert sa["model.embed_tokens.weight"].std().item() == pytest.approx(0.02, rel=0.1)  # initializer_range

    tok, shipped = AutoTokenizer.from_pretrained(a), load_tiny_tokenizer()
    msgs = [{"role": "user", "content": "Repeat the number 123."}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        shipped.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert tok.eos_token_id == shipped.eos_token_id == ma.generation_config.eos_token_id


def test_demo_config_is_valid_for_the_initial_model(tmp_path):
    from megatron_offgrpo.config.loader import load_config, validate_config

    init = str(tmp_path / "init")
    write_initial_model(init)  # the demo's shape: hidden 128 (head_dim 32, as vLLM's CPU attention needs)
    cfg = load_config(os.path.join(REPO, "examples", "demo_cpu.yaml"), [f"model.architecture={init}", "parallel.tp=2"])
    validate_config(cfg, world_size=2, check_files=False)
    with open(os.path.join(init, "config.json")) as f:
        assert json.load(f)["head_dim"] == 32


# ---- the closing table ------------------------------------------------------------------------------------------


def _summary(avg, subsets, **settings):
    base = {"n": 4, "temperature": 0.6, "top_p": 0.95, "max_tokens": 64, "prompt_template": "{problem}", "seed": 0}
    base.update(settings)
    ci = {"low": avg - 1, "high": avg + 1, "confidence": 0.95}
    return {"benchmark_fingerprint": "f", "settings": base, "num_problems": 6, "avg_at_n": avg, "ci": ci,
            "subsets": {k: {"num_problems": 3, "avg_at_n": v, "ci": {"low": v, "high": v}} for k, v in subsets.items()}}


def test_before_after_rows_and_refusal_of_incomparable_summaries():
    rows = before_after_rows(_summary(0.0, {"copy": 0.0, "reverse": 0.0}),
                             _summary(50.0, {"copy": 75.0, "reverse": 25.0}))
    assert [(r.subset, r.num_problems, r.before, r.after) for r in rows] == [
        ("all", 6, 0.0, 50.0), ("copy", 3, 0.0, 75.0), ("reverse", 3, 0.0, 25.0)]
    assert rows[0].after_ci == (49.0, 51.0)
    with pytest.raises(ValueError, match="temperature"):
        before_after_rows(_summary(0.0, {}), _summary(1.0, {}, temperature=0.0))
    other = _summary(1.0, {})
    other["benchmark_fingerprint"] = "g"
    with pytest.raises(ValueError, match="different benchmarks"):
        before_after_rows(_summary(0.0, {}), other)
