# launch/slurm/common.sh -- the setup and the step runner shared by the sbatch scripts of this folder.
#
# Sourced (never run) by train.sbatch, precompute.sbatch and convert.sbatch, inside a SLURM batch job:
#
#   offgrpo_setup STEP MODE     traps USR1 / TERM, checks the job, loads the environment, creates the log folder,
#                               exports MASTER_ADDR / MASTER_PORT / OFFGRPO_JOB_START_TIME (and NCCL settings when
#                               the nodes have GPUs); STEP names the per-restart log:
#                               $OFFGRPO_LOG_DIR/STEP-$SLURM_JOB_ID-$SLURM_RESTART_COUNT.log
#                               MODE=forward: a SIGUSR1 to the batch shell is forwarded to srun (which forwards it
#                               to every task: the trainer saves and exits 75); one that arrives before the step
#                               started means "do not start it" (exit 75). MODE=hold: it is only logged (a step
#                               that cannot save partial work runs on).
#   offgrpo_run_step CMD...     runs `srun --kill-on-bad-exit=1 CMD...` in the background, appends its output to
#                               that log, and waits until srun has really exited; sets OFFGRPO_STEP_RC.
#   offgrpo_finish_train RC     0 -> done (exit 0); 75 -> `scontrol requeue` and exit 0; else exit RC.
#   offgrpo_finish RC           0 -> done; else exit RC (never requeues).
#
# Environment hooks (all optional, read from the submitting shell: sbatch exports it to the job):
#   OFFGRPO_REPO              the megatron-offgrpo checkout (default: the submit directory)
#   OFFGRPO_LOG_DIR           per-restart step logs (default: $OFFGRPO_REPO/logs); created if missing
#   OFFGRPO_MODULES           `module load` these first (space-separated)
#   OFFGRPO_VENV              a virtual environment to activate (with a container: a path inside the image)
#   OFFGRPO_CONTAINER_IMAGE   run the tasks in this image with pyxis (srun --container-image)
#   OFFGRPO_CONTAINER_MOUNTS  srun --container-mounts (the repo and the data must be visible inside)
#   OFFGRPO_SRUN_ARGS         extra srun arguments (space-separated), e.g. "--label --cpu-bind=none"
#   OFFGRPO_MAX_RESTARTS      train: stop requeueing once SLURM_RESTART_COUNT reaches it (default 50)
#   OFFGRPO_MASTER_PORT       the rendezvous port (default: 20000 + SLURM_JOB_ID % 20000)
#
# Exit codes of the trainer (megatron_offgrpo/train.py): 0 done; 75 stopped after saving a complete checkpoint
# (resume me); 2 bad config / inputs; 1 failure. Under srun the step's exit code is the largest over the tasks.
# shellcheck shell=bash

OFFGRPO_EXIT_RESUME=75
# shellcheck disable=SC2034  # set by offgrpo_run_step, read by the sbatch scripts that source this file
OFFGRPO_STEP_RC=""
OFFGRPO_STEP_PID=""
OFFGRPO_STEP_LOG=""
OFFGRPO_STEP_MODE=""
OFFGRPO_STOP_SIGNAL=""       # USR1 received by the batch shell
OFFGRPO_GOT_TERM=""          # TERM received by the batch shell (scancel, time limit, node shutdown)
_offgrpo_trapped=0

offgrpo_log() {
    local line
    line="[offgrpo $(date '+%F %T') job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}] $*"
    echo "$line"
    if [[ -n $OFFGRPO_STEP_LOG ]]; then echo "$line" >>"$OFFGRPO_STEP_LOG" 2>/dev/null || true; fi
}

offgrpo_die() {  # offgrpo_die CODE MESSAGE: a setup problem, never requeued
    local code=$1
    shift
    offgrpo_log "error: $*" >&2
    exit "$code"
}

_offgrpo_on_usr1() {
    _offgrpo_trapped=1
    OFFGRPO_STOP_SIGNAL=USR1
    if [[ $OFFGRPO_STEP_MODE != forward ]]; then
        offgrpo_log "received SIGUSR1: this step cannot save partial work, letting it run on (not forwarded)"
    elif [[ -z $OFFGRPO_STEP_PID ]]; then
        offgrpo_log "received SIGUSR1 before the step started: it will not be started (nothing to save)"
    else
        offgrpo_log "received SIGUSR1 (preemption or time limit near): forwarding it to srun (pid $OFFGRPO_STEP_PID)," \
            "which forwards it to every rank: they save at the end of the current step and exit $OFFGRPO_EXIT_RESUME"
        kill -USR1 "$OFFGRPO_STEP_PID" 2>/dev/null || offgrpo_log "srun (pid $OFFGRPO_STEP_PID) is already gone"
    fi
}

