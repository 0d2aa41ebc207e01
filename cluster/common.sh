# Sourced (never run) by the job templates in cluster/slurm and cluster/lsf: the same
# set-up on every scheduler. Works from the repository root, finds the CLI, sends the
# job's output to the experiment's logs/ folder, and runs the training so that the job can
# requeue itself before its time limit. Templates call only `cellmap-repro` (or torchrun
# for several GPUs); nothing here decides what a run does.
#
# Settings, from the environment of the submitting shell (sbatch and bsub pass it on):
#   EXP                  experiment folder name (default setup_04_all)
#   ARGS                 extra flags for the stage, e.g. ARGS='--epochs 10'
#   REGION               predict templates: whole-volume flags for `predict` and `process`,
#                        e.g. REGION='--dataset jrc_cos7-1a --roi 0:4096,0:4096,0:4096 --workers 4'
#   GPUS                 GPUs to train on (default: those the scheduler gave the job, else 1)
#   CELLMAP_REPRO_EXEC   a prefix that runs the CLI in a container, e.g.
#                        'apptainer exec --nv --pwd /workspace --bind data:/workspace/data,experiments:/workspace/experiments cellmap-repro.sif'
#                        (default: the repository's .venv, else the python on PATH)
#   CELLMAP_REPRO_DATA, CELLMAP_REPRO_EXPERIMENTS, CELLMAP_REPRO_THREADS  as for the CLI
# CELLMAP_REPRO_ROOT (the repository root) is set by the template before sourcing this.

set -euo pipefail
cd "${CELLMAP_REPRO_ROOT:?the job template sets CELLMAP_REPRO_ROOT}"
if [ ! -f cluster/common.sh ]; then
  echo "cellmap-repro: error: $PWD is not the cellmap-repro repository: submit from its root or set CELLMAP_REPRO_ROOT" >&2
  exit 2
fi
EXP=${EXP:-setup_04_all}
read -r -a EXTRA_ARGS <<<"${ARGS:-}"
read -r -a REGION_ARGS <<<"${REGION:-}"
read -r -a EXEC <<<"${CELLMAP_REPRO_EXEC:-}"
if [ ${#EXEC[@]} -eq 0 ] && [ -x .venv/bin/python ]; then
  PATH="$PWD/.venv/bin:$PATH"
fi

# `python -m cellmap_repro` rather than the `cellmap-repro` script: the image has no script.
cli() { "${EXEC[@]}" python -m cellmap_repro "$@"; }

# The experiment's folder as seen from the host (the container sees the same through its binds).
experiment_path() { echo "${CELLMAP_REPRO_EXPERIMENTS:-experiments}/$1"; }

# Everything the job prints from here on goes to <experiment>/logs/<name>; a requeued job
# appends to the same file.
log_to() {
  local folder
  folder="$(experiment_path "$1")/logs"
  mkdir -p "$folder"
  echo "job output: $folder/$2"
  exec >>"$folder/$2" 2>&1
  # (on a line of its own: a killed attempt's progress bar may have left one unfinished)
  printf "\n==== %s job %s on %s (attempt %d): EXP=%s ARGS='%s' GPUS=%s\n" \
    "$(date -Is)" "${JOB_ID:-?}" "$(hostname)" $(( ${JOB_RESTARTS:-0} + 1 )) "$1" "${ARGS:-}" "${GPUS:-1}"
}

# `train` that continues the run after a requeue (--auto-resume), on GPUS GPUs.
train() {
  if [ "${GPUS:-1}" -gt 1 ]; then
    "${EXEC[@]}" torchrun --standalone --nproc-per-node="$GPUS" -m cellmap_repro train --auto-resume "$@"
  else
    cli train --auto-resume "$@"
  fi
}

# Run "$@" and, on SIGUSR1 (sent by the scheduler shortly before the time limit, see the
# templates' --signal / -wa), requeue this job with REQUEUE_COMMAND: the requeued job
# resumes from latest.pth. Preemption needs nothing: the scheduler kills and requeues.
run_requeueable() {
  local child status
  "$@" &
  child=$!
  trap 'printf "\n==== %s time limit near: requeueing\n" "$(date -Is)"; ${REQUEUE_COMMAND}' USR1
  while true; do
    status=0
    wait "$child" || status=$?
    # wait returns early (status > 128) when a trapped signal arrives; the child runs on
    if [ "$status" -gt 128 ] && kill -0 "$child" 2>/dev/null; then continue; fi
    return "$status"
  done
}
