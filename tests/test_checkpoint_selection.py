"""Best-checkpoint selection on a planted ranking: the right checkpoint is picked, the ranking files and the plot
are right, a second run scores nothing again, changed settings or checkpoints are rescored, nothing is deleted
unless asked (and never ``latest``).

The scores are planted through the real grading path: the injected scoring function writes a samples.jsonl
whose responses box a correct answer for a planted number of samples, then grades it with
:func:`megatron_offgrpo.eval.runner.regrade`; the expected scores are hand-computed from the plan."""

import json
import os
import shutil

import pytest

from megatron_offgrpo.eval.benchmarks import Benchmark, Problem
from megatron_offgrpo.eval.runner import EvalSettings, regrade
from megatron_offgrpo.eval.selection import (
    EXPORT_RECORD,
    SelectionError,
    checkpoint_fingerprint,
    list_checkpoints,
    select_checkpoints,
)

N = 4
PROBLEMS = [Problem(f"q{i}", f"What is {i} + {i}?", str(2 * i)) for i in range(4)]
BENCH = Benchmark("planted", PROBLEMS, {"kind": "test"})
# step -> correct samples per problem (of N = 4). avg@4 = sum / 16.
PLAN = {
    10: [1, 1, 1, 1],  # 25%
    20: [4, 4, 3, 1],  # 75%  <- best (ties with 40, earlier step wins)
    30: [2, 2, 2, 2],  # 50%
    40: [4, 4, 4, 0],  # 75%
}
EXPECTED_AVG = {s: 100 * sum(c) / 16 for s, c in PLAN.items()}
# maj@4: majority correct when c > N - c; a 2-2 tie goes to the cluster seen first (our samples: correct first)
EXPECTED_MAJ = {10: 0.0, 20: 75.0, 30: 100.0, 40: 75.0}


def _make_run(root, steps=(10, 20, 30, 40), latest=40):
    run = os.path.join(root, "checkpoints")
    for s in steps:
        d = os.path.join(run, f"iter_{s:07d}")
        os.makedirs(os.path.join(d, "rng"))
        with open(os.path.join(d, "train_state.json"), "w") as f:
            json.dump({"step": s, "consumed_samples": 8 * s}, f)
        with open(os.path.join(d, "__0_0.distcp"), "wb") as f:
            f.write(b"\0" * (100 + s))
    os.makedirs(os.path.join(run, "iter_0000050.tmp"))  # an interrupted save: never a candidate
    with open(os.path.join(run, "latest"), "w") as f:
        f.write(f"iter_{latest:07d}\n")
    return run


class PlantedScorer:
    """Writes planted samples for a checkpoint and grades them with the real grader; counts its calls."""

    def __init__(self, plan=PLAN):
        self.plan = plan
        self.calls = []

    def __call__(self, ckpt, eval_dir):
        self.calls.append(ckpt.name)
        counts = self.plan[ckpt.step]
        with open(os.path.join(eval_dir, "samples.jsonl"), "w") as f:
            for p, c in zip(PROBLEMS, counts):
                for j in range(N):
                    # correct ones first; wrong ones all box the same wrong answer (so they form one cluster)
                    ans = p.answer if j < c else str(int(p.answer) + 1)
                    f.write(json.dumps({"benchmark": BENCH.name, "problem_id": p.problem_id, "sample_index": j,
                                        "reference": p.answer, "response": f"so \\boxed{{{ans}}}",
                                        "finish_reason": "stop"}) + "\n")
        return regrade(eval_dir, progress=False)


