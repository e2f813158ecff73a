#!/bin/bash
# launch/slurm/pipeline.sh -- submit the chain convert -> precompute -> train as SLURM jobs, each starting only
# after the previous one succeeded (--dependency=afterok), and print their job ids. Runs on a login node; returns
# as soon as the jobs are submitted.
#
# Contract: every step is optional (--skip-*); the first submitted step has no dependency; a step that fails
# cancels the ones after it (--kill-on-invalid-dep=yes). When the conversion runs, precompute and train get
# model.architecture=HF_DIR model.load=MCORE_DIR. The last line printed is machine-readable:
#   jobs: convert=ID precompute=ID train=ID          (a skipped step is left out)
# Exit code: 0 all submitted; 2 bad usage (nothing submitted); 1 an sbatch failed (the jobs submitted before it
# are listed, and cancelled unless --keep-on-error).
# Evaluation is not part of the chain yet (the eval step has not landed): run it by hand after training.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: launch/slurm/pipeline.sh --config CONFIG.yaml [options] [-- a.b=c ...]

Steps (each optional):
  convert     launch/slurm/convert.sbatch: HF checkpoint -> Megatron (tools/checkpoint/hf_to_mcore.py)
                --hf-dir DIR --mcore-dir DIR [--convert-tp N] [--convert-dtype fp32|bf16|fp16]   or --skip-convert
  precompute  launch/slurm/precompute.sbatch: reference / teacher log-probs (tools/preprocess/precompute_logprobs.py)
                --prefix P [--array ref_logp] [--producer NAME]                               or --skip-precompute
  train       launch/slurm/train.sbatch: training; requeues itself when preempted                or --skip-train
  (evaluation is not part of the chain yet: the eval step has not landed)

Resources (precompute and train; the conversion runs as one task on one node):
  --nodes N  --ntasks-per-node N  --gpus-per-node N  --time HH:MM:SS (train)  --precompute-time HH:MM:SS
  --partition P  --account A  --sbatch-args "ARGS"   (extra sbatch arguments for every step)
Other:
  --log-dir DIR       sbatch --output folder and OFFGRPO_LOG_DIR (default: ./logs; created here, before sbatch)
  --keep-on-error     do not cancel the already submitted jobs when a later sbatch fails
  -- a.b=c ...        config overrides for precompute and train
Environment hooks (OFFGRPO_VENV, OFFGRPO_MODULES, OFFGRPO_CONTAINER_IMAGE, ...): launch/slurm/common.sh.
EOF
}

die_usage() {
    echo "pipeline: error: $*" >&2
    echo "(launch/slurm/pipeline.sh --help for the usage)" >&2
    exit 2
}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CONFIG="" HF_DIR="" MCORE_DIR="" CONVERT_TP=1 CONVERT_DTYPE=""
PREFIX="" ARRAY=ref_logp PRODUCER=""
SKIP_CONVERT=0 SKIP_PRECOMPUTE=0 SKIP_TRAIN=0 KEEP_ON_ERROR=0
LOG_DIR=logs
RES=() TRAIN_TIME=() PRE_TIME=() COMMON=() OVERRIDES=()

need() { [[ $# -ge 2 && -n $2 ]] || die_usage "$1 needs a value"; }
while (($#)); do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --config) need "$@"; CONFIG=$2; shift ;;
        --hf-dir) need "$@"; HF_DIR=$2; shift ;;
        --mcore-dir) need "$@"; MCORE_DIR=$2; shift ;;
        --convert-tp) need "$@"; CONVERT_TP=$2; shift ;;
        --convert-dtype) need "$@"; CONVERT_DTYPE=$2; shift ;;
        --prefix) need "$@"; PREFIX=$2; shift ;;
        --array) need "$@"; ARRAY=$2; shift ;;
        --producer) need "$@"; PRODUCER=$2; shift ;;
        --skip-convert) SKIP_CONVERT=1 ;;
        --skip-precompute) SKIP_PRECOMPUTE=1 ;;
        --skip-train) SKIP_TRAIN=1 ;;
        --nodes | --ntasks-per-node | --gpus-per-node) need "$@"; RES+=("$1=$2"); shift ;;
        --time) need "$@"; TRAIN_TIME=("--time=$2"); shift ;;
        --precompute-time) need "$@"; PRE_TIME=("--time=$2"); shift ;;
        --partition | --account) need "$@"; COMMON+=("$1=$2"); shift ;;
        --sbatch-args) need "$@"; read -r -a extra <<<"$2"; COMMON+=("${extra[@]}"); shift ;;
        --log-dir) need "$@"; LOG_DIR=$2; shift ;;
        --keep-on-error) KEEP_ON_ERROR=1 ;;
        --) shift; OVERRIDES=("$@"); break ;;
        *) die_usage "unknown argument '$1'" ;;
    esac
    shift
done

