"""The preprocessing pipeline behind ``tools/preprocess/build_dataset.py``:
read -> label (vote) -> select -> tokenize -> write, with counted rejects at every stage, in bounded memory.

1. **Read** (main process, one streaming pass): rows are parsed, validated and spilled to disk grouped by problem
   (:mod:`.spill`); each problem's chat-template prompt is rendered here, once. Memory: a few dozen bytes per
   problem and 16 per row, whatever the input size.
2. **Label and tokenize** in the project's one process pool (:class:`~megatron_offgrpo.utils.pool.OrderedProcessPool`;
   process workers because the verifier's timeout needs a main thread, :mod:`megatron_offgrpo.rewards.equivalence`).
   A task is a chunk of whole groups named by their place in the spill; workers read the groups themselves, vote with
   the cheap paths before math-verify, and encode each group in one batch with the fast tokenizer (:mod:`.workers`).
   Without ``--num-groups`` one pass labels and tokenizes; with it, a first pass labels, the selection runs on the
   labels, and a second pass tokenizes the selected groups only (labels wait in a second spill meanwhile).
3. **Write**: results are consumed in input order and streamed into the dataset writer, so the dataset is the same
   (byte for byte) for any ``workers``.

Every dropped record -- bad row, duplicate problem id, empty response, unanswerable or low-agreement group,
over-long trajectory, too few rollouts left -- is counted and written to the rejects JSONL with its reason.

A rebuild never damages the previous result: the tokenizer is checked before anything is read or written; the
rejects JSONL is written under a temporary name and committed together with the dataset (:mod:`.atomic`), so a
build that fails or is killed leaves the previous dataset *and* its rejects file as they were. The spills are
temporaries of the output prefix, removed at the end; temporaries of earlier killed builds are removed at the start
(logged). Bad input and a bad ``--tokenizer`` raise :class:`~.records.InputError` naming the file (and line) or the
flag, and the fix.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import time
import typing
from array import array
from collections import Counter
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from megatron_offgrpo.data.atomic import kill_point, remove_stale_temps
from megatron_offgrpo.preprocess.records import InputError, RawGroup, Reject
from megatron_offgrpo.preprocess.selection import STRATEGIES, SelectionReport, load_student_pass_rates, select_groups
from megatron_offgrpo.preprocess.spill import RecordFile, SpilledGroups, read_records, spill_groups
from megatron_offgrpo.preprocess.tokenize import (
    OVERLONG_MODES,
    ChatTokenizer,
    TokenizedTrajectory,
    load_tokenizer,
    tokenizer_fingerprint,
)
from megatron_offgrpo.preprocess.workers import GroupResult, init_worker, process_chunk, unpack_chunk
from megatron_offgrpo.rewards.equivalence import VerifierCounters
from megatron_offgrpo.rewards.labeling import GroupLabel, LabelConfig
from megatron_offgrpo.rewards.stats import GROUP_TYPES, group_type
from megatron_offgrpo.utils.pool import OrderedProcessPool

# Work per task: whole groups, many of them, so that a worker's per-task cost (IPC, reading its spans) is small.
TASK_MAX_GROUPS = 64
TASK_MAX_RESPONSES = 4096


def _arg(default: Any = MISSING, help: str = "", flag: Optional[str] = None, **argparse_kwargs: Any) -> Any:
    """A :class:`BuildConfig` field with its command-line flag: written once, read by :func:`add_build_arguments`."""
    meta = {"help": help, "flag": flag, "argparse": argparse_kwargs}
    return field(metadata=meta) if default is MISSING else field(default=default, metadata=meta)


@dataclass
class BuildConfig:
    """Arguments of a dataset build (recorded verbatim in the manifest, less ``progress``). Each field is also a
    flag of ``tools/preprocess/build_dataset.py`` (:func:`add_build_arguments`): ``--<field-name>`` unless the
    metadata names another flag."""

    inputs: List[str] = _arg(help="JSONL / Parquet files or datasets directories", flag="--input")
    tokenizer: str = _arg(help="local HF tokenizer path (with a chat template)")
    output_prefix: str = _arg(help="dataset prefix P (writes P.bin, P.idx, P.json, ...)")
    max_seq_len: int = _arg(16384, "maximum tokens per sequence (prompt + response + EOS)")
    overlong: str = _arg("reject", "what to do with a longer trajectory: reject it or truncate its response",
                         choices=OVERLONG_MODES)
    domain: Optional[str] = _arg(None, "keep only rows of this domain (e.g. math)")
    min_agreement: float = _arg(0.5, "min winning-cluster fraction of K")
    label_source: str = _arg("vote", "reward against the majority vote or the rows' 'answer' field",
                             choices=("vote", "reference"))
    verify_timeout_s: float = _arg(5.0, "seconds per math-verify parse/verify", flag="--verify-timeout")
    num_groups: Optional[int] = _arg(None, "keep this many groups (default: all)")
    strategy: str = _arg("uniform", "how --num-groups are chosen", choices=STRATEGIES)
    student_pass_rates: Optional[str] = _arg(None, "JSONL {problem_id|problem, pass_rate}")
    seed: int = _arg(0, "seed of the selection")
    min_rollouts: int = _arg(2, "drop groups with fewer trajectories left")
    workers: int = _arg(1, "labelling / tokenizing processes")
    strict: bool = _arg(False, "stop at the first bad input row instead of rejecting it")
    rejects_path: Optional[str] = _arg(None, "rejects JSONL (default: P.rejects.jsonl)", flag="--rejects")
    teacher: Optional[str] = _arg(None, "model that wrote the rollouts (recorded in the manifest)")
    spill_dir: Optional[str] = _arg(None, "directory of the temporary spill, about the size of the accepted input "
                                          "(default: the output's directory)")
    progress: bool = _arg(True, "progress bars", flag="--no-progress")


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per :class:`BuildConfig` field: type, default, choices and help all come from the field.

    ``List[...]`` fields take one or more values; a boolean that defaults to False is a switch, one that defaults to
    True is turned off by its ``--no-...`` flag.
    """
    hints = typing.get_type_hints(BuildConfig)
    for f in fields(BuildConfig):
        meta = f.metadata
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        kwargs: Dict[str, Any] = {"dest": f.name, **meta.get("argparse", {})}
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        origin = typing.get_origin(tp)
        help_text = meta.get("help", "")
        if tp is bool:
            kwargs["action"] = "store_false" if f.default is True else "store_true"
        elif origin in (list, List):
            kwargs.update(nargs="+", type=args[0])
        else:
            kwargs["type"] = args[0] if origin is typing.Union else tp
        if tp is not bool and "choices" not in kwargs:
            kwargs.setdefault("metavar", flag.lstrip("-").replace("-", "_").upper())
        if f.default is MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
            if tp is not bool and f.default is not None:
                help_text += " (default: %(default)s)"
        parser.add_argument(flag, help=help_text, **kwargs)


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    """The :class:`BuildConfig` of parsed :func:`add_build_arguments` flags."""
    return BuildConfig(**{f.name: getattr(args, f.name) for f in fields(BuildConfig)})


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
    # wall seconds of: read (spill), process (label, select, tokenize, write), commit
    phase_seconds: Dict[str, float] = field(default_factory=dict)


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