def test_selection_picks_the_planted_best_and_writes_ranking_files(tmp_path):
    run = _make_run(str(tmp_path))
    out = str(tmp_path / "sel")
    scorer, exports = PlantedScorer(), []

    def export_fn(ckpt, export_dir):
        exports.append(ckpt.name)
        os.makedirs(export_dir)
        with open(os.path.join(export_dir, "config.json"), "w") as f:
            json.dump({"from": ckpt.path}, f)

    settings = EvalSettings(n=N, temperature=0.6)
    res = select_checkpoints(run, BENCH, settings, out, top_k=2, export_dir=str(tmp_path / "best_hf"),
                             progress=False, score_fn=scorer, export_fn=export_fn)
    assert sorted(scorer.calls) == ["iter_0000010", "iter_0000020", "iter_0000030", "iter_0000040"]
    assert res.best.checkpoint.name == "iter_0000020"
    assert [r.checkpoint.step for r in res.ranking] == [20, 40, 30, 10]
    assert exports == ["iter_0000020"]

    ranking = json.load(open(os.path.join(out, "ranking.json")))
    rows = {r["step"]: r for r in ranking["checkpoints"]}
    for s in PLAN:
        assert rows[s]["avg_at_n"] == pytest.approx(EXPECTED_AVG[s]) and rows[s]["score"] == rows[s]["avg_at_n"]
        assert rows[s]["maj_at_n"] == pytest.approx(EXPECTED_MAJ[s]), s
    assert [r["rank"] for r in ranking["checkpoints"]] == [1, 2, 3, 4]
    assert [r["best"] for r in ranking["checkpoints"]] == [True, False, False, False]
    assert [r["keep"] for r in ranking["checkpoints"]] == [True, True, False, False]
    assert ranking["best"] == os.path.join(run, "iter_0000020")
    assert json.load(open(os.path.join(out, "top_k.json"))) == [os.path.join(run, "iter_0000020"),
                                                               os.path.join(run, "iter_0000040")]
    record = json.load(open(tmp_path / "best_hf" / EXPORT_RECORD))
    assert record["step"] == 20 and record["fingerprint"] == checkpoint_fingerprint(os.path.join(run, "iter_0000020"))

    md = open(os.path.join(out, "ranking.md")).read().splitlines()
    table = [line for line in md if line.startswith("| ") and "iter_" in line]
    assert [line.split("|")[2].strip() for line in table] == ["iter_0000020", "iter_0000040", "iter_0000030",
                                                              "iter_0000010"]
    assert "**best**" in table[0] and "kept" in table[1] and "best" not in table[2]
    assert table[0].split("|")[4].strip() == "75.00" and table[3].split("|")[4].strip() == "25.00"

    import matplotlib.image

    img = matplotlib.image.imread(os.path.join(out, "score_vs_step.png"))
    assert img.shape[:2] == (400, 700)  # figsize 7 x 4 at 100 dpi
    assert img[..., :3].std() > 0.05  # something was drawn

    # Re-run: nothing scored, and the export already holds the best: not exported again.
    res = select_checkpoints(run, BENCH, settings, out, top_k=2, export_dir=str(tmp_path / "best_hf"),
                             progress=False, score_fn=scorer, export_fn=export_fn)
    assert len(scorer.calls) == 4 and exports == ["iter_0000020"] and res.best.checkpoint.name == "iter_0000020"

    # Every checkpoint dir is untouched (no deletion without the flag), the interrupted save was ignored.
    assert sorted(os.listdir(run)) == ["iter_0000010", "iter_0000020", "iter_0000030", "iter_0000040",
                                       "iter_0000050.tmp", "latest"]


def test_selection_is_resumable(tmp_path):
    run = _make_run(str(tmp_path))
    out = str(tmp_path / "sel")
    settings = EvalSettings(n=N)
    first = PlantedScorer()
    select_checkpoints(run, BENCH, settings, out, progress=False, score_fn=first)
    assert len(first.calls) == 4
    ranking_before = json.load(open(os.path.join(out, "ranking.json")))

    again = PlantedScorer()
    res = select_checkpoints(run, BENCH, settings, out, progress=False, score_fn=again)
    assert again.calls == [] and res.scored == []
    assert all(r.cached for r in res.ranking)
    after = json.load(open(os.path.join(out, "ranking.json")))
    strip = lambda rk: [{k: v for k, v in r.items() if k != "cached"} for r in rk["checkpoints"]]  # noqa: E731
    assert strip(after) == strip(ranking_before)

    # A changed checkpoint (re-saved) and a new one are scored; the others come from the cache.
    with open(os.path.join(run, "iter_0000030", "train_state.json"), "w") as f:
        json.dump({"step": 30, "consumed_samples": 999}, f)
    shutil.copytree(os.path.join(run, "iter_0000010"), os.path.join(run, "iter_0000060"))
    plan = dict(PLAN)
    plan[60] = [4, 4, 4, 4]
    third = PlantedScorer(plan)
    res = select_checkpoints(run, BENCH, settings, out, progress=False, score_fn=third)
    assert sorted(third.calls) == ["iter_0000030", "iter_0000060"]
    assert res.best.checkpoint.name == "iter_0000060" and res.best.score == pytest.approx(100.0)

    # Other sampling settings: every checkpoint is scored again.
    fourth = PlantedScorer(plan)
    select_checkpoints(run, BENCH, EvalSettings(n=N, temperature=1.0), out, progress=False, score_fn=fourth)
    assert len(fourth.calls) == 5


def test_delete_others_keeps_top_k_and_latest(tmp_path):
    run = _make_run(str(tmp_path), latest=10)
    res = select_checkpoints(run, BENCH, EvalSettings(n=N), str(tmp_path / "sel"), top_k=2, metric="maj_at_n",
                             delete_others=True, progress=False, score_fn=PlantedScorer())
    # by maj@4: 30 (100) > 20 (75, earlier than 40) > 40 > 10; 10 is `latest`, so only 40 goes
    assert [r.checkpoint.step for r in res.ranking] == [30, 20, 40, 10]
    assert res.deleted == [os.path.join(run, "iter_0000040")]
    assert sorted(n for n in os.listdir(run) if n.startswith("iter_") and not n.endswith(".tmp")) == \
        ["iter_0000010", "iter_0000020", "iter_0000030"]
    rows = json.load(open(tmp_path / "sel" / "ranking.json"))["checkpoints"]
    assert [r["deleted"] for r in rows] == [False, False, True, False]


