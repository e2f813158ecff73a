"""Human-facing output of a build: the rich summary tables and the ``--stats-plot`` PNG."""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
from rich.console import Console
from rich.table import Table

from megatron_offgrpo.preprocess.build import BuildResult
from megatron_offgrpo.preprocess.selection import SelectionReport


def _hist_table(title: str, before: Dict[str, int], after: Dict[str, int]) -> Table:
    t = Table(title=title)
    t.add_column("bin")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    for k in before:
        t.add_row(k, str(before[k]), str(after.get(k, 0)))
    return t


def print_selection(report: SelectionReport, console: Optional[Console] = None) -> None:
    """Before/after difficulty histograms of the group selection."""
    console = console or Console()
    console.print(_hist_table(f"teacher agreement (strategy={report.strategy}, requested={report.requested})",
                              report.before_agreement, report.after_agreement))
    if report.before_pass_rate:
        console.print(_hist_table(f"student pass rate (unknown: {report.missing_pass_rate})",
                                  report.before_pass_rate, report.after_pass_rate))


def _stats_row(name: str, x: np.ndarray) -> list:
    if len(x) == 0:
        return [name] + ["-"] * 5
    return [name, f"{x.mean():.1f}", f"{np.median(x):.0f}", f"{np.percentile(x, 95):.0f}", str(int(x.max())),
            str(int(x.sum()))]


def print_summary(res: BuildResult, console: Optional[Console] = None) -> None:
    """The end-of-build summary: groups in/out, rejects by reason, group types, token statistics."""
    console = console or Console()
    print_selection(res.selection, console)

    t = Table(title=f"dataset {res.manifest['counts']['sequences']} sequences -> {res.manifest.get('prefix', '')}")
    t.add_column("item")
    t.add_column("count", justify="right")
    t.add_row("rows read", str(res.rows_read))
    t.add_row("duplicate problem ids rejected", str(res.duplicate_problem_ids))
    t.add_row("groups in (after reading)", str(res.groups_in))
    t.add_row("groups not selected (--num-groups)", str(res.not_selected))
    t.add_row("groups out", str(res.groups_out))
    t.add_row("trajectories in", str(res.trajectories_in))
    t.add_row("trajectories out", str(res.trajectories_out))
    for gtype, n in res.group_types.items():
        t.add_row(f"  {gtype} groups", str(n))
    if res.vote_accuracy is not None:
        ok, n = res.vote_accuracy
        t.add_row("vote accuracy vs ground truth", f"{ok}/{n} = {ok / n:.3f}")
    for k, v in res.verifier.items():
        if k in ("pairs", "fast_path") or v:
            t.add_row(f"verifier {k}", str(v))
    t.add_row("seconds", f"{res.seconds:.1f}")
    console.print(t)

    r = Table(title=f"rejected (details in {res.rejects_path})")
    r.add_column("stage:reason")
    r.add_column("count", justify="right")
    for k, v in res.rejects.items():
        r.add_row(k, str(v))
    if not res.rejects:
        r.add_row("(none)", "0")
    console.print(r)

    s = Table(title="tokens per sequence")
    for c in ("", "mean", "median", "p95", "max", "total"):
        s.add_column(c, justify="right")
    s.add_row(*_stats_row("sequence", res.seq_lens))
    s.add_row(*_stats_row("prompt", res.prompt_lens))
    s.add_row(*_stats_row("response", res.response_lens))
    console.print(s)


def draw_stats_plot(res: BuildResult, path: str) -> None:
    """Group-type pie (the blog's Figure 2 kind; split by student success when pass rates were given) and the
    sequence-length histogram, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    labels, sizes = [], []
    has_student = any(p is not None for p in res.student_pass_rates)
    for gtype, n in res.group_types.items():
        if gtype == "all_positive" and has_student:
            fails = sum(1 for ap, p in zip(res.all_positive_flags, res.student_pass_rates) if ap and p is not None and p < 1)
            rest = n - fails
            if fails:
                labels.append("all-positive, student not perfect")
                sizes.append(fails)
            if rest:
                labels.append("all-positive, student perfect/unknown")
                sizes.append(rest)
        elif n:
            labels.append(gtype.replace("_", "-"))
            sizes.append(n)
    ax = axes[0]
    if sizes:
        ax.pie(sizes, labels=[f"{lab}\n({n})" for lab, n in zip(labels, sizes)], autopct="%1.0f%%", startangle=90)
    ax.set_title(f"group types ({sum(sizes)} groups)")
    ax = axes[1]
    if len(res.seq_lens):
        ax.hist(res.response_lens, bins=30, alpha=0.7, label="response")
        ax.hist(res.seq_lens, bins=30, alpha=0.5, label="prompt + response")
        ax.legend()
    ax.set_xlabel("tokens")
    ax.set_ylabel("sequences")
    ax.set_title("length histogram")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
