"""Rank-0 reporting: progress bar with ETA, metric lines, TensorBoard (and W&B), the final table and curves."""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

from megatron_offgrpo.config.schema import TrainConfig

# Metrics shown in the console line and the final table, with their formats.
_SHOWN = {
    "loss": ".5f",
    "kl": ".4f",
    "clip_frac": ".3f",
    "adv_mean": ".3f",
    "all_positive_frac": ".2f",
    "logprob_pos": ".4f",
    "logprob_neg": ".4f",
    "grad_norm": ".3f",
    "lr": ".2e",
    "tokens_per_s": ".0f",
    "tflops": ".3f",
    "mem_gib": ".2f",
}


class MetricsLogger:
    """Collects per-step metrics on rank 0 and writes them where the config says; a no-op on other ranks."""

    def __init__(self, cfg: TrainConfig, is_rank0: bool, start_step: int):
        self.cfg = cfg
        self.active = is_rank0
        self.history: List[Dict[str, float]] = []
        self.valid_history: List[Dict[str, float]] = []
        self._tb = None
        self._jsonl = None
        self._wandb = None
        self._bar = None
        if not self.active:
            return
        log = cfg.logging
        if log.dir:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(log.dir, exist_ok=True)
            self._tb = SummaryWriter(log.dir)
            # Full-precision record of every step (JSON floats round-trip exactly), appended across resumes.
            self._jsonl = open(os.path.join(log.dir, "metrics.jsonl"), "a")
        if log.wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError("logging.wandb_project is set but wandb is not installed: pip install wandb") from e
            self._wandb = wandb.init(project=log.wandb_project, name=cfg.name)
        if log.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=cfg.train_steps, initial=start_step, desc=cfg.name, unit="step", dynamic_ncols=True)

    def log_step(self, step: int, metrics: Dict[str, float]) -> None:
        if not self.active:
            return
        self.history.append({"step": step, **metrics})
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self._jsonl.flush()
        for k, v in metrics.items():
            if self._tb is not None:
                self._tb.add_scalar(f"train/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in metrics.items()}, step=step)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", kl=f"{metrics.get('kl', float('nan')):.3f}")
        if step % max(1, self.cfg.logging.log_interval) == 0:
            line = " | ".join(f"{k} {metrics[k]:{fmt}}" for k, fmt in _SHOWN.items() if k in metrics)
            self._write(f"step {step:>5} | {line}")

    def log_validation(self, step: int, metrics: Dict[str, float]) -> None:
        if not self.active:
            return
        self.valid_history.append({"step": step, **metrics})
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"valid/{k}", v, step)
        self._write(f"step {step:>5} | validation | " + " | ".join(f"{k} {v:.5f}" for k, v in metrics.items()))

    def info(self, text: str) -> None:
        if self.active:
            self._write(text)

    def warn(self, text: str) -> None:
        """A problem the user must see (non-finite steps): on the console and in the TensorBoard text log."""
        if self.active:
            self._write(f"WARNING: {text}")
            if self._tb is not None:
                self._tb.add_text("warnings", text)

    def _write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> Optional[str]:
        """Flush everything; print the summary table; write the curves PNG. Returns the PNG path, if any."""
        if not self.active:
            return None
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._print_table()
        if self.cfg.logging.plot and self.cfg.logging.dir and self.history:
            return self._plot(os.path.join(self.cfg.logging.dir, "curves.png"))
        return None

    def _print_table(self) -> None:
        if not self.history:
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{self.cfg.name}: first / last logged step")
        table.add_column("metric")
        first, last = self.history[0], self.history[-1]
        table.add_column(f"step {first['step']}", justify="right")
        table.add_column(f"step {last['step']}", justify="right")
        for k, fmt in _SHOWN.items():
            if k in first or k in last:  # a metric without data on a step (no negatives) shows "-", never 0
                table.add_row(k, *(f"{h[k]:{fmt}}" if k in h else "-" for h in (first, last)))
        Console().print(table)

    def _plot(self, path: str) -> str:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        def curve(key):
            # Steps without data for `key` (e.g. no negative trajectory in the batch) are gaps, not zeros.
            pts = [(h["step"], h[key]) for h in self.history if key in h]
            return [p[0] for p in pts], [p[1] for p in pts]

        fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
        axes[0].plot(*curve("loss"), label="train loss")
        if self.valid_history:
            axes[0].plot([v["step"] for v in self.valid_history], [v["loss"] for v in self.valid_history], "o-",
                         label="validation loss")
        axes[0].set_title("loss")
        axes[0].legend()
        axes[1].plot(*curve("logprob_pos"), ".-", label="positive trajectories", color="tab:green")
        axes[1].plot(*curve("logprob_neg"), ".-", label="negative trajectories", color="tab:red")
        axes[1].set_title("mean per-token log-prob")
        axes[1].legend()
        axes[2].plot(*curve("kl"), label="KL (k3)")
        axes[2].plot(*curve("clip_frac"), label="clip fraction")
        axes[2].set_title("KL / clip")
        axes[2].legend()
        for ax in axes:
            ax.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