_offgrpo_on_term() {
    # Never forwarded: srun takes SIGTERM as "terminate the step" and SIGKILLs the tasks. SLURM sends TERM to the
    # tasks itself (scancel, time limit); the trainer saves on it. The batch shell only has to stay alive meanwhile.
    _offgrpo_trapped=1
    OFFGRPO_GOT_TERM=1
    offgrpo_log "received SIGTERM (scancel, time limit or shutdown): SLURM signals the tasks itself; waiting for them"
}

offgrpo_setup() {
    local step=$1
    OFFGRPO_STEP_MODE=$2
    # First: a USR1 during the setup must not kill the batch shell (bash's default action for it is to exit).
    trap _offgrpo_on_usr1 USR1
    trap _offgrpo_on_term TERM
    [[ -n ${SLURM_JOB_ID:-} ]] || offgrpo_die 2 "not inside a SLURM job: submit with sbatch (README.md, 'Run on a SLURM cluster')"
    export SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}  # unset until the first requeue
    OFFGRPO_REPO=${OFFGRPO_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
    [[ -d $OFFGRPO_REPO/megatron_offgrpo ]] || offgrpo_die 2 "OFFGRPO_REPO=$OFFGRPO_REPO is not a megatron-offgrpo checkout"
    export OFFGRPO_REPO
    # The job runs in the submit directory (relative paths of the config resolve there, as SLURM users expect);
    # the package is imported from the checkout.
    export PYTHONPATH="$OFFGRPO_REPO${PYTHONPATH:+:$PYTHONPATH}"

    OFFGRPO_LOG_DIR=${OFFGRPO_LOG_DIR:-$OFFGRPO_REPO/logs}
    mkdir -p "$OFFGRPO_LOG_DIR" || offgrpo_die 2 "cannot create the log folder OFFGRPO_LOG_DIR=$OFFGRPO_LOG_DIR"
    [[ -w $OFFGRPO_LOG_DIR ]] || offgrpo_die 2 "the log folder OFFGRPO_LOG_DIR=$OFFGRPO_LOG_DIR is not writable"
    export OFFGRPO_LOG_DIR
    # One log per run of the job: a requeued job (same id, SLURM_RESTART_COUNT + 1) never overwrites its past.
    OFFGRPO_STEP_LOG="$OFFGRPO_LOG_DIR/$step-$SLURM_JOB_ID-$SLURM_RESTART_COUNT.log"
    offgrpo_log "$step on ${SLURM_JOB_NUM_NODES:-1} node(s) ($SLURM_JOB_NODELIST), ${SLURM_NTASKS:-1} task(s);" \
        "log: $OFFGRPO_STEP_LOG"

    if [[ -n ${OFFGRPO_MODULES:-} ]]; then
        if ! type module >/dev/null 2>&1; then
            local init
            for init in /etc/profile.d/lmod.sh /etc/profile.d/modules.sh /usr/share/lmod/lmod/init/bash; do
                # shellcheck disable=SC1090
                if [[ -f $init ]]; then set +u; source "$init"; set -u; break; fi
            done
        fi
        type module >/dev/null 2>&1 || offgrpo_die 2 "OFFGRPO_MODULES is set but there is no 'module' command"
        local loaded=1
        set +u
        # shellcheck disable=SC2086
        module load $OFFGRPO_MODULES || loaded=0
        set -u
        ((loaded)) || offgrpo_die 2 "module load $OFFGRPO_MODULES failed"
        offgrpo_log "loaded modules: $OFFGRPO_MODULES"
    fi

    OFFGRPO_SRUN=(srun --kill-on-bad-exit=1)
    if [[ -n ${OFFGRPO_CONTAINER_IMAGE:-} ]]; then
        OFFGRPO_SRUN+=(--container-image="$OFFGRPO_CONTAINER_IMAGE" --container-workdir="$PWD")
        [[ -z ${OFFGRPO_CONTAINER_MOUNTS:-} ]] || OFFGRPO_SRUN+=(--container-mounts="$OFFGRPO_CONTAINER_MOUNTS")
        offgrpo_log "tasks run in the container $OFFGRPO_CONTAINER_IMAGE (pyxis)"
        # The venv, if any, lives inside the image: each task activates it, then execs (signals reach python).
        OFFGRPO_TASK_PREFIX=()
        if [[ -n ${OFFGRPO_VENV:-} ]]; then
            # shellcheck disable=SC2016  # expanded by the task's shell, inside the container
            OFFGRPO_TASK_PREFIX=(bash -c 'source "$OFFGRPO_VENV/bin/activate" && exec "$@"' offgrpo-task)
            export OFFGRPO_VENV
        fi
    else
        if [[ -n ${OFFGRPO_VENV:-} ]]; then
            [[ -f $OFFGRPO_VENV/bin/activate ]] || offgrpo_die 2 "OFFGRPO_VENV=$OFFGRPO_VENV has no bin/activate"
            set +u
            # shellcheck disable=SC1091
            source "$OFFGRPO_VENV/bin/activate"
            set -u
            offgrpo_log "activated $OFFGRPO_VENV"
        fi
        command -v python >/dev/null || offgrpo_die 2 "no python on PATH: set OFFGRPO_VENV or OFFGRPO_MODULES"
        OFFGRPO_TASK_PREFIX=()
    fi
    if [[ -n ${OFFGRPO_SRUN_ARGS:-} ]]; then
        local extra
        read -r -a extra <<<"$OFFGRPO_SRUN_ARGS"
        OFFGRPO_SRUN+=("${extra[@]}")
    fi

    # The rendezvous: explicit, so every task agrees without asking scontrol (the trainer would derive the same).
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    [[ -n $MASTER_ADDR ]] || offgrpo_die 2 "cannot expand SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST with scontrol"
    MASTER_PORT=${OFFGRPO_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    export MASTER_ADDR MASTER_PORT
    # What the submitting shell may have had must not leak into the tasks: each derives its rank from SLURM_PROCID.
    unset RANK LOCAL_RANK WORLD_SIZE

    # checkpoint.exit_after_seconds counts from the start of this allocation (a requeued job starts anew).
    # SLURM >= 23.02 exports it; older ones print it (local time) with squeue; else this script's start.
    local start=""
    if [[ ${SLURM_JOB_START_TIME:-} =~ ^[0-9]+$ ]]; then
        start=$SLURM_JOB_START_TIME
    else
        local printed
        printed=$(squeue -h -j "$SLURM_JOB_ID" -o %S 2>/dev/null | head -n 1 || true)
        start=$(date -d "$printed" +%s 2>/dev/null || true)
        if ! [[ $start =~ ^[0-9]+$ ]] || ((start > $(date +%s) || start < ${OFFGRPO_SCRIPT_START:-0} - 86400)); then
            start=${OFFGRPO_SCRIPT_START:-$(date +%s)}
        fi
    fi
    export OFFGRPO_JOB_START_TIME=$start

    # GPUs: NCCL (the trainer picks gloo by itself on nodes without CUDA).
    local gpus=${SLURM_GPUS_ON_NODE:-}
    if [[ -z $gpus && -n ${SLURM_JOB_GPUS:-} ]]; then gpus=$(tr ',' '\n' <<<"$SLURM_JOB_GPUS" | grep -c .); fi
    if [[ -n $gpus && $gpus != 0 ]]; then
        local per_node=${SLURM_NTASKS_PER_NODE:-}
        [[ -n $per_node ]] || offgrpo_die 2 "ask --ntasks-per-node explicitly (one task per GPU: --ntasks-per-node=$gpus)"
        ((per_node <= gpus)) || offgrpo_die 2 "--ntasks-per-node=$per_node but only $gpus GPU(s) per node: one task per GPU"
        ((per_node == gpus)) || offgrpo_log "warning: $gpus GPUs per node but --ntasks-per-node=$per_node: some GPUs idle"
        export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # Megatron's TP/SP comm overlap ordering
        export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
        export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
        offgrpo_log "$gpus GPU(s) per node: NCCL (NCCL_DEBUG=$NCCL_DEBUG), rendezvous $MASTER_ADDR:$MASTER_PORT"
    else
        [[ -n ${SLURM_NTASKS_PER_NODE:-} ]] || offgrpo_log "warning: --ntasks-per-node not given: SLURM chose the tasks"
        offgrpo_log "no GPUs allocated: gloo on CPU, rendezvous $MASTER_ADDR:$MASTER_PORT"
    fi
    offgrpo_log "OFFGRPO_JOB_START_TIME=$OFFGRPO_JOB_START_TIME ($(( $(date +%s) - OFFGRPO_JOB_START_TIME )) s ago)"
}

offgrpo_run_step() {
    if [[ $OFFGRPO_STEP_MODE == forward && -n $OFFGRPO_STOP_SIGNAL ]]; then
        offgrpo_log "not starting the step: SIGUSR1 arrived during the setup"
        OFFGRPO_STEP_RC=$OFFGRPO_EXIT_RESUME  # stopped before starting: nothing was lost, run it again
        return 0
    fi
    local cmd=("${OFFGRPO_SRUN[@]}" "${OFFGRPO_TASK_PREFIX[@]}" "$@")
    offgrpo_log "running: ${cmd[*]}"
    # In the background, so that the batch shell can run its USR1 trap while the step runs (bash runs traps
    # only between commands; `wait` returns as soon as a trapped signal arrives).
    "${cmd[@]}" >>"$OFFGRPO_STEP_LOG" 2>&1 &
    OFFGRPO_STEP_PID=$!
    local rc
    while true; do
        _offgrpo_trapped=0
        rc=0
        wait "$OFFGRPO_STEP_PID" || rc=$?
        # A trap interrupted `wait`: srun is still running (or its status is kept by bash): wait again.
        ((_offgrpo_trapped)) || break
    done
    OFFGRPO_STEP_PID=""
    # shellcheck disable=SC2034
    OFFGRPO_STEP_RC=$rc
    offgrpo_log "srun exited with code $rc"
}

offgrpo_finish_train() {
    local rc=$1
    case $rc in
        0)
            offgrpo_log "decision: training finished (exit 0): done"
            exit 0
            ;;
        "$OFFGRPO_EXIT_RESUME")
            if [[ -n $OFFGRPO_GOT_TERM ]]; then
                offgrpo_log "decision: stopped after SIGTERM (the job is being cancelled or timed out): not requeued;" \
                    "a new submission of the same command resumes from checkpoint.dir/latest"
                exit "$rc"
            fi
            local max=${OFFGRPO_MAX_RESTARTS:-50}
            if ((SLURM_RESTART_COUNT >= max)); then
                offgrpo_log "decision: stopped (exit 75) but already restarted $SLURM_RESTART_COUNT times" \
                    "(OFFGRPO_MAX_RESTARTS=$max): not requeued; resubmit to resume"
                exit "$rc"
            fi
            offgrpo_log "decision: stopped with a complete checkpoint (exit 75): requeueing job $SLURM_JOB_ID" \
                "(restart $((SLURM_RESTART_COUNT + 1))), it resumes from checkpoint.dir/latest"
            # The requeue ends this run of the job (SLURM signals the batch shell): nothing is left to do here.
            trap '' TERM USR1
            if scontrol requeue "$SLURM_JOB_ID"; then
                exit 0
            fi
            offgrpo_log "error: scontrol requeue $SLURM_JOB_ID failed (submitted with --no-requeue? JobRequeue=0?):" \
                "resubmit the same command to resume"
            exit "$rc"
            ;;
        *)
            local why="2: bad config or inputs, 1: failure"
            if ((rc > 128)); then
                # srun --kill-on-bad-exit sends SIGTERM to the other tasks as soon as one exits non-zero: a task
                # still running then (or already past its handlers) ends with 128 + 15.
                why="a task died of SIG$(kill -l $((rc - 128)) 2>/dev/null || echo $((rc - 128)));"
                why+=" the log's 'srun: error: ... task N' lines say which task exited first, and how"
            fi
            offgrpo_log "decision: training failed with exit code $rc ($why): not requeued; see $OFFGRPO_STEP_LOG"
            exit "$rc"
            ;;
    esac
}

offgrpo_finish() {
    local rc=$1 what=$2
    if ((rc == 0)); then
        offgrpo_log "decision: $what finished (exit 0): done"
        exit 0
    fi
    offgrpo_log "decision: $what failed with exit code $rc: see $OFFGRPO_STEP_LOG"
    exit "$rc"
}
