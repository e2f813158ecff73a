#!/usr/bin/env bash
# The main job on the embedded CPU default, end to end, ending with the proof that the method works:
#   1. build the dataset from the shipped teacher rollouts (examples/demo/train.jsonl: learnable synthetic tasks,
#      8 rollouts per problem, some wrong; labelled by majority vote)
#   2. write the initial policy (a seeded random-init tiny Qwen3, HF format) and convert it to Megatron
#   3. precompute the reference log-probs with it (the training engine, TP=2 over gloo)
#   4. train it with offline GRPO at TP=2 over gloo (examples/demo_cpu.yaml)
#   5. evaluate the initial and the trained model on held-out problems (examples/demo/benchmark.jsonl) with the
#      project's evaluation CLI (avg@4; vLLM when .venv-vllm is installed, else HF transformers), and print
#      the before / after table and each stage's time.
# Outputs, all under outputs/demo/: data/ (dataset, rejects, stats plot), initial_model/ (+ initial_model_mcore/),
# train/ (checkpoints, TensorBoard logs, metrics.jsonl, curves.png), eval/{initial,trained}/ (samples.jsonl,
# summary.json). Arguments are training config overrides (e.g. train_steps=500).
# Re-running resumes: training continues from its last checkpoint, and a stage whose output is up to date is
# skipped. Delete outputs/demo/ to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
OFFGRPO_SKIP_VLLM=${OFFGRPO_SKIP_VLLM:-1} bash scripts/setup_env.sh  # vLLM (3.4 GB) only if asked: OFFGRPO_SKIP_VLLM=0
. .venv/bin/activate
export OMP_NUM_THREADS=1  # two ranks share the two cores
NPROC=${NPROC:-2}
OUT=outputs/demo
DATA=$OUT/data/demo_train
INIT=$OUT/initial_model
INIT_MCORE=$OUT/initial_model_mcore
CKPT=$OUT/train/checkpoints
CONFIG=examples/demo_cpu.yaml
TIMINGS=()
stage() { STAGE_NAME=$1; STAGE_START=$SECONDS; printf '\n=== %s\n' "$1"; }
stage_done() { TIMINGS+=("$(printf '%-44s %4d s' "$STAGE_NAME" $((SECONDS - STAGE_START)))"); }
skip() { TIMINGS+=("$(printf '%-44s %6s' "$STAGE_NAME" skipped)"); echo "up to date: $1"; }
has_ref_logp() {
  python -c "import json, sys; sys.exit('ref_logp' not in json.load(open('$DATA.json')).get('per_token_arrays', {}))"
}

stage "build the dataset"
need_ref=0
if [ ! -f "$DATA.json" ] || [ examples/demo/train.jsonl -nt "$DATA.json" ]; then
  python tools/preprocess/build_dataset.py --input examples/demo/train.jsonl \
      --tokenizer examples/tiny_tokenizer --output-prefix "$DATA" \
      --domain math --max-seq-len 128 --workers 1 --teacher synthetic-demo-teacher \
      --stats-plot "$DATA"_stats.png
  need_ref=1
  stage_done
else
  skip "$DATA"
fi

stage "write and convert the initial model"
if [ ! -d "$INIT" ]; then
  python tools/preprocess/make_demo_data.py initial-model "$INIT"
  rm -rf "$INIT_MCORE"
  need_ref=1
fi
if [ ! -f "$INIT_MCORE/offgrpo_model.json" ]; then
  rm -rf "$INIT_MCORE.tmp"  # a conversion killed half-way is never used: convert aside, then rename
  python tools/checkpoint/hf_to_mcore.py --hf-dir "$INIT" --out "$INIT_MCORE.tmp" --tp "$NPROC" --no-progress
  mv "$INIT_MCORE.tmp" "$INIT_MCORE"
  stage_done
else
  skip "$INIT_MCORE"
fi

# The reference is the initial policy, scored once by the training engine in the training layout.
stage "precompute the reference log-probs"
if [ "$need_ref" = 1 ] || ! has_ref_logp; then
  torchrun --nproc-per-node "$NPROC" tools/preprocess/precompute_logprobs.py "$CONFIG" \
      parallel.tp="$NPROC" --prefix "$DATA" --array ref_logp --producer demo-initial-model
  stage_done
else
  skip "$DATA.ref_logp"
fi

stage "train with offline GRPO"
torchrun --nproc-per-node "$NPROC" -m megatron_offgrpo.train "$CONFIG" parallel.tp="$NPROC" "$@"
stage_done

# Held-out problems, the blog's sampling protocol (temperature 0.6, top_p 0.95, n samples per problem); the
# prompt is the problem alone, as in training. Generation may use both cores: no OMP_NUM_THREADS=1 here; the HF
# fallback generates the whole benchmark in a few batches (fewer Python round trips on a small CPU).
evaluate() {  # evaluate NAME MODEL NEWEST_INPUT
  local dir=$OUT/eval/$1
  stage "evaluate the $1 model"
  if [ -f "$dir/summary.json" ] && [ "$dir/summary.json" -nt "$3" ]; then
    skip "$dir/summary.json"
    return
  fi
  # --work-dir (where a Megatron checkpoint is exported to HF) is absolute: the vLLM worker runs elsewhere.
  env -u OMP_NUM_THREADS OFFGRPO_HF_BATCH_SIZE="${OFFGRPO_HF_BATCH_SIZE:-128}" \
    python -m megatron_offgrpo.eval --model "$2" --benchmark examples/demo/benchmark.jsonl \
      --n 4 --temperature 0.6 --top-p 0.95 --max-tokens 64 --seed 0 --prompt-template '{problem}' \
      --backend auto --work-dir "$PWD/$OUT/eval/work" --output "$dir" --overwrite --no-progress
  stage_done
}
evaluate initial "$INIT" "$INIT/model.safetensors"
evaluate trained "$CKPT" "$CKPT/latest"

printf '\n'
python -c "from megatron_offgrpo.preprocess.demo_tasks import print_before_after as p
p('$OUT/eval/initial', '$OUT/eval/trained')"
printf '\nstage timings (this run)\n'
printf '  %s\n' "${TIMINGS[@]}"
printf '  %-44s %4d s\n' "total" "$SECONDS"
echo "outputs: $OUT/ (training curves: $OUT/train/logs/curves.png; samples: $OUT/eval/*/samples.jsonl)"