def _spill_stem(cfg: BuildConfig) -> str:
    """Name stem of the build's spills: beside the output prefix, or in ``--spill-dir``."""
    if cfg.spill_dir is None:
        return cfg.output_prefix
    return os.path.join(cfg.spill_dir, os.path.basename(cfg.output_prefix))


def _remove_files(*paths: str) -> None:
    for path in paths:
        if os.path.lexists(path):
            os.remove(path)


def _chunk_sizes(num_groups: int, workers: int) -> Tuple[int, int]:
    """Groups and responses per task: large, yet at least ~4 tasks per worker so that the work is balanced."""
    per_task = max(1, min(TASK_MAX_GROUPS, math.ceil(num_groups / (4 * max(1, workers)))))
    return per_task, TASK_MAX_RESPONSES


class _Stage:
    """Feeds chunks of groups to the pool and yields each group's result in input order, with a progress bar."""

    def __init__(self, pool: OrderedProcessPool, spilled: SpilledGroups, workers: int, show: bool) -> None:
        self.pool, self.spilled, self.workers, self.show = pool, spilled, workers, show

    def run(self, mode: str, gids: List[int], desc: str) -> Iterator[GroupResult]:
        max_groups, max_responses = _chunk_sizes(len(gids), self.workers)
        tasks = ((mode, chunk) for chunk in self.spilled.chunks(gids, max_groups, max_responses))
        with tqdm(total=len(gids), desc=desc, unit="group", disable=not self.show) as bar:
            for chunk in self.pool.imap(process_chunk, tasks):
                results = unpack_chunk(chunk)
                bar.update(len(results))
                yield from results


