"""vLLM worker: run by the vLLM virtual environment's python, by path; imports vLLM and the standard library only.

It lives in its own environment (``.venv-vllm``, ``scripts/setup_vllm.sh``) because vLLM pins exact versions of
packages the training environment also uses, so nothing of ``megatron_offgrpo`` is imported here: the parent
(``megatron_offgrpo/inference/generation.py``) talks to it through files and a pipe only.

Protocol:

* ``--llm-args FILE``: a JSON object of ``vllm.LLM`` keyword arguments; the engine is built once at start.
* Requests: one path per line on stdin, each a JSON file ``{"id", "output", "sampling": {"temperature", "top_p",
  "stop_token_ids", "allowed_vocab"}, "requests": [{"index", "prompt_token_ids", "max_tokens", "seed"}, ...]}``.
  The results go to ``output`` as JSON lines ``{"index", "token_ids", "finish_reason"}`` (written under a
  temporary name and renamed when complete). End of stdin ends the worker.
* Events: JSON lines on ``--progress-fd``: ``loading``, ``ready`` (with ``load_s``), ``progress`` (``request``,
  ``done`` completions so far), ``finished`` (``request``, ``done``, ``generate_s``, ``tokens``), ``error``
  (``message``). vLLM's own logging goes to stdout / stderr, which the parent keeps in a log file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback


def main() -> int:
    ap = argparse.ArgumentParser(description="vLLM generation worker (see the module docstring)")
    ap.add_argument("--llm-args", required=True)
    ap.add_argument("--progress-fd", type=int, required=True)
    args = ap.parse_args()
    events = os.fdopen(args.progress_fd, "w", buffering=1)

    def emit(**event) -> None:
        events.write(json.dumps(event) + "\n")
        events.flush()

    try:
        emit(event="loading")
        t0 = time.perf_counter()
        from tqdm import tqdm
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        with open(args.llm_args) as f:
            llm = LLM(**json.load(f))
        emit(event="ready", load_s=time.perf_counter() - t0)

        for line in sys.stdin:
            path = line.strip()
            if not path:
                continue
            with open(path) as f:
                req = json.load(f)
            sampling = req["sampling"]
            request_id = req["id"]

            class Progress(tqdm):
                """vLLM's progress bar, reporting the finished completions to the parent instead of a terminal."""

                def __init__(self, *a, **kw):
                    kw["file"] = open(os.devnull, "w")
                    super().__init__(*a, **kw)

                def update(self, n=1):
                    out = super().update(n)
                    emit(event="progress", request=request_id, done=int(self.n))
                    return out

            allowed = sampling.get("allowed_vocab")
            # One list shared by every request: the ids a padded output layer may never produce.
            allowed_ids = list(range(int(allowed))) if allowed is not None else None
            prompts, params = [], []
            for r in req["requests"]:
                prompts.append(TokensPrompt(prompt_token_ids=r["prompt_token_ids"]))
                params.append(SamplingParams(
                    n=1, temperature=sampling["temperature"], top_p=sampling["top_p"], top_k=0, min_p=0.0,
                    repetition_penalty=1.0, max_tokens=r["max_tokens"], seed=r["seed"],
                    stop_token_ids=sampling["stop_token_ids"], detokenize=False, allowed_token_ids=allowed_ids,
                ))  # fmt: skip
            t1 = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=Progress) if prompts else []
            gen_s = time.perf_counter() - t1
            tmp = req["output"] + ".tmp"
            tokens = 0
            with open(tmp, "w") as f:
                for r, o in zip(req["requests"], outputs):
                    c = o.outputs[0]
                    tokens += len(c.token_ids)
                    f.write(json.dumps({"index": r["index"], "token_ids": list(c.token_ids),
                                        "finish_reason": c.finish_reason}) + "\n")  # fmt: skip
            os.replace(tmp, req["output"])
            emit(event="finished", request=request_id, done=len(outputs), generate_s=gen_s, tokens=tokens)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises with the log's tail
        traceback.print_exc()
        emit(event="error", message=f"{type(e).__name__}: {e}")
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
        # The engine ran in this process, which owns nothing else: skip the interpreter's teardown of torch and
        # vLLM (seconds of module cleanup) now that every result file is written.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
