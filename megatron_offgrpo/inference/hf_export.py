"""Resolve a model path for generation: an HF directory as is, a Megatron checkpoint exported to HF on the fly.

Accepted paths (:func:`resolve_model`):

* a Hugging Face model directory (``config.json`` + weights + tokenizer): used as is;
* a training checkpoint ``iter_NNNNNNN`` written by :mod:`megatron_offgrpo.training.checkpointing`, or the run's
  checkpoint directory itself (its ``latest`` file names the checkpoint);
* a converter output of ``tools/checkpoint/hf_to_mcore.py`` (``offgrpo_model.json`` names the HF source).

A Megatron checkpoint is exported once through the project's converter
(:func:`megatron_offgrpo.models.converter.convert_mcore_to_hf`, in a child process so that the caller's process
gets no process group and the memory of the full model is returned when it ends) into
``<work_dir>/hf_exports/<name>-<key>/``, where ``key`` hashes the checkpoint's fingerprint and the template's:
a second call with the same checkpoint reuses the export. The export is built under a temporary name and
renamed when complete (a killed export is never reused), under a lock so that two processes never export the
same checkpoint at once.

The HF template (the ``config.json``, tokenizer and chat template written next to the exported weights) is, in
order: ``hf_template`` when given; for a training checkpoint, the run's ``model.architecture`` (an HF directory,
or the ``tiny`` demo architecture, for which a Qwen3 ``config.json`` is written from
:func:`~megatron_offgrpo.models.architecture.tiny_architecture` with ``transformers``' config class); for a
converter output, the HF directory it was converted from. The tokenizer comes from the template when it has one,
else from the training dataset's manifest (``P.json`` records the tokenizer the data was templated with), else
(tiny only) the shipped ``examples/tiny_tokenizer``; when the manifest is readable, the tokenizer's vocabulary and
chat template are checked against the fingerprint it records, so generation uses the prompt format the model was
trained on.

Fingerprints: files up to 64 MiB are hashed by content; larger files (weights, ``.distcp``) by name, size and
modification time, which identifies a checkpoint without reading gigabytes (a copied checkpoint is exported again).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["ResolvedModel", "ModelResolutionError", "resolve_model", "directory_fingerprint", "default_work_dir"]

EXPORT_FORMAT_VERSION = 1  # bump when the export's content changes for the same checkpoint + template
_CONTENT_HASH_LIMIT = 64 * 1024 * 1024
_HF_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_EXPORT_DONE = "offgrpo_export.json"  # written last into a complete export
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_PATH_HELP = (
    "pass an HF model directory (config.json + *.safetensors + tokenizer), a Megatron checkpoint (a training run's "
    "iter_NNNNNNN directory or its checkpoint directory holding `latest`, or a tools/checkpoint/hf_to_mcore.py "
    "output)"
)


class ModelResolutionError(ValueError):
    """The path is not a usable model, or its HF export cannot be built; the message names the file and the fix."""


@dataclass
class ResolvedModel:
    """A model ready for generation.

    Attributes:
        hf_dir: a directory ``transformers`` and vLLM load directly (config, weights, tokenizer, chat template).
        identity: ``{"source": abs path given, "kind": "hf" | "megatron", "step": training step or None,
            "fingerprint": str}`` (plus ``hf_template`` for Megatron checkpoints): what a result was computed
            from, for summaries and resumable evaluations.
    """

    hf_dir: str
    identity: Dict[str, Any]


def default_work_dir() -> str:
    """``$OFFGRPO_WORK_DIR``, else ``~/.cache/megatron_offgrpo``: where exports are cached without a work_dir."""
    return os.environ.get("OFFGRPO_WORK_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "megatron_offgrpo")


def directory_fingerprint(path: str, exclude: Tuple[str, ...] = ()) -> str:
    """sha256 over every file under ``path`` (relative name, size; content up to 64 MiB, else mtime)."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            if rel in exclude or name == ".lock":
                continue
            st = os.stat(full)
            h.update(f"{rel}\0{st.st_size}\0".encode())
            if st.st_size <= _CONTENT_HASH_LIMIT:
                with open(full, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
            else:
                h.update(str(st.st_mtime_ns).encode())
    return h.hexdigest()


def _is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        n.endswith(_HF_WEIGHT_SUFFIXES) for n in os.listdir(path)
    )


