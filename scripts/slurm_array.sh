#!/usr/bin/env bash
# Preprocess a data set on a Slurm cluster: one `mvprep build --part i/N` per array task, then
# one `mvprep merge` once every task has ended.
#
#   scripts/slurm_array.sh submit DATA OUT N [extra mvprep build options...]
#
# submits `sbatch --array=1-N` of this script in "part" mode and a merge job that starts after
# the whole array (afterany: merge itself refuses an incomplete set and names the parts to
# run again). DATA, its images and OUT: object-store URLs or paths every node sees alike.
# URLs (s3://bucket/..., gs://...) take their credentials from the environment (AWS_* or
# ~/.aws; pip install 'mvkit[s3]'); paths must be on a file system every node mounts alike;
# the Python environment with mvkit must be active in the submitting shell (Slurm passes the
# environment on) or set MVKIT_VENV=/path/to/.venv. Examples:
#
#   scripts/slurm_array.sh submit s3://bkt/raw/train.jsonl s3://bkt/shards/train 64 \
#       --max-res 1344 --samples-per-shard 1000
#   scripts/slurm_array.sh submit /shared/train.json /shared/shards/train 64 --max-res 1344
#
# Every part uses the same build options; a part that is requeued, preempted or re-submitted
# skips the shards it already finished (sizes and sha256 checked), so re-running a part is
# always safe. Parts run in any order and at the same time; each writes only its own shards,
# index entries and OUT/parts/ marker. Tune the #SBATCH lines below for your cluster; the
# CPUs of a task become `--workers`.
#
#SBATCH --job-name=mvprep
#SBATCH --cpus-per-task=8
#SBATCH --mem-per-cpu=2G
#SBATCH --time=08:00:00
#SBATCH --requeue
#SBATCH --output=mvprep-%A_%a.out
set -euo pipefail

usage() {
  sed -n '2,9p' "$0" >&2
  exit 2
}

mvprep_cmd() {
  if [[ -n "${MVKIT_VENV:-}" ]]; then
    "$MVKIT_VENV/bin/mvprep" "$@"
  else
    mvprep "$@"
  fi
}

mode="${1:-}"
[[ -n "$mode" ]] || usage
shift

case "$mode" in
  submit)
    [[ $# -ge 3 ]] || usage
    data="$1" out="$2" parts="$3"
    shift 3
    [[ "$parts" =~ ^[1-9][0-9]*$ ]] || { echo "N must be a positive integer, got $parts" >&2; exit 2; }
    script="$(readlink -f "$0")"
    array_job=$(sbatch --parsable --array="1-$parts" "$script" part "$data" "$out" "$parts" "$@")
    array_job="${array_job%%;*}"
    merge_job=$(sbatch --parsable --dependency="afterany:$array_job" --cpus-per-task=1 \
      --job-name=mvprep-merge --output="mvprep-merge-%j.out" "$script" merge "$out")
    echo "submitted parts: job $array_job (array 1-$parts); merge: job $merge_job"
    ;;
  part)
    [[ $# -ge 3 ]] || usage
    data="$1" out="$2" parts="$3"
    shift 3
    i="${SLURM_ARRAY_TASK_ID:?part mode runs as a Slurm array task (SLURM_ARRAY_TASK_ID unset)}"
    workers="${SLURM_CPUS_PER_TASK:-1}"
    echo "mvprep part $i/$parts on $(hostname) with $workers workers"
    mvprep_cmd build "$data" --out "$out" --part "$i/$parts" --workers "$workers" \
      --no-progress "$@"
    ;;
  merge)
    [[ $# -ge 1 ]] || usage
    mvprep_cmd merge "$1"
    ;;
  *)
    usage
    ;;
esac