def test_selection_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "latest").write_text("iter_0000001\n")
    with pytest.raises(SelectionError, match="no iter_NNNNNNN checkpoint"):
        list_checkpoints(str(empty))
    with pytest.raises(SelectionError, match="no such directory"):
        list_checkpoints(str(tmp_path / "missing"))
    run = _make_run(str(tmp_path / "r"))
    scorer = PlantedScorer()
    with pytest.raises(SelectionError, match="unknown metric"):
        select_checkpoints(run, BENCH, EvalSettings(n=N), str(tmp_path / "s"), metric="accuracy", progress=False,
                           score_fn=scorer)
    with pytest.raises(SelectionError, match="pass@k for k in"):
        select_checkpoints(run, BENCH, EvalSettings(n=N), str(tmp_path / "s"), metric="pass@8", progress=False,
                           score_fn=scorer)
    assert scorer.calls == []  # refused before any evaluation
    # An export directory that holds something else is never overwritten.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "weights.bin").write_bytes(b"x")
    with pytest.raises(SelectionError, match="not an export of this tool"):
        select_checkpoints(run, BENCH, EvalSettings(n=N), str(tmp_path / "s2"), export_dir=str(foreign),
                           progress=False, score_fn=scorer, export_fn=lambda c, d: None)
    assert (foreign / "weights.bin").read_bytes() == b"x"
    assert scorer.calls == []  # refused before any evaluation


def _generation_available() -> bool:
    try:
        import megatron_offgrpo.inference.generation  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _generation_available(), reason="megatron_offgrpo.inference.generation is not installed")
def test_selection_of_real_megatron_checkpoints_exports_the_best(tmp_path):
    """The default path: Megatron checkpoints whose answers are planted (converted chain models), exported on the fly
    by the generation engine, generated with the HF backend, graded; the best (the *earlier* one) is exported to
    HF, and the exported model answers like it."""
    import subprocess
    import sys

    import transformers

    from eval_helpers import REPO, save_chain_model
    from megatron_offgrpo.eval.benchmarks import load_benchmark_file
    from megatron_offgrpo.eval.select import main as select_main

    models = {10: "\\boxed{7}", 20: "\\boxed{0.4}"}
    run = tmp_path / "run"
    run.mkdir()
    for step, text in models.items():
        save_chain_model(str(tmp_path / f"hf{step}"), text)
    # Converted in a child process: the converter leaves a process group in its caller (as the trainer would).
    script = ("from megatron_offgrpo.models.converter import convert_hf_to_mcore\n"
              + "".join(f"convert_hf_to_mcore({str(tmp_path / f'hf{s}')!r}, {str(run / f'iter_{s:07d}')!r}, "
                        "progress=False)\n" for s in models))
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONWARNINGS="ignore")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=REPO, timeout=300,
                   stdout=subprocess.DEVNULL)
    (run / "latest").write_text("iter_0000020\n")
    bench_file = tmp_path / "bench.jsonl"
    bench_file.write_text('{"problem": "a", "answer": "7"}\n{"problem": "b", "answer": "\\\\frac{14}{2}"}\n'
                          '{"problem": "c", "answer": "2/5"}\n')
    out, export = str(tmp_path / "sel"), str(tmp_path / "best_hf")
    # Through the command line (in process): python -m megatron_offgrpo.eval.select ...
    assert select_main(["--run-dir", str(run), "--benchmark", str(bench_file), "--n", "2", "--max-tokens", "16",
                        "--backend", "hf", "--top-k", "1", "--export-dir", export, "--output", out,
                        "--no-progress"]) == 0
    ranking = json.load(open(os.path.join(out, "ranking.json")))
    assert [(r["step"], round(r["score"], 6)) for r in ranking["checkpoints"]] == [(10, round(200 / 3, 6)),
                                                                                  (20, round(100 / 3, 6))]
    summary = json.load(open(os.path.join(out, "checkpoints", "iter_0000010", "summary.json")))
    assert summary["model"]["kind"] == "megatron" and summary["backend"] == "hf"
    assert summary["model"]["source"] == str(run / "iter_0000010")
    assert not os.path.exists(os.path.join(out, "_export", "iter_0000010"))  # per-checkpoint exports are removed

    record = json.load(open(os.path.join(export, EXPORT_RECORD)))
    assert record["step"] == 10 and record["checkpoint"] == str(run / "iter_0000010")
    tok = transformers.AutoTokenizer.from_pretrained(export)
    model = transformers.AutoModelForCausalLM.from_pretrained(export)
    ids = tok.apply_chat_template([{"role": "user", "content": "anything"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    gen = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) == "\\boxed{7}"

    settings = EvalSettings(n=2, max_tokens=16, backend="hf")
    again = select_checkpoints(str(run), load_benchmark_file(str(bench_file)), settings, out, top_k=1,
                               export_dir=export, progress=False)
    assert again.scored == [] and again.best.checkpoint.step == 10