def _has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, n)) for n in _TOKENIZER_FILES)


def _is_megatron_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ".metadata"))


def resolve_model(path: str, work_dir: Optional[str] = None, hf_template: Optional[str] = None) -> ResolvedModel:
    """An HF directory for ``path`` (see the module docstring for what is accepted and how it is exported).

    Args:
        path: HF model directory, training ``iter_N`` (or the run's checkpoint directory), converter output.
        work_dir: where Megatron exports are cached (``<work_dir>/hf_exports``); default :func:`default_work_dir`.
        hf_template: an HF directory whose ``config.json`` (and tokenizer, when it has one) describe the
            checkpoint's model; needed only when the checkpoint does not say which model it is.

    Raises :class:`ModelResolutionError` naming the path and what to pass instead, or the converter's
    :class:`~megatron_offgrpo.models.errors.CheckpointFormatError` message for a damaged checkpoint.
    """
    src = os.path.abspath(os.fspath(path))
    if not os.path.exists(src):
        raise ModelResolutionError(f"model path {src} does not exist: {_PATH_HELP}")
    if not os.path.isdir(src):
        raise ModelResolutionError(f"model path {src} is a file, not a directory: {_PATH_HELP}")
    if _is_hf_dir(src):
        if not _has_tokenizer(src):
            raise ModelResolutionError(
                f"HF model directory {src} has no tokenizer ({' / '.join(_TOKENIZER_FILES[:2])}): save the model's "
                "tokenizer into it (tokenizer.save_pretrained)"
            )
        return ResolvedModel(src, {"source": src, "kind": "hf", "step": None, "fingerprint": directory_fingerprint(src)})
    if os.path.isfile(os.path.join(src, "latest")) and not _is_megatron_checkpoint(src):
        from megatron_offgrpo.training.checkpointing import latest_checkpoint

        latest = latest_checkpoint(src)
        if latest is None:  # pragma: no cover - latest_checkpoint raises for a bad `latest`
            raise ModelResolutionError(f"{src}/latest names no checkpoint: {_PATH_HELP}")
        src = os.path.abspath(latest)
    if not _is_megatron_checkpoint(src):
        hint = ""
        if os.path.isfile(os.path.join(src, "config.json")):
            hint = " (it has config.json but no *.safetensors / *.bin weights)"
        raise ModelResolutionError(f"{src} is neither an HF model directory nor a Megatron checkpoint{hint}: {_PATH_HELP}")
    return _resolve_megatron(src, os.path.abspath(work_dir or default_work_dir()), hf_template)


# ---------------------------------------------------------------------------------------------------------------
# Megatron checkpoints


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ModelResolutionError(f"{path} is not valid JSON ({e}): the checkpoint is damaged") from None


def _find_relative(recorded: str, anchor: str) -> Optional[str]:
    """``recorded`` (a path from a training config, maybe relative to the cwd the run had) as an existing path.

    Tried: as is (absolute, or relative to the current directory), then relative to each ancestor of ``anchor``
    (a run usually starts in the directory that holds its output tree).
    """
    if os.path.isabs(recorded):
        return recorded if os.path.exists(recorded) else None
    if os.path.exists(recorded):
        return os.path.abspath(recorded)
    d = os.path.dirname(anchor)
    for _ in range(8):
        cand = os.path.join(d, recorded)
        if os.path.exists(cand):
            return os.path.abspath(cand)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    return None


def _manifest_tokenizer(train_prefix: Optional[str], ckpt: str) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """(the dataset manifest's tokenizer fingerprint, the manifest path) or (None, None) when unreadable."""
    if not train_prefix:
        return None, None
    manifest_path = _find_relative(train_prefix + ".json", ckpt)
    if manifest_path is None:
        return None, None
    manifest = _read_json(manifest_path) or {}
    tok = manifest.get("tokenizer")
    return (tok if isinstance(tok, dict) else None), manifest_path


