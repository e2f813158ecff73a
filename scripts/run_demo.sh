#!/usr/bin/env bash
# The main job on the embedded CPU default: set up the environment, build the shipped sample dataset, precompute
# the reference log-probs with the initial model, and train the tiny model with offline GRPO at TP=2 over gloo.
# Outputs: outputs/data/ (dataset, stats plot), outputs/tiny_cpu/ (checkpoints, TensorBoard logs, curves.png).
# Re-running resumes from the last checkpoint; delete outputs/ to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export OMP_NUM_THREADS=1  # two ranks share the two cores
NPROC=${NPROC:-2}

python tools/preprocess/build_dataset.py --input examples/data/ot3_sample.jsonl \
    --tokenizer examples/tiny_tokenizer --output-prefix outputs/data/ot3_sample \
    --domain math --max-seq-len 640 --workers 1 \
    --student-pass-rates examples/data/student_pass_rates.jsonl --teacher synthetic-teacher \
    --stats-plot outputs/data/ot3_sample_stats.png

# The reference is the initial policy (seeded init, same layout as training), scored once by the training engine.
torchrun --nproc-per-node "$NPROC" tools/preprocess/precompute_logprobs.py examples/tiny_cpu.yaml \
    parallel.tp="$NPROC" --prefix outputs/data/ot3_sample --array ref_logp --producer tiny-init-seed1234

torchrun --nproc-per-node "$NPROC" -m megatron_offgrpo.train examples/tiny_cpu.yaml parallel.tp="$NPROC" "$@"