# Everything is checked before the first sbatch: a half-submitted chain is worse than none.
((SKIP_CONVERT && SKIP_PRECOMPUTE && SKIP_TRAIN)) && die_usage "every step is skipped: nothing to submit"
if ((!SKIP_PRECOMPUTE || !SKIP_TRAIN)); then
    [[ -n $CONFIG ]] || die_usage "--config is required for precompute and train"
    [[ -f $CONFIG ]] || die_usage "--config $CONFIG: no such file"
fi
if ((!SKIP_CONVERT)); then
    [[ -n $HF_DIR && -n $MCORE_DIR ]] || die_usage "the conversion needs --hf-dir and --mcore-dir (or --skip-convert)"
    [[ -f $HF_DIR/config.json ]] || die_usage "--hf-dir $HF_DIR has no config.json"
    # The converter itself refuses a non-empty --out; say it now rather than in a failed job.
    if [[ -d $MCORE_DIR && -n $(ls -A "$MCORE_DIR") ]]; then
        die_usage "--mcore-dir $MCORE_DIR is not empty (already converted? then --skip-convert)"
    fi
    HF_DIR=$(cd "$HF_DIR" && pwd)
    MCORE_DIR=$(mkdir -p "$(dirname "$MCORE_DIR")" && cd "$(dirname "$MCORE_DIR")" && pwd)/$(basename "$MCORE_DIR")
    OVERRIDES+=("model.architecture=$HF_DIR" "model.load=$MCORE_DIR")
fi
if ((!SKIP_PRECOMPUTE)); then
    [[ -n $PREFIX ]] || die_usage "precompute needs --prefix P (the dataset) or --skip-precompute"
    [[ -f $PREFIX.json ]] || die_usage "--prefix $PREFIX: no dataset manifest $PREFIX.json"
    PRODUCER=${PRODUCER:-${MCORE_DIR:-$(basename "$CONFIG" .yaml)}}
fi
command -v sbatch >/dev/null || die_usage "sbatch not found: run this on a SLURM login node"

# sbatch drops a job whose --output file cannot be opened, silently: the folder must exist first.
mkdir -p "$LOG_DIR" || die_usage "cannot create the log folder $LOG_DIR"
LOG_DIR=$(cd "$LOG_DIR" && pwd)
export OFFGRPO_LOG_DIR=$LOG_DIR
export OFFGRPO_REPO=${OFFGRPO_REPO:-$REPO}

SUBMITTED=()  # "step=id"
DEP=()
submit() {  # submit STEP SBATCH_ARGS... -- SCRIPT ARGS...: sets JOB
    local step=$1 out
    shift
    if ! out=$(sbatch --parsable --output="$LOG_DIR/%x-%j.out" "${COMMON[@]}" "${DEP[@]}" "$@"); then
        echo "pipeline: error: sbatch of the $step step failed" >&2
        if ((${#SUBMITTED[@]})); then
            echo "pipeline: already submitted: ${SUBMITTED[*]}" >&2
            if ((!KEEP_ON_ERROR)); then
                local s
                for s in "${SUBMITTED[@]}"; do scancel "${s#*=}" || true; done
                echo "pipeline: cancelled them (--keep-on-error keeps them)" >&2
            fi
        fi
        exit 1
    fi
    JOB=${out%%;*}  # --parsable prints "id" or "id;cluster"
    local after=""
    [[ ${#DEP[@]} == 0 ]] || after=" (after job ${DEP[0]#--dependency=afterok:})"
    echo "pipeline: $step: job $JOB$after"
    SUBMITTED+=("$step=$JOB")
    DEP=(--dependency="afterok:$JOB" --kill-on-invalid-dep=yes)
}

if ((!SKIP_CONVERT)); then
    args=(--hf-dir "$HF_DIR" --out "$MCORE_DIR" --tp "$CONVERT_TP")
    [[ -z $CONVERT_DTYPE ]] || args+=(--dtype "$CONVERT_DTYPE")
    submit convert "$REPO/launch/slurm/convert.sbatch" "${args[@]}"
fi
if ((!SKIP_PRECOMPUTE)); then
    # The overrides right after CONFIG: the tool's parser takes no positional argument after its options.
    submit precompute "${RES[@]}" "${PRE_TIME[@]}" "$REPO/launch/slurm/precompute.sbatch" "$CONFIG" \
        "${OVERRIDES[@]}" --prefix "$PREFIX" --array "$ARRAY" --producer "$PRODUCER"
fi
if ((!SKIP_TRAIN)); then
    submit train "${RES[@]}" "${TRAIN_TIME[@]}" "$REPO/launch/slurm/train.sbatch" "$CONFIG" "${OVERRIDES[@]}"
fi
echo "pipeline: logs in $LOG_DIR (STEP-JOBID-RESTART.log per run); evaluation is not part of the chain yet"
echo "jobs: ${SUBMITTED[*]}"