def build_dataset(cfg: BuildConfig) -> BuildResult:
    """Run the whole pipeline for ``cfg``; commits ``cfg.output_prefix`` and the rejects JSONL together, atomically.

    Raises :class:`InputError` (nothing at the output changed) for a bad ``--tokenizer``, a missing / empty /
    unreadable input file, a bad row in strict mode, or when no record survives.
    """
    t0 = time.time()
    label_cfg = LabelConfig(cfg.min_agreement, cfg.verify_timeout_s, cfg.label_source)
    rejects_path = cfg.rejects_path or cfg.output_prefix + ".rejects.jsonl"
    stem = _spill_stem(cfg)
    spill_path = f"{stem}.tmp{os.getpid()}.spill"
    labels_path = f"{stem}.tmp{os.getpid()}.labels"
    encoder_path = f"{stem}.tmp{os.getpid()}.encoder"  # the tokenizer's state, for the workers
    # The workers start first, so that their start-up overlaps loading the tokenizer and the read pass; they read
    # the tokenizer and the spill once written. (Nothing is written before the tokenizer is checked.)
    pool = OrderedProcessPool(cfg.workers, init_worker, (spill_path, label_cfg, encoder_path))
    try:
        # 0. the tokenizer, before reading what may be hours of input
        chat = check_tokenizer(cfg.tokenizer, cfg.max_seq_len, cfg.overlong)
        tokenizer = chat.tokenizer
        os.makedirs(os.path.dirname(os.path.abspath(rejects_path)), exist_ok=True)
        os.makedirs(os.path.dirname(os.path.abspath(cfg.output_prefix)), exist_ok=True)
        os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
        stale_removed = remove_stale_temps(cfg.output_prefix,
                                           [rejects_path] + ([stem] if stem != cfg.output_prefix else []))
        reject_counts: Counter = Counter()
        # The previous rejects file stays in place until the dataset it belongs to is replaced (same commit).
        rejects_tmp = f"{rejects_path}.tmp{os.getpid()}"
        rej_file = open(rejects_tmp, "w", encoding="utf-8")
    except BaseException:
        pool.terminate()
        raise

    committed = False

    def on_reject(r: Reject) -> None:
        reject_counts[f"{r.stage}:{r.reason}"] += 1
        rej_file.write(json.dumps(r.as_dict(), ensure_ascii=False) + "\n")

    try:
        with open(encoder_path, "wb") as f:
            pickle.dump(chat.encoder_state(), f, protocol=pickle.HIGHEST_PROTOCOL)
        # 1. read (rows are counted here, not by the progress bar, which counts nothing when disabled)
        with tqdm(desc="read rows", unit="row", disable=not cfg.progress) as bar:
            spilled = spill_groups(cfg.inputs, spill_path, cfg.domain, cfg.strict, on_reject, progress=bar.update,
                                   prompt_fn=chat.prompt_text, pool=pool)
        rows_read = spilled.table.rows
        t_read = time.time()
        kill_point("build:read")
        if not spilled.kept:
            raise InputError(
                f"{', '.join(cfg.inputs)}: no usable records: all {rows_read} rows were rejected "
                f"({_reject_summary(reject_counts)}); nothing was written; fix the input (--strict stops at the "
                "first bad row and names it)"
            )
        rates_by_id = load_student_pass_rates(cfg.student_pass_rates) if cfg.student_pass_rates else None
        verifier = VerifierCounters()
        agreements: List[float] = []
        fractions: List[float] = []
        rates: Optional[List[Optional[float]]] = [] if rates_by_id is not None else None

        def take_label(res: GroupResult) -> bool:
            """Count a labelled group; record it for the selection when kept (else reject it)."""
            lab = res.label
            assert lab is not None
            verifier.merge(lab.counters)
            if lab.reject_reason is not None:
                on_reject(Reject("label", lab.reject_reason, detail=f"agreement={lab.stats.agreement:.3f} "
                                 f"distinct={lab.stats.num_distinct} no_answer={lab.stats.num_no_answer}",
                                 problem_id=res.header.problem_id))
                return False
            agreements.append(lab.stats.agreement)
            fractions.append(lab.stats.fraction_positive)
            if rates is not None:
                rates.append(rates_by_id.get(res.header.problem_id))
            return True

        from megatron_offgrpo.data.writer import TrajectoryDatasetWriter  # Megatron-Core: only once input is read

        out = _Output(cfg, on_reject, reject_counts)
        with pool:
            stage = _Stage(pool, spilled, cfg.workers, cfg.progress)
            if cfg.num_groups is None:
                # 2+4. one pass: label, tokenize what is kept, write as results arrive
                with TrajectoryDatasetWriter(cfg.output_prefix, len(tokenizer)) as writer:
                    for res in stage.run("label", spilled.kept, "label + tokenize"):
                        if take_label(res):
                            out.write_group(writer, res.header, res.label, res.tokens,
                                            rates[-1] if rates is not None else None)
                    _, sel_report = select_groups(agreements, fractions, None, cfg.strategy, cfg.seed, rates)
                    _remove_files(spill_path, labels_path, encoder_path)  # read in full: gone before the commit starts
                    t_processed = time.time()
                    manifest = out.commit(writer, chat, rejects_tmp, rejects_path, rej_file, verifier,
                                          not_selected=0)
                    committed = True
                not_selected = 0
            else:
                # 2. label every group; the labels of the kept ones wait in a spill for the selection
                label_file = RecordFile(labels_path)
                kept_gids: List[int] = []
                label_spans = array("q")
                try:
                    for res in stage.run("label_only", spilled.kept, "label groups"):
                        if take_label(res):
                            kept_gids.append(res.group)
                            label_spans.extend(label_file.append((res.header, res.label)))
                finally:
                    label_file.close()
                # 3. select
                chosen, sel_report = select_groups(agreements, fractions, cfg.num_groups, cfg.strategy, cfg.seed, rates)
                not_selected = len(kept_gids) - len(chosen)
                # 4. tokenize the selected groups, 5. write
                with TrajectoryDatasetWriter(cfg.output_prefix, len(tokenizer)) as writer:
                    sel_gids = [kept_gids[i] for i in chosen]
                    results = stage.run("tokenize", sel_gids, "tokenize")
                    for i, res in zip(chosen, results):
                        header, lab = read_records(labels_path, [(label_spans[2 * i], label_spans[2 * i + 1])])[0]
                        out.write_group(writer, header, lab, res.tokens, rates[i] if rates is not None else None)
                    _remove_files(spill_path, labels_path, encoder_path)
                    t_processed = time.time()
                    manifest = out.commit(writer, chat, rejects_tmp, rejects_path, rej_file, verifier, not_selected)
                    committed = True
    finally:
        pool.terminate()  # a no-op after a normal end (the with block closed it)
        rej_file.close()
        if not committed and os.path.lexists(rejects_tmp):
            os.remove(rejects_tmp)
        _remove_files(spill_path, labels_path, encoder_path)

    return BuildResult(
        manifest=manifest,
        rows_read=rows_read,
        groups_in=len(spilled.kept),
        groups_out=manifest["counts"]["groups"],
        trajectories_in=sum(spilled.responses(g) for g in spilled.kept),
        trajectories_out=out.traj_out,
        rejects=dict(sorted(reject_counts.items())),
        group_types={t: out.gtypes.get(t, 0) for t in GROUP_TYPES},
        not_selected=not_selected,
        selection=sel_report,
        vote_accuracy=None if out.accuracy[1] == 0 else (out.accuracy[0], out.accuracy[1]),
        verifier=verifier.as_dict(),
        seq_lens=np.frombuffer(out.seq_lens, dtype=np.int64).copy(),
        prompt_lens=np.frombuffer(out.prompt_lens, dtype=np.int64).copy(),
        response_lens=np.frombuffer(out.seq_lens, dtype=np.int64) - np.frombuffer(out.prompt_lens, dtype=np.int64),
        student_pass_rates=out.rates,
        all_positive_flags=out.all_pos,
        seconds=time.time() - t0,
        rejects_path=rejects_path,
        duplicate_problem_ids=reject_counts.get("read:duplicate_problem_id", 0),
        stale_removed=stale_removed,
        phase_seconds={"read": t_read - t0, "process": t_processed - t_read, "commit": time.time() - t_processed},
    )