@dataclass
class _TemplatePlan:
    """Where the export's config and tokenizer come from (all resolved to absolute paths)."""

    config_dir: Optional[str]  # an HF dir (or dir holding config.json) to copy non-weight files from
    config_dict: Optional[Dict[str, Any]]  # a config built here (tiny), when config_dir is None
    tokenizer_dir: Optional[str]  # where to load the tokenizer from when config_dir has none
    tiny: bool
    expected_tokenizer: Optional[Dict[str, Any]]  # the dataset manifest's tokenizer fingerprint
    manifest_path: Optional[str]
    description: str


def _tiny_hf_config(vocab: int, layers: int, hidden: int) -> Dict[str, Any]:
    """The HF (Qwen3) ``config.json`` of the demo's tiny architecture, written by ``transformers``' config class."""
    import transformers

    from megatron_offgrpo.models.architecture import model_config_from_hf, tiny_architecture
    from megatron_offgrpo.preprocess.tiny_tokenizer import load_tiny_tokenizer

    arch = tiny_architecture(vocab, layers, hidden)
    tok = load_tiny_tokenizer()
    cfg = transformers.Qwen3Config(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.ffn_hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_query_groups,
        head_dim=arch.head_dim,
        max_position_embeddings=arch.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": arch.rope_theta},
        rms_norm_eps=arch.norm_eps,
        tie_word_embeddings=arch.tie_word_embeddings,
        attention_bias=arch.qkv_bias,
        initializer_range=arch.initializer_range,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cfg.architectures = [arch.hf_architecture]
    d = cfg.to_dict()
    # The exporter maps weights by these fields: a config that reads back differently would mis-map silently.
    back = model_config_from_hf(d)
    for f in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "head_dim",
              "vocab_size", "max_position_embeddings", "rope_theta", "norm_eps", "tie_word_embeddings", "qkv_bias",
              "qk_norm"):  # fmt: skip
        if getattr(back, f) != getattr(arch, f):
            raise AssertionError(f"tiny HF config reads back {f}={getattr(back, f)!r}, expected {getattr(arch, f)!r}")
    return d


