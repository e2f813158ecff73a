"""Damaged or incomplete checkpoint inputs: clear errors naming the file, never a deserializer traceback.

Real broken files are made from a tiny converted model: a truncated ``model.safetensors``, an HF directory
without ``config.json``, a truncated ``.distcp``, a missing / corrupt ``offgrpo_model.json``. The library raises
a :class:`CheckpointFormatError` subclass (checked in one spawned process, since loading needs Megatron's
parallel state); the three CLIs, run as a user would, print one ``error: ...`` line and exit 2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_offgrpo.utils.distributed import run_on_ranks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(REPO, "tools", "checkpoint")
VOCAB = 200


def _truncate(path: str, keep_fraction: float = 0.5) -> None:
    os.truncate(path, int(os.path.getsize(path) * keep_fraction))


def _build_inputs(root: str) -> None:
    """A tiny Qwen3 HF model and its broken variants (the Megatron ones are made after conversion)."""
    import transformers

    config = transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).save_pretrained(os.path.join(root, "hf"))

    shutil.copytree(os.path.join(root, "hf"), os.path.join(root, "hf_truncated"))
    _truncate(os.path.join(root, "hf_truncated", "model.safetensors"))

    shutil.copytree(os.path.join(root, "hf"), os.path.join(root, "hf_no_config"))
    os.remove(os.path.join(root, "hf_no_config", "config.json"))

    # Sharded with an index, one shard gone.
    sharded = os.path.join(root, "hf_missing_shard")
    os.makedirs(sharded)
    shutil.copy(os.path.join(root, "hf", "config.json"), sharded)
    tensors = load_file(os.path.join(root, "hf", "model.safetensors"))
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}  # fmt: skip
    for shard, part in halves.items():
        save_file({n: tensors[n] for n in part}, os.path.join(sharded, shard), metadata={"format": "pt"})
    with open(os.path.join(sharded, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {n: s for s, part in halves.items() for n in part}}, f)
    os.remove(os.path.join(sharded, "model-00002-of-00002.safetensors"))


def _break_checkpoint(root: str) -> str:
    """Copies of the converted checkpoint with a truncated .distcp / no or a corrupt offgrpo_model.json."""
    good = os.path.join(root, "mcore")
    distcp = sorted(f for f in os.listdir(good) if f.endswith(".distcp"))[0]
    shutil.copytree(good, os.path.join(root, "mcore_truncated"))
    _truncate(os.path.join(root, "mcore_truncated", distcp))
    shutil.copytree(good, os.path.join(root, "mcore_no_meta"))
    os.remove(os.path.join(root, "mcore_no_meta", "offgrpo_model.json"))
    shutil.copytree(good, os.path.join(root, "mcore_bad_meta"))
    with open(os.path.join(root, "mcore_bad_meta", "offgrpo_model.json"), "w") as f:
        f.write('{"architecture": {"family": "qwen3", ')  # cut off mid-write
    return distcp


def _library_worker(rank: int, world: int, root: str) -> dict:
    """Convert the good model, break copies of the result, and record what each library entry point raises."""
    from megatron_offgrpo.models import (
        CheckpointFormatError, build_gpt_model, build_transformer_config, checkpoint_padded_vocab_size,
        load_model_checkpoint, model_config_from_hf,
    )  # fmt: skip
    from megatron_offgrpo.models.converter import convert_hf_to_mcore, convert_mcore_to_hf

    hf = os.path.join(root, "hf")
    convert_hf_to_mcore(hf, os.path.join(root, "mcore"), tp=2, progress=False)
    distcp = _break_checkpoint(root)

    def outcome(fn, *args, **kwargs) -> dict:
        try:
            fn(*args, **kwargs)
        except Exception as e:  # the tests check the type, the message and the attributes
            return {"type": type(e).__name__, "msg": str(e), "path": getattr(e, "path", None),
                    "tensor": getattr(e, "tensor", None), "format_error": isinstance(e, CheckpointFormatError),
                    "os_error": isinstance(e, OSError), "value_error": isinstance(e, ValueError)}  # fmt: skip
        return {"type": None}

    def load(ckpt):
        arch = model_config_from_hf(hf)
        model = build_gpt_model(arch, build_transformer_config(arch), vocab_size=checkpoint_padded_vocab_size(ckpt),
                                backend="local")  # fmt: skip
        load_model_checkpoint(model, ckpt)

    out = lambda name: os.path.join(root, "out", name)  # noqa: E731
    return {
        "distcp": distcp,
        "load_truncated": outcome(load, os.path.join(root, "mcore_truncated")),
        "export_truncated": outcome(convert_mcore_to_hf, os.path.join(root, "mcore_truncated"), hf, out("a"),
                                    progress=False),  # fmt: skip
        "export_no_template_config": outcome(convert_mcore_to_hf, os.path.join(root, "mcore"),
                                             os.path.join(root, "hf_no_config"), out("b"), progress=False),
        "export_bad_meta": outcome(convert_mcore_to_hf, os.path.join(root, "mcore_bad_meta"), hf, out("c"),
                                   progress=False),  # fmt: skip
        "import_truncated": outcome(convert_hf_to_mcore, os.path.join(root, "hf_truncated"), out("d"), progress=False),
        "import_no_config": outcome(convert_hf_to_mcore, os.path.join(root, "hf_no_config"), out("e"), progress=False),
        "import_missing_shard": outcome(convert_hf_to_mcore, os.path.join(root, "hf_missing_shard"), out("f"),
                                        progress=False),  # fmt: skip
        "export_good": outcome(convert_mcore_to_hf, os.path.join(root, "mcore"), hf, out("g"), progress=False),
    }


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("convert_errors"))
    _build_inputs(root)
    result = run_on_ranks(_library_worker, 1, root)[0]
    return {"root": root, **result}


# ----------------------------------------------------------------------------------------------------------
# Library


def test_truncated_distcp_load_names_the_file(broken):
    path = os.path.join(broken["root"], "mcore_truncated", broken["distcp"])
    for key in ("load_truncated", "export_truncated"):
        r = broken[key]
        assert r["type"] == "TruncatedCheckpointFileError" and r["format_error"], (key, r)
        assert r["path"] == path and path in r["msg"] and "truncated" in r["msg"], (key, r)
        assert r["tensor"] and repr(r["tensor"]) in r["msg"], r  # the item whose bytes are missing
        assert "copy the checkpoint directory again" in r["msg"]


def test_truncated_safetensors_names_file_and_tensor(broken):
    r = broken["import_truncated"]
    path = os.path.join(broken["root"], "hf_truncated", "model.safetensors")
    assert r["type"] == "TruncatedCheckpointFileError" and r["format_error"] and r["value_error"], r
    assert r["path"] == path and path in r["msg"] and repr(r["tensor"]) in r["msg"], r
    assert r["tensor"] in load_file(os.path.join(broken["root"], "hf", "model.safetensors"))


@pytest.mark.parametrize("key", ["import_no_config", "export_no_template_config"])
def test_missing_config_json_names_the_file(broken, key):
    r = broken[key]
    path = os.path.join(broken["root"], "hf_no_config", "config.json")
    # Also a FileNotFoundError, so the config validator's ``except OSError`` still reports it.
    assert r["type"] == "MissingCheckpointFileError" and r["format_error"] and r["os_error"], r
    assert r["path"] == path and path in r["msg"], r


def test_missing_shard_names_the_file(broken):
    r = broken["import_missing_shard"]
    path = os.path.join(broken["root"], "hf_missing_shard", "model-00002-of-00002.safetensors")
    assert r["type"] == "MissingCheckpointFileError" and r["path"] == path and path in r["msg"], r
    assert "model.safetensors.index.json" in r["msg"]


def test_corrupt_offgrpo_model_json_names_the_file(broken):
    r = broken["export_bad_meta"]
    path = os.path.join(broken["root"], "mcore_bad_meta", "offgrpo_model.json")
    assert r["type"] == "CorruptCheckpointFileError" and r["path"] == path and path in r["msg"], r


def test_intact_checkpoint_still_exports(broken):
    assert broken["export_good"] == {"type": None}


def test_check_safetensors_file_finds_the_first_lost_tensor(tmp_path):
    from megatron_offgrpo.models import CorruptCheckpointFileError, TruncatedCheckpointFileError
    from megatron_offgrpo.models.safetensors_io import check_safetensors_file

    path = str(tmp_path / "m.safetensors")
    save_file({"a": torch.zeros(256), "b": torch.zeros(8), "c": torch.zeros(4)}, path)
    assert sorted(check_safetensors_file(path)) == ["a", "b", "c"]
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    order = sorted((v["data_offsets"][1], k) for k, v in header.items() if k != "__metadata__")
    os.truncate(path, size - 1)  # only the last tensor in file order loses a byte
    with pytest.raises(TruncatedCheckpointFileError) as e:
        check_safetensors_file(path)
    assert e.value.tensor == order[-1][1] and path in str(e.value)
    os.truncate(path, 4)  # not even the header length
    with pytest.raises(TruncatedCheckpointFileError, match="too short for a safetensors header"):
        check_safetensors_file(path)
    with open(path, "wb") as f:
        f.write((10).to_bytes(8, "little") + b"not json!!")
    with pytest.raises(CorruptCheckpointFileError, match="damaged safetensors header"):
        check_safetensors_file(path)


# ----------------------------------------------------------------------------------------------------------
# CLIs


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(TOOLS, script), *args], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip


def _assert_cli_error(p: subprocess.CompletedProcess, *needles: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, p.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


# case -> (script, arguments with {root}, what the error line must name)
CLI_CASES = {
    "hf_to_mcore/truncated_safetensors": (
        "hf_to_mcore.py", ["--hf-dir", "{root}/hf_truncated", "--out", "{root}/cli_out"],
        ["{root}/hf_truncated/model.safetensors", "truncated"]),
    "hf_to_mcore/no_config": (
        "hf_to_mcore.py", ["--hf-dir", "{root}/hf_no_config", "--out", "{root}/cli_out"],
        ["{root}/hf_no_config/config.json"]),
    "mcore_to_hf/template_no_config": (
        "mcore_to_hf.py", ["--ckpt", "{root}/mcore", "--hf-template", "{root}/hf_no_config", "--out", "{root}/cli_out"],
        ["{root}/hf_no_config/config.json"]),
    "mcore_to_hf/truncated_distcp": (
        "mcore_to_hf.py", ["--ckpt", "{root}/mcore_truncated", "--hf-template", "{root}/hf", "--out", "{root}/cli_out"],
        ["{root}/mcore_truncated/{distcp}", "truncated"]),
    "mcore_to_hf/corrupt_meta": (
        "mcore_to_hf.py", ["--ckpt", "{root}/mcore_bad_meta", "--hf-template", "{root}/hf", "--out", "{root}/cli_out"],
        ["{root}/mcore_bad_meta/offgrpo_model.json"]),
    "check_parity/truncated_distcp": (
        "check_parity.py", ["--hf-dir", "{root}/hf", "--ckpt", "{root}/mcore_truncated"],
        ["{root}/mcore_truncated/{distcp}", "truncated"]),
    "check_parity/no_meta": (
        "check_parity.py", ["--hf-dir", "{root}/hf", "--ckpt", "{root}/mcore_no_meta"],
        ["{root}/mcore_no_meta/offgrpo_model.json", "not found"]),
    "check_parity/corrupt_meta": (
        "check_parity.py", ["--hf-dir", "{root}/hf", "--ckpt", "{root}/mcore_bad_meta"],
        ["{root}/mcore_bad_meta/offgrpo_model.json"]),
    "check_parity/no_config": (
        "check_parity.py", ["--hf-dir", "{root}/hf_no_config", "--ckpt", "{root}/mcore"],
        ["{root}/hf_no_config/config.json"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_reports_damaged_input_in_one_line(broken, case):
    script, args, needles = CLI_CASES[case]
    fmt = dict(root=broken["root"], distcp=broken["distcp"])
    p = _run(script, *[a.format(**fmt) for a in args])
    _assert_cli_error(p, *[n.format(**fmt) for n in needles])
    assert not os.path.exists(os.path.join(broken["root"], "cli_out")) or not os.listdir(
        os.path.join(broken["root"], "cli_out")
    )  # nothing half-written
