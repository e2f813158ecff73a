"""The preprocessing pipeline behind ``tools/preprocess/build_dataset.py``:
read -> label (vote) -> select -> tokenize -> write, with counted rejects at every stage.

Labelling and tokenization run in one pool of *process* workers (the verifier's timeout needs a main thread, see
:mod:`megatron_offgrpo.rewards.equivalence`); results are consumed in input order, so the dataset written is the
same for any ``workers``. Every dropped record -- bad row, duplicate problem id, empty response, unanswerable or
low-agreement group, over-long trajectory, too few rollouts left -- is counted and written to the rejects JSONL
with its reason.

A rebuild never damages the previous result: the tokenizer is checked before anything is read or written; the
rejects JSONL is written under a temporary name and committed together with the dataset (:mod:`.atomic`), so a
build that fails or is killed leaves the previous dataset *and* its rejects file as they were. Temporaries of
earlier killed builds are removed at the start (logged). Bad input and a bad ``--tokenizer`` raise
:class:`~.records.InputError` naming the file (and line) or the flag, and the fix.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from megatron_offgrpo.data.atomic import kill_point, remove_stale_temps
from megatron_offgrpo.preprocess.readers import read_groups
from megatron_offgrpo.preprocess.records import InputError, RawGroup, Reject
from megatron_offgrpo.preprocess.selection import SelectionReport, load_student_pass_rates, select_groups
from megatron_offgrpo.preprocess.tokenize import ChatTokenizer, TokenizedTrajectory, load_tokenizer, tokenizer_fingerprint
from megatron_offgrpo.rewards.equivalence import VerifierCounters
from megatron_offgrpo.rewards.labeling import GroupLabel, LabelConfig, label_group
from megatron_offgrpo.rewards.stats import GROUP_TYPES, group_type


@dataclass
class BuildConfig:
    """Arguments of a dataset build (recorded verbatim in the manifest)."""

    inputs: List[str]
    tokenizer: str
    output_prefix: str
    max_seq_len: int = 16384
    overlong: str = "reject"
    domain: Optional[str] = None
    min_agreement: float = 0.5
    label_source: str = "vote"
    verify_timeout_s: float = 5.0
    num_groups: Optional[int] = None
    strategy: str = "uniform"
    student_pass_rates: Optional[str] = None
    seed: int = 0
    min_rollouts: int = 2
    workers: int = 1
    strict: bool = False
    rejects_path: Optional[str] = None
    teacher: Optional[str] = None
    progress: bool = True


@dataclass
class BuildResult:
    """What happened, for the summary table, the stats plot and the tests."""

    manifest: Dict[str, Any]
    rows_read: int
    groups_in: int
    groups_out: int
    trajectories_in: int
    trajectories_out: int
    rejects: Dict[str, int]
    group_types: Dict[str, int]
    not_selected: int
    selection: SelectionReport
    vote_accuracy: Optional[Tuple[int, int]]
    verifier: Dict[str, int]
    seq_lens: np.ndarray
    prompt_lens: np.ndarray
    response_lens: np.ndarray
    student_pass_rates: List[Optional[float]] = field(default_factory=list)  # per written group
    all_positive_flags: List[bool] = field(default_factory=list)
    seconds: float = 0.0
    rejects_path: str = ""
    duplicate_problem_ids: int = 0  # rows rejected because their problem_id belongs to another problem text
    stale_removed: List[str] = field(default_factory=list)  # temporaries of killed builds removed at the start


# ---- worker side (module level so that spawn can pickle the tasks) ----
_STATE: Dict[str, Any] = {}


def _init_worker(label_cfg: LabelConfig, tokenizer_path: str, max_seq_len: int, overlong: str) -> None:
    _STATE["label"] = label_cfg
    _STATE["chat"] = ChatTokenizer(load_tokenizer(tokenizer_path), max_seq_len, overlong)


def _task(item: Tuple[str, Any]) -> Any:
    kind, payload = item
    if kind == "label":
        responses, reference = payload
        return label_group(responses, reference, _STATE["label"])
    problem, responses = payload
    return _STATE["chat"].tokenize_group(problem, responses)


class _Runner:
    """Runs tasks inline (workers <= 1) or in a spawn process pool, always returning results in order."""

    def __init__(self, workers: int, initargs: tuple) -> None:
        self.pool = None
        if workers > 1:
            self.pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=initargs)
        else:
            _init_worker(*initargs)

    def map(self, items: Sequence[Tuple[str, Any]], desc: str, show: bool) -> List[Any]:
        it = self.pool.imap(_task, items, chunksize=max(1, min(16, len(items) // 64 or 1))) if self.pool else map(_task, items)
        return list(tqdm(it, total=len(items), desc=desc, disable=not show, unit="group"))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


def _sha256(path: str) -> str:
    from megatron_offgrpo.data.format import sha256_file

    return sha256_file(path) if os.path.isfile(path) else "directory"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def check_tokenizer(path: str, max_seq_len: int, overlong: str) -> ChatTokenizer:
    """Load ``--tokenizer`` as the build will use it, or raise :class:`InputError` naming the path and the flag.

    A path that does not exist is reported as such (transformers would call it an invalid hub repo id); a hub
    name is accepted only when it is in the local Hugging Face cache, as nothing is downloaded at build time.
    """
    try:
        tokenizer = load_tokenizer(path)
    except Exception as e:  # noqa: BLE001 - every way of failing gets the same clear verdict
        if os.path.exists(path):
            raise InputError(
                f"--tokenizer {path}: cannot load a tokenizer from it ({_first_line(e)}); pass a directory written "
                "by tokenizer.save_pretrained (tokenizer.json / tokenizer_config.json)"
            ) from None
        raise InputError(
            f"--tokenizer {path}: no such file or directory, and not a model name in the local Hugging Face cache "
            "(nothing is downloaded at build time); pass the path of a local tokenizer directory"
        ) from None
    try:
        return ChatTokenizer(tokenizer, max_seq_len, overlong)
    except ValueError as e:
        raise InputError(f"--tokenizer {path}: {e}; use a tokenizer with a chat template and an EOS token") from None


def _reject_summary(counts: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "no rejects"


def build_dataset(cfg: BuildConfig) -> BuildResult:
    """Run the whole pipeline for ``cfg``; commits ``cfg.output_prefix`` and the rejects JSONL together, atomically.

    Raises :class:`InputError` (nothing at the output changed) for a bad ``--tokenizer``, a missing / empty /
    unreadable input file, a bad row in strict mode, or when no record survives.
    """
    t0 = time.time()
    label_cfg = LabelConfig(cfg.min_agreement, cfg.verify_timeout_s, cfg.label_source)
    rejects_path = cfg.rejects_path or cfg.output_prefix + ".rejects.jsonl"
    # 0. the tokenizer, before reading what may be hours of input (and before spawning workers)
    chat_probe = check_tokenizer(cfg.tokenizer, cfg.max_seq_len, cfg.overlong)
    tokenizer = chat_probe.tokenizer
    os.makedirs(os.path.dirname(os.path.abspath(rejects_path)), exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(cfg.output_prefix)), exist_ok=True)
    stale_removed = remove_stale_temps(cfg.output_prefix, [rejects_path])
    reject_counts: Counter = Counter()
    # The previous rejects file stays in place until the dataset it belongs to is replaced (same commit).
    rejects_tmp = f"{rejects_path}.tmp{os.getpid()}"
    rej_file = open(rejects_tmp, "w", encoding="utf-8")
    committed = False

    def on_reject(r: Reject) -> None:
        reject_counts[f"{r.stage}:{r.reason}"] += 1
        rej_file.write(json.dumps(r.as_dict(), ensure_ascii=False) + "\n")

    try:
        # 1. read (rows are counted here, not by the progress bar, which counts nothing when disabled)
        bar = tqdm(desc="read rows", unit="row", disable=not cfg.progress)
        rows_read = 0

        def on_row(k: int) -> None:
            nonlocal rows_read
            rows_read += k
            bar.update(k)

        groups: List[RawGroup] = read_groups(cfg.inputs, cfg.domain, cfg.strict, on_reject, progress=on_row)
        bar.close()
        kill_point("build:read")
        if not groups:
            raise InputError(
                f"{', '.join(cfg.inputs)}: no usable records: all {rows_read} rows were rejected "
                f"({_reject_summary(reject_counts)}); nothing was written; fix the input (--strict stops at the "
                "first bad row and names it)"
            )
        runner = _Runner(cfg.workers, (label_cfg, cfg.tokenizer, cfg.max_seq_len, cfg.overlong))
        try:
            # 2. label
            labels: List[GroupLabel] = runner.map(
                [("label", (g.responses, g.reference)) for g in groups], "label groups", cfg.progress
            )
            verifier = VerifierCounters()
            kept: List[Tuple[RawGroup, GroupLabel]] = []
            for g, lab in zip(groups, labels):
                verifier.merge(lab.counters)
                if lab.reject_reason is not None:
                    on_reject(Reject("label", lab.reject_reason, detail=f"agreement={lab.stats.agreement:.3f} "
                                     f"distinct={lab.stats.num_distinct} no_answer={lab.stats.num_no_answer}",
                                     problem_id=g.problem_id))
                else:
                    kept.append((g, lab))

            # 3. select
            rates_by_id = load_student_pass_rates(cfg.student_pass_rates) if cfg.student_pass_rates else None
            rates = [rates_by_id.get(g.problem_id) for g, _ in kept] if rates_by_id is not None else None
            chosen, sel_report = select_groups(
                [lab.stats.agreement for _, lab in kept], [lab.stats.fraction_positive for _, lab in kept],
                cfg.num_groups, cfg.strategy, cfg.seed, rates,
            )
            not_selected = len(kept) - len(chosen)
            selected = [kept[i] for i in chosen]
            sel_rates = [rates[i] for i in chosen] if rates is not None else [None] * len(chosen)

            # 4. tokenize
            toks: List[Tuple[List[int], List[TokenizedTrajectory]]] = runner.map(
                [("tokenize", (g.problem, g.responses)) for g, _ in selected], "tokenize", cfg.progress
            )
        finally:
            runner.close()

        # 5. write (Megatron-Core is imported only now, so bad input fails fast)
        from megatron_offgrpo.data.writer import SequenceRecord, TrajectoryDatasetWriter

        arrays_seq: Dict[str, List[int]] = {"seq": [], "prompt": [], "response": []}
        gtypes: Counter = Counter()
        accuracy = [0, 0]
        out_rates: List[Optional[float]] = []
        all_pos: List[bool] = []
        traj_out = 0
        kill_point("build:tokenized")
        with TrajectoryDatasetWriter(cfg.output_prefix, len(tokenizer)) as writer:
            for (g, lab), (_, trajs), rate in tqdm(
                list(zip(selected, toks, sel_rates)), desc="write", unit="group", disable=not cfg.progress
            ):
                seqs: List[SequenceRecord] = []
                for i, tt in enumerate(trajs):
                    if tt.tokens is None:
                        file, _, line = g.origins[i].rpartition(":")
                        on_reject(Reject("tokenize", tt.reject_reason or "?", file, int(line), None, tt.detail,
                                         g.problem_id, i))
                        continue
                    seqs.append(SequenceRecord(tt.tokens, tt.prompt_len, lab.rewards[i], i, lab.answers[i], tt.truncated))
                if len(seqs) < cfg.min_rollouts:
                    on_reject(Reject("tokenize", "too_few_rollouts", detail=f"{len(seqs)} left < min_rollouts "
                                     f"{cfg.min_rollouts}", problem_id=g.problem_id))
                    continue
                rewards = [s.reward for s in seqs]
                gtype = group_type(rewards)
                gtypes[gtype] += 1
                if lab.reference_match is not None:
                    accuracy[0] += int(lab.reference_match)
                    accuracy[1] += 1
                out_rates.append(rate)
                all_pos.append(gtype == "all_positive")
                meta = {
                    "problem_id": g.problem_id, "problem": g.problem, "source": g.source, "domain": g.domain,
                    "label": lab.label, "reference": g.reference, "reference_match": lab.reference_match,
                    "agreement": lab.stats.agreement, "num_distinct": lab.stats.num_distinct,
                    "num_no_answer": lab.stats.num_no_answer,
                    "fraction_positive": float(np.mean([r > 0 for r in rewards])),
                    "all_positive": gtype == "all_positive", "group_type": gtype, "k_input": len(g.responses),
                    "student_pass_rate": rate,
                }
                writer.add_group(meta, seqs)
                traj_out += len(seqs)
                for s in seqs:
                    arrays_seq["seq"].append(len(s.tokens))
                    arrays_seq["prompt"].append(s.prompt_len)
                    arrays_seq["response"].append(len(s.tokens) - s.prompt_len)
            if writer.num_sequences == 0:
                raise InputError(
                    f"{', '.join(cfg.inputs)}: no trajectory survived ({_reject_summary(reject_counts)}); nothing was "
                    "written; relax --min-agreement / --max-seq-len / --min-rollouts or fix the input"
                )
            config_dict = asdict(cfg)
            config_dict.pop("progress")
            rej_file.close()
            kill_point("build:written")
            manifest = writer.commit({
                "tokenizer": tokenizer_fingerprint(chat_probe.tokenizer),
                "sources": [{"path": os.path.abspath(p), "sha256": _sha256(p)} for p in cfg.inputs],
                "preprocess_args": config_dict,
                "teacher": {"model": cfg.teacher},
                "statistics": {
                    "group_types": {t: gtypes.get(t, 0) for t in GROUP_TYPES},
                    "rejects": dict(sorted(reject_counts.items())),
                    "vote_accuracy": None if accuracy[1] == 0 else accuracy[0] / accuracy[1],
                    "verifier": verifier.as_dict(),
                    "not_selected": not_selected,
                },
            }, extra_moves=[(rejects_tmp, rejects_path)])
            committed = True
    finally:
        rej_file.close()
        if not committed and os.path.lexists(rejects_tmp):
            os.remove(rejects_tmp)

    return BuildResult(
        manifest=manifest,
        rows_read=rows_read,
        groups_in=len(groups),
        groups_out=manifest["counts"]["groups"],
        trajectories_in=sum(len(g.responses) for g in groups),
        trajectories_out=traj_out,
        rejects=dict(sorted(reject_counts.items())),
        group_types={t: gtypes.get(t, 0) for t in GROUP_TYPES},
        not_selected=not_selected,
        selection=sel_report,
        vote_accuracy=None if accuracy[1] == 0 else (accuracy[0], accuracy[1]),
        verifier=verifier.as_dict(),
        seq_lens=np.asarray(arrays_seq["seq"]),
        prompt_lens=np.asarray(arrays_seq["prompt"]),
        response_lens=np.asarray(arrays_seq["response"]),
        student_pass_rates=out_rates,
        all_positive_flags=all_pos,
        seconds=time.time() - t0,
        rejects_path=rejects_path,
        duplicate_problem_ids=reject_counts.get("read:duplicate_problem_id", 0),
        stale_removed=stale_removed,
    )