def _plan_template(ckpt: str, hf_template: Optional[str]) -> _TemplatePlan:
    state = _read_json(os.path.join(ckpt, "train_state.json"))
    meta = _read_json(os.path.join(ckpt, "offgrpo_model.json"))
    train_cfg: Dict[str, Any] = {}
    if state is not None and state.get("config_yaml"):
        from omegaconf import OmegaConf

        train_cfg = OmegaConf.to_container(OmegaConf.create(state["config_yaml"]), resolve=False)  # type: ignore
    model_cfg = train_cfg.get("model") or {}
    expected_tok, manifest_path = _manifest_tokenizer((train_cfg.get("data") or {}).get("train_prefix"), ckpt)
    manifest_tok_dir = None
    if expected_tok and isinstance(expected_tok.get("name_or_path"), str):
        cand = _find_relative(expected_tok["name_or_path"], manifest_path or ckpt)
        manifest_tok_dir = cand if cand and os.path.isdir(cand) and _has_tokenizer(cand) else None
    tiny = model_cfg.get("architecture") == "tiny"

    if hf_template is not None:
        t = os.path.abspath(hf_template)
        if not os.path.isfile(os.path.join(t, "config.json")):
            raise ModelResolutionError(f"hf_template {t} has no config.json: pass the HF model directory the "
                                       "checkpoint was converted from (or trained from)")  # fmt: skip
        return _TemplatePlan(t, None, manifest_tok_dir, tiny, expected_tok, manifest_path, f"hf_template {t}")
    if state is not None and model_cfg:
        arch_src = model_cfg.get("architecture")
        if tiny:
            cfg = _tiny_hf_config(int(model_cfg["tiny_vocab_size"]), int(model_cfg["tiny_num_layers"]),
                                  int(model_cfg["tiny_hidden_size"]))  # fmt: skip
            return _TemplatePlan(None, cfg, manifest_tok_dir, True, expected_tok, manifest_path,
                                 "the run's tiny architecture")  # fmt: skip
        found = _find_relative(str(arch_src), ckpt) if arch_src else None
        if found is not None:
            config_dir = found if os.path.isdir(found) else os.path.dirname(found)
            return _TemplatePlan(config_dir, None, manifest_tok_dir, False, expected_tok, manifest_path,
                                 f"the run's model.architecture {config_dir}")  # fmt: skip
        raise ModelResolutionError(
            f"{ckpt} was trained with model.architecture={arch_src!r}, which does not exist from here: pass "
            "hf_template (--hf-template) = that HF model directory"
        )
    if meta is not None and isinstance(meta.get("source"), str) and os.path.isfile(
        os.path.join(meta["source"], "config.json")
    ):
        return _TemplatePlan(meta["source"], None, None, False, None, None, f"the converter's source {meta['source']}")
    what = ("its offgrpo_model.json names no existing HF source" if meta is not None
            else "it has neither train_state.json nor offgrpo_model.json")  # fmt: skip
    raise ModelResolutionError(
        f"cannot tell which HF model {ckpt} is ({what}): pass hf_template (--hf-template) = the HF model directory "
        "it was converted from"
    )


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _build_template(plan: _TemplatePlan, out: str) -> Dict[str, Any]:
    """Write the template directory (config, tokenizer with a chat template, generation config); returns notes."""
    from megatron_offgrpo.preprocess.tiny_tokenizer import CHAT_TEMPLATE, TINY_TOKENIZER_DIR
    from megatron_offgrpo.preprocess.tokenize import tokenizer_fingerprint

    os.makedirs(out, exist_ok=True)
    if plan.config_dir is not None:
        for entry in sorted(os.listdir(plan.config_dir)):
            p = os.path.join(plan.config_dir, entry)
            if os.path.isfile(p) and not entry.endswith(_HF_WEIGHT_SUFFIXES) and not entry.endswith(".index.json"):
                shutil.copy2(p, os.path.join(out, entry))
    else:
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(plan.config_dict, f, indent=2)
    tok_src = out if _has_tokenizer(out) else plan.tokenizer_dir
    if tok_src is None and plan.tiny:
        tok_src = TINY_TOKENIZER_DIR
    if tok_src is None:
        raise ModelResolutionError(
            f"no tokenizer for the export ({plan.description} has none, and the training data's manifest names none "
            "that exists here): pass hf_template (--hf-template) = an HF directory with the model's tokenizer"
        )
    tok = _load_tokenizer(tok_src)
    if tok.chat_template is None:
        if not plan.tiny:
            raise ModelResolutionError(
                f"the tokenizer at {tok_src} has no chat template: pass hf_template with the model's tokenizer"
            )
        # The tiny tokenizer's own ChatML template: preprocess/tokenize.py templated the training data with it.
        tok.chat_template = CHAT_TEMPLATE
    tok_fp = tokenizer_fingerprint(tok)
    notes: Dict[str, Any] = {"tokenizer": tok_src, "tokenizer_sha256": tok_fp["sha256"]}
    if plan.expected_tokenizer is not None:
        match = tok_fp["sha256"] == plan.expected_tokenizer.get("sha256")
        notes["tokenizer_matches_training_data"] = match
        if not match:
            warnings.warn(
                f"the tokenizer used for generation ({tok_src}) differs in vocabulary or chat template from the one "
                f"the training data was built with ({plan.manifest_path}: {plan.expected_tokenizer.get('name_or_path')})"
                ": prompts will not look like the training prompts; pass hf_template with the training tokenizer",
                stacklevel=3,
            )
    if tok_src != out:
        tok.save_pretrained(out)
    gen_path = os.path.join(out, "generation_config.json")
    if not os.path.isfile(gen_path):
        with open(gen_path, "w") as f:
            json.dump({"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}, f, indent=2)
    return notes


def _export_in_child(ckpt: str, template: str, out: str) -> None:
    """Run :func:`convert_mcore_to_hf` in a child process; its error message comes back as ModelResolutionError."""
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as ef:
        err_file = ef.name
    try:
        cmd = [sys.executable, "-m", "megatron_offgrpo.inference.hf_export", "--ckpt", ckpt, "--template", template,
               "--out", out, "--error-file", err_file]  # fmt: skip
        env = dict(os.environ)
        env.setdefault("PYTHONWARNINGS", "ignore")  # Megatron's import-time notes about TE / Apex are noise here
        env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        rc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode
        if rc != 0:
            msg = ""
            if os.path.getsize(err_file):
                with open(err_file) as f:
                    msg = json.load(f).get("message", "")
            raise ModelResolutionError(
                f"exporting {ckpt} to HF failed (exit {rc}): {msg or 'see the output above'}"
            )
    finally:
        os.unlink(err_file)


def _resolve_megatron(ckpt: str, work_dir: str, hf_template: Optional[str]) -> ResolvedModel:
    plan = _plan_template(ckpt, hf_template)
    ckpt_fp = directory_fingerprint(ckpt)
    state = _read_json(os.path.join(ckpt, "train_state.json"))
    step = int(state["step"]) if state and isinstance(state.get("step"), int) else None
    # The template is part of the key: the same weights under another config / tokenizer are another model dir.
    if plan.config_dir is not None:
        template_fp = directory_fingerprint(plan.config_dir, exclude=tuple(
            n for n in os.listdir(plan.config_dir) if n.endswith(_HF_WEIGHT_SUFFIXES)))  # fmt: skip
    else:
        template_fp = hashlib.sha256(json.dumps(plan.config_dict, sort_keys=True).encode()).hexdigest()
    tok_fp = directory_fingerprint(plan.tokenizer_dir) if plan.tokenizer_dir else ""
    key = hashlib.sha256(f"{EXPORT_FORMAT_VERSION}\0{ckpt_fp}\0{template_fp}\0{tok_fp}".encode()).hexdigest()
    identity = {"source": ckpt, "kind": "megatron", "step": step, "fingerprint": ckpt_fp,
                "hf_template": plan.description}  # fmt: skip

    exports = os.path.join(work_dir, "hf_exports")
    os.makedirs(exports, exist_ok=True)
    final = os.path.join(exports, f"{os.path.basename(ckpt.rstrip(os.sep))}-{key[:16]}")
    with open(final + ".lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # one exporter per checkpoint; the others wait, then reuse
        done = _read_json(os.path.join(final, _EXPORT_DONE)) if os.path.isdir(final) else None
        if done is not None and done.get("key") == key:
            return ResolvedModel(final, identity)
        if os.path.isdir(final):  # incomplete (killed before the marker): rebuild
            shutil.rmtree(final)
        for entry in os.listdir(exports):  # temporaries of killed exports of this checkpoint (we hold its lock)
            if entry.startswith(os.path.basename(final) + ".tmp-"):
                shutil.rmtree(os.path.join(exports, entry), ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(final) + ".tmp-", dir=exports)
        try:
            template = os.path.join(tmp, "template")
            notes = _build_template(plan, template)
            out = os.path.join(tmp, "model")
            _export_in_child(ckpt, template, out)
            from megatron_offgrpo.data.atomic import atomic_write_json

            atomic_write_json(os.path.join(out, _EXPORT_DONE), {"key": key, "identity": identity, **notes})
            os.rename(out, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return ResolvedModel(final, identity)


def _main(argv: Optional[List[str]] = None) -> int:
    """Child-process entry of the export: convert_mcore_to_hf, errors written to --error-file as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--template", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--error-file", required=True)
    args = ap.parse_args(argv)
    try:
        from megatron_offgrpo.models.converter import convert_mcore_to_hf

        convert_mcore_to_hf(args.ckpt, args.template, args.out, progress=True)
    except Exception as e:  # noqa: BLE001 - the parent re-raises the message with the checkpoint's path
        with open(args.error_file, "w") as f:
            json.dump({"type": type(e).__name__, "message": f"{type(e).__name__}: {e}"}, f)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main())