class _Output:
    """The write side of a build: groups into the writer, per-trajectory rejects, statistics, the commit."""

    def __init__(self, cfg: BuildConfig, on_reject: Any, reject_counts: Counter) -> None:
        self.cfg, self.on_reject, self.reject_counts = cfg, on_reject, reject_counts
        self.gtypes: Counter = Counter()
        self.accuracy = [0, 0]
        self.rates: List[Optional[float]] = []
        self.all_pos: List[bool] = []
        self.traj_out = 0
        self.seq_lens, self.prompt_lens = array("q"), array("q")

    def write_group(self, writer: Any, g: RawGroup, lab: GroupLabel, trajs: List[TokenizedTrajectory],
                    rate: Optional[float]) -> None:
        from megatron_offgrpo.data.writer import SequenceRecord

        seqs: List[SequenceRecord] = []
        for i, tt in enumerate(trajs):
            if tt.tokens is None:
                file, _, line = g.origins[i].rpartition(":")
                self.on_reject(Reject("tokenize", tt.reject_reason or "?", file, int(line), None, tt.detail,
                                      g.problem_id, i))
                continue
            seqs.append(SequenceRecord(tt.tokens, tt.prompt_len, lab.rewards[i], i, lab.answers[i], tt.truncated))
        if len(seqs) < self.cfg.min_rollouts:
            self.on_reject(Reject("tokenize", "too_few_rollouts", detail=f"{len(seqs)} left < min_rollouts "
                                  f"{self.cfg.min_rollouts}", problem_id=g.problem_id))
            return
        rewards = [s.reward for s in seqs]
        gtype = group_type(rewards)
        self.gtypes[gtype] += 1
        if lab.reference_match is not None:
            self.accuracy[0] += int(lab.reference_match)
            self.accuracy[1] += 1
        self.rates.append(rate)
        self.all_pos.append(gtype == "all_positive")
        meta = {
            "problem_id": g.problem_id, "problem": g.problem, "source": g.source, "domain": g.domain,
            "label": lab.label, "reference": g.reference, "reference_match": lab.reference_match,
            "agreement": lab.stats.agreement, "num_distinct": lab.stats.num_distinct,
            "num_no_answer": lab.stats.num_no_answer,
            "fraction_positive": float(np.mean([r > 0 for r in rewards])),
            "all_positive": gtype == "all_positive", "group_type": gtype, "k_input": len(g.origins),
            "student_pass_rate": rate,
        }
        writer.add_group(meta, seqs)
        self.traj_out += len(seqs)
        for s in seqs:
            self.seq_lens.append(len(s.tokens))
            self.prompt_lens.append(s.prompt_len)

    def commit(self, writer: Any, chat: ChatTokenizer, rejects_tmp: str, rejects_path: str, rej_file: Any,
               verifier: VerifierCounters, not_selected: int) -> Dict[str, Any]:
        cfg = self.cfg
        if writer.num_sequences == 0:
            raise InputError(
                f"{', '.join(cfg.inputs)}: no trajectory survived ({_reject_summary(self.reject_counts)}); nothing "
                "was written; relax --min-agreement / --max-seq-len / --min-rollouts or fix the input"
            )
        config_dict = asdict(cfg)
        config_dict.pop("progress")
        rej_file.close()
        kill_point("build:written")
        return writer.commit({
            "tokenizer": tokenizer_fingerprint(chat.tokenizer),
            "sources": [{"path": os.path.abspath(p), "sha256": _sha256(p)} for p in cfg.inputs],
            "preprocess_args": config_dict,
            "teacher": {"model": cfg.teacher},
            "statistics": {
                "group_types": {t: self.gtypes.get(t, 0) for t in GROUP_TYPES},
                "rejects": dict(sorted(self.reject_counts.items())),
                "vote_accuracy": None if self.accuracy[1] == 0 else self.accuracy[0] / self.accuracy[1],
                "verifier": verifier.as_dict(),
                "not_selected": not_selected,
            },
        }, extra_moves=[(rejects_tmp, rejects_path)])
