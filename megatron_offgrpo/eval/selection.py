"""Best-checkpoint selection: evaluate every saved checkpoint of a training run on a validation benchmark, rank
them, plot the score against the step, keep the top k and export the best to HF (docs/design.md §8: the blog picks
the best of its epochs by AIME24 and reports AIME25; keep the selection benchmark apart from the reported one).

A run's checkpoints are the ``iter_NNNNNNN`` directories of ``checkpoint.dir`` (:mod:`megatron_offgrpo.training.
checkpointing`; ``*.tmp`` directories of interrupted saves are never used). Output directory::

    checkpoints/iter_NNNNNNN/   the evaluation of each checkpoint (runner layout: samples.jsonl, summary.json, ...)
                                and cache_key.json
    ranking.json                every checkpoint with its scores, rank, best / keep flags, and the settings
    ranking.md                  the same as a markdown table
    score_vs_step.png           score (with its bootstrap interval) against the training step, best marked
    top_k.json                  the paths of the k best checkpoints, best first

**Resumable.** A checkpoint is scored again only when its cache key changes: the key hashes the checkpoint's
fingerprint (:func:`checkpoint_fingerprint`), the sampling settings, the benchmark's problems and the bootstrap
settings. A selection killed half-way, or re-run after training saved more checkpoints, scores only what is new.

Checkpoints are never deleted unless asked (``delete_others``), and then never the one ``latest`` names (the
run's resume point).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from megatron_offgrpo.eval.benchmarks import Benchmark
from megatron_offgrpo.eval.runner import SUMMARY_FILE, EvalSettings

__all__ = ["CheckpointInfo", "RankedCheckpoint", "SelectionResult", "SelectionError", "list_checkpoints",
           "checkpoint_fingerprint", "cache_key", "metric_value", "select_checkpoints", "export_to_hf",
           "print_ranking"]

_ITER_RE = re.compile(r"^iter_(\d{7})$")
CACHE_FILE = "cache_key.json"
RANKING_JSON, RANKING_MD, PLOT_FILE, TOP_K_FILE = "ranking.json", "ranking.md", "score_vs_step.png", "top_k.json"
EXPORT_RECORD = "offgrpo_selection.json"  # next to the engine's own offgrpo_export.json


class SelectionError(ValueError):
    """A run directory or a selection request that cannot be served (no checkpoints, unknown metric...)."""


@dataclass(frozen=True)
class CheckpointInfo:
    """One saved checkpoint of a run: its directory name, training step, path and content fingerprint."""

    name: str
    step: int
    path: str
    fingerprint: str


@dataclass
class RankedCheckpoint:
    """A scored checkpoint: its info, the evaluation summary and where it ranks (1 = best)."""

    checkpoint: CheckpointInfo
    summary: Dict[str, Any]
    score: float
    rank: int = 0
    best: bool = False
    keep: bool = False
    cached: bool = False
    eval_dir: str = ""


@dataclass
class SelectionResult:
    """What :func:`select_checkpoints` decided and wrote."""

    ranking: List[RankedCheckpoint]
    output_dir: str
    metric: str
    scored: List[str] = field(default_factory=list)  # names evaluated now (the rest came from the cache)
    export_dir: Optional[str] = None
    deleted: List[str] = field(default_factory=list)

    @property
    def best(self) -> RankedCheckpoint:
        return self.ranking[0]


def checkpoint_fingerprint(path: str) -> str:
    """sha256 identifying a checkpoint directory's content without reading its weights.

    Hashes every file's relative path and size, plus the bytes of the small files that describe it
    (``train_state.json``: step, consumed samples, scheduler and run identity; ``offgrpo_model.json``; the
    ``dist_checkpointing`` ``.metadata`` and ``metadata.json``). A re-saved or replaced checkpoint changes it; a copy
    to another file system does not.
    """
    h = hashlib.sha256()
    small = ("train_state.json", "offgrpo_model.json", ".metadata", "metadata.json", "common.pt")
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            h.update(f"{rel}\0{os.path.getsize(full)}\n".encode())
            if rel in small:
                with open(full, "rb") as f:
                    h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def list_checkpoints(run_dir: str) -> List[CheckpointInfo]:
    """The complete checkpoints (``iter_NNNNNNN``) of ``run_dir`` in step order; raises :class:`SelectionError`
    when there are none (naming what was found)."""
    if not os.path.isdir(run_dir):
        raise SelectionError(f"{run_dir}: no such directory; pass the run's checkpoint.dir (it holds iter_NNNNNNN "
                             "directories and 'latest')")
    found = []
    for name in sorted(os.listdir(run_dir)):
        m = _ITER_RE.match(name)
        full = os.path.join(run_dir, name)
        if m and os.path.isdir(full):
            found.append(CheckpointInfo(name, int(m.group(1)), os.path.abspath(full), checkpoint_fingerprint(full)))
    if not found:
        entries = sorted(os.listdir(run_dir))[:10]
        raise SelectionError(f"{run_dir}: no iter_NNNNNNN checkpoint directories (found {entries}); pass the run's "
                             "checkpoint.dir")
    return found


def cache_key(fingerprint: str, settings: EvalSettings, benchmark_fingerprint: str) -> str:
    """The key a cached evaluation must match: checkpoint, sampling settings, problems, bootstrap settings."""
    blob = json.dumps({"checkpoint": fingerprint, "sampling": settings.sampling(), "bootstrap": settings.bootstrap(),
                       "benchmark": benchmark_fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def metric_value(summary: Dict[str, Any], metric: str) -> float:
    """The score ``metric`` (``avg_at_n``, ``maj_at_n`` or ``pass@K``) of an evaluation summary, in percent."""
    if metric in ("avg_at_n", "maj_at_n"):
        return float(summary[metric])
    m = re.fullmatch(r"pass@(\d+)", metric)
    if m:
        table = summary["pass_at_k"]
        if m.group(1) not in table:
            raise SelectionError(f"metric {metric}: the evaluation has pass@k for k in {sorted(table, key=int)}")
        return float(table[m.group(1)])
    raise SelectionError(f"unknown metric {metric!r}; use avg_at_n, maj_at_n or pass@K")


def _read_cached(eval_dir: str, key: str) -> Optional[Dict[str, Any]]:
    try:
        with open(os.path.join(eval_dir, CACHE_FILE)) as f:
            if json.load(f).get("key") != key:
                return None
        with open(os.path.join(eval_dir, SUMMARY_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError, AttributeError):
        return None


ScoreFn = Callable[[CheckpointInfo, str], Dict[str, Any]]
ExportFn = Callable[[CheckpointInfo, str], None]


def _default_score_fn(benchmark: Benchmark, settings: EvalSettings, hf_template: Optional[str], work_root: str,
                      grading_workers: int, progress: bool) -> ScoreFn:
    from megatron_offgrpo.eval.runner import evaluate

    def score(ckpt: CheckpointInfo, eval_dir: str) -> Dict[str, Any]:
        # The on-the-fly HF export stays in work_root/<name> while this checkpoint is the best so far (the final
        # export then reuses it); select_checkpoints removes the others as it goes.
        return evaluate(ckpt.path, benchmark, settings, eval_dir, hf_template=hf_template,
                        work_dir=os.path.join(work_root, ckpt.name), grading_workers=grading_workers,
                        progress=progress, overwrite=True)

    return score


def export_to_hf(ckpt: CheckpointInfo, export_dir: str, hf_template: Optional[str] = None,
                 work_dir: Optional[str] = None) -> None:
    """Export ``ckpt`` as an HF model directory at ``export_dir`` through the generation engine's
    :func:`~megatron_offgrpo.inference.generation.resolve_model` (an HF checkpoint is copied). The directory appears
    complete or not at all (written as ``export_dir.tmp``, then renamed).

    ``work_dir``: the engine's export cache to use and then *remove* (selection passes the one its evaluation of
    ``ckpt`` already filled, so the conversion is not done twice); default a private one next to ``export_dir``.
    """
    from megatron_offgrpo.inference.generation import resolve_model

    tmp = export_dir.rstrip("/") + ".tmp"
    work = work_dir or (export_dir.rstrip("/") + ".work")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        resolved = resolve_model(ckpt.path, work_dir=work, hf_template=hf_template)
        inside_work = os.path.commonpath([os.path.abspath(resolved.hf_dir), os.path.abspath(work)]) == \
            os.path.abspath(work)
        if inside_work:  # an export in a work dir we remove anyway: move it rather than copy gigabytes
            shutil.move(resolved.hf_dir, tmp)
        else:
            shutil.copytree(resolved.hf_dir, tmp)
        with open(os.path.join(tmp, "offgrpo_model_identity.json"), "w") as f:
            json.dump(resolved.identity, f, indent=2, sort_keys=True)
        if os.path.isdir(export_dir):
            shutil.rmtree(export_dir)
        os.rename(tmp, export_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def _exported_fingerprint(export_dir: str) -> Optional[str]:
    try:
        with open(os.path.join(export_dir, EXPORT_RECORD)) as f:
            return json.load(f).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _latest_name(run_dir: str) -> Optional[str]:
    try:
        with open(os.path.join(run_dir, "latest")) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _ranking_rows(result: SelectionResult) -> List[Dict[str, Any]]:
    rows = []
    for r in result.ranking:
        s = r.summary
        rows.append({
            "rank": r.rank, "name": r.checkpoint.name, "step": r.checkpoint.step, "path": r.checkpoint.path,
            "fingerprint": r.checkpoint.fingerprint, "score": r.score, "avg_at_n": s.get("avg_at_n"),
            "maj_at_n": s.get("maj_at_n"), "pass_at_k": s.get("pass_at_k"), "ci": s.get("ci"),
            "truncated": (s.get("truncated") or {}).get("count"), "best": r.best, "keep": r.keep,
            "cached": r.cached, "eval_dir": r.eval_dir, "deleted": r.checkpoint.path in result.deleted,
        })
    return rows


def _write_markdown(path: str, result: SelectionResult, benchmark: str, n: int) -> None:
    from megatron_offgrpo.data.atomic import atomic_write_bytes

    ks = list((result.best.summary.get("pass_at_k") or {}).keys())
    conf = (result.best.summary.get("ci") or {}).get("confidence", 0.95)
    head = ["rank", "checkpoint", "step", f"{result.metric} (%)", f"{round(conf * 100)}% CI of avg@{n}",
            f"avg@{n} (%)", f"maj@{n} (%)"]
    head += [f"pass@{k} (%)" for k in ks] + ["truncated", ""]
    lines = [f"# Checkpoint ranking on {benchmark} by {result.metric} (n = {n})", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in result.ranking:
        s = r.summary
        ci = s.get("ci") or {}
        mark = "**best**" if r.best else ("kept" if r.keep else "")
        cells = [str(r.rank), r.checkpoint.name, str(r.checkpoint.step), f"{r.score:.2f}",
                 f"[{ci.get('low', float('nan')):.2f}, {ci.get('high', float('nan')):.2f}]",
                 f"{s['avg_at_n']:.2f}", f"{s['maj_at_n']:.2f}"]
        cells += [f"{s['pass_at_k'][k]:.2f}" for k in ks]
        cells += [str((s.get("truncated") or {}).get("count", "")), mark]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Best: `{result.best.checkpoint.path}`"]
    if result.export_dir:
        lines.append(f"Exported to HF: `{result.export_dir}`")
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))


def _plot(path: str, result: SelectionResult, benchmark: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_step = sorted(result.ranking, key=lambda r: r.checkpoint.step)
    steps = [r.checkpoint.step for r in by_step]
    scores = [r.score for r in by_step]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, scores, marker="o", label=result.metric)
    if result.metric == "avg_at_n":  # the interval is the avg@n's
        lows = [r.summary["ci"]["low"] for r in by_step]
        highs = [r.summary["ci"]["high"] for r in by_step]
        ax.fill_between(steps, lows, highs, alpha=0.2, label=f"{int(by_step[0].summary['ci']['confidence'] * 100)}% "
                                                              "bootstrap CI")
    kept = [r for r in by_step if r.keep and not r.best]
    if kept:
        ax.scatter([r.checkpoint.step for r in kept], [r.score for r in kept], s=120, facecolors="none",
                   edgecolors="tab:green", label="top k", zorder=3)
    best = result.best
    ax.scatter([best.checkpoint.step], [best.score], marker="*", s=300, color="tab:red", zorder=4,
               label=f"best: {best.checkpoint.name} ({best.score:.2f})")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{result.metric} (%)")
    ax.set_title(f"{benchmark}: {result.metric} by checkpoint")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def print_ranking(result: SelectionResult, n: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"checkpoints ranked by {result.metric}")
    for col in ("rank", "checkpoint", "step", f"{result.metric} (%)", f"avg@{n} CI", "", "cached"):
        table.add_column(col)
    for r in result.ranking:
        ci = r.summary.get("ci") or {}
        table.add_row(str(r.rank), r.checkpoint.name, str(r.checkpoint.step), f"{r.score:.2f}",
                      f"[{ci.get('low', 0):.2f}, {ci.get('high', 0):.2f}]",
                      "best" if r.best else ("kept" if r.keep else ""), "yes" if r.cached else "")
    Console().print(table)


def select_checkpoints(
    run_dir: str,
    benchmark: Benchmark,
    settings: EvalSettings,
    output_dir: str,
    *,
    top_k: int = 1,
    metric: str = "avg_at_n",
    export_dir: Optional[str] = None,
    hf_template: Optional[str] = None,
    delete_others: bool = False,
    grading_workers: int = 0,
    progress: bool = True,
    score_fn: Optional[ScoreFn] = None,
    export_fn: Optional[ExportFn] = None,
) -> SelectionResult:
    """Score every checkpoint of ``run_dir`` on ``benchmark`` (cached: module docstring), rank them by ``metric``
    (descending; a tie goes to the earlier step, the less-trained of equally good checkpoints), write the ranking
    files, export the best to ``export_dir`` (when given) and, only with ``delete_others``, delete the checkpoints
    outside the top ``top_k`` (never the one ``latest`` names).

    ``score_fn(checkpoint, eval_dir) -> summary`` replaces the default (:func:`megatron_offgrpo.eval.runner.evaluate`
    of the checkpoint, exported on the fly); ``export_fn(checkpoint, export_dir)`` replaces :func:`export_to_hf`.
    """
    from tqdm import tqdm

    from megatron_offgrpo.data.atomic import atomic_write_json
    from megatron_offgrpo.eval.metrics import pass_at_k_levels

    # Everything that can be refused is refused before hours of evaluation.
    if top_k < 1:
        raise SelectionError(f"top_k must be >= 1, got {top_k}")
    metric_value({"avg_at_n": 0.0, "maj_at_n": 0.0, "pass_at_k": {str(k): 0.0 for k in pass_at_k_levels(settings.n)}},
                 metric)
    if export_dir and os.path.isdir(export_dir) and os.listdir(export_dir) and _exported_fingerprint(export_dir) is None:
        raise SelectionError(f"{export_dir} exists and is not an export of this tool; choose another --export-dir or "
                             "empty it")
    checkpoints = list_checkpoints(run_dir)
    os.makedirs(output_dir, exist_ok=True)
    work_root = os.path.join(output_dir, "_export") if score_fn is None else None
    if score_fn is None:
        score_fn = _default_score_fn(benchmark, settings, hf_template, work_root, grading_workers, progress)
    bench_fp = benchmark.fingerprint()
    ranked: List[RankedCheckpoint] = []
    scored: List[str] = []
    bar = tqdm(checkpoints, desc="checkpoints", unit="ckpt", disable=not progress, dynamic_ncols=True)
    for ckpt in bar:
        bar.set_postfix_str(ckpt.name)
        eval_dir = os.path.join(output_dir, "checkpoints", ckpt.name)
        key = cache_key(ckpt.fingerprint, settings, bench_fp)
        summary = _read_cached(eval_dir, key)
        cached = summary is not None
        if summary is None:
            os.makedirs(eval_dir, exist_ok=True)
            stale = os.path.join(eval_dir, CACHE_FILE)
            if os.path.exists(stale):  # the old result no longer applies; a crash must not revive it
                os.remove(stale)
            summary = score_fn(ckpt, eval_dir)
            atomic_write_json(os.path.join(eval_dir, SUMMARY_FILE), summary)
            atomic_write_json(stale, {"key": key, "checkpoint": ckpt.path, "fingerprint": ckpt.fingerprint,
                                      "sampling": settings.sampling(), "bootstrap": settings.bootstrap(),
                                      "benchmark": benchmark.name, "benchmark_fingerprint": bench_fp})
            scored.append(ckpt.name)
        ranked.append(RankedCheckpoint(ckpt, summary, metric_value(summary, metric), cached=cached, eval_dir=eval_dir))
        if work_root is not None:  # at most two exports on disk: the best so far and the one just scored
            leader = min(ranked, key=lambda r: (-r.score, r.checkpoint.step)).checkpoint.name
            for r in ranked:
                if r.checkpoint.name != leader:
                    shutil.rmtree(os.path.join(work_root, r.checkpoint.name), ignore_errors=True)
    bar.close()

    ranked.sort(key=lambda r: (-r.score, r.checkpoint.step))
    for i, r in enumerate(ranked):
        r.rank, r.best, r.keep = i + 1, i == 0, i < top_k
    result = SelectionResult(ranked, output_dir, metric, scored)

    if export_dir:
        best = result.best.checkpoint
        if _exported_fingerprint(export_dir) == best.fingerprint:
            print(f"{export_dir} already holds {best.name} (same fingerprint): not exported again")
        else:
            reuse = os.path.join(work_root, best.name) if work_root is not None else None
            (export_fn or (lambda c, d: export_to_hf(c, d, hf_template, work_dir=reuse)))(best, export_dir)
            # Written once the export is complete: a directory with this record is a finished export of `best`.
            atomic_write_json(os.path.join(export_dir, EXPORT_RECORD),
                              {"checkpoint": best.path, "step": best.step, "fingerprint": best.fingerprint,
                               "benchmark": benchmark.name, "metric": metric, "score": result.best.score})
        result.export_dir = os.path.abspath(export_dir)

    if delete_others:  # before the records, which mark what was deleted
        latest = _latest_name(run_dir)
        for r in ranked:
            if r.keep:
                continue
            if r.checkpoint.name == latest:
                print(f"kept {r.checkpoint.path}: 'latest' names it (the run's resume point)")
                continue
            shutil.rmtree(r.checkpoint.path)
            result.deleted.append(r.checkpoint.path)
            print(f"deleted {r.checkpoint.path} (rank {r.rank}, outside the top {top_k})")
    if work_root is not None:
        shutil.rmtree(work_root, ignore_errors=True)
    n = settings.n
    record = {"benchmark": benchmark.name, "benchmark_source": benchmark.source, "benchmark_fingerprint": bench_fp,
              "metric": metric, "top_k": top_k, "settings": {**settings.sampling(), **settings.bootstrap()},
              "run_dir": os.path.abspath(run_dir), "best": result.best.checkpoint.path,
              "export_dir": result.export_dir, "checkpoints": _ranking_rows(result)}
    atomic_write_json(os.path.join(output_dir, RANKING_JSON), record)
    atomic_write_json(os.path.join(output_dir, TOP_K_FILE), [r.checkpoint.path for r in ranked if r.keep])
    _write_markdown(os.path.join(output_dir, RANKING_MD), result, benchmark.name, n)
    _plot(os.path.join(output_dir, PLOT_FILE), result, benchmark.name)
    return result
