#!/usr/bin/env bash
# Runs an experiment preset over 3 seeds as one multirun and writes the sweep report.
#
#   scripts/reproduce.sh PRESET [extra Hydra overrides...]
#   scripts/reproduce.sh cpu_quick data.root=/data/cifar10-jpeg
#   SEEDS=0,1,2,3,4 scripts/reproduce.sh seed_notebook hydra/launcher=local_gpus
#
# The sweep goes to outputs/reproduce/PRESET/<date>_<time>/ (or $SWEEP_DIR); the report
# (report.md, report.csv, plots) is written into it, and the wall time is printed.
set -euo pipefail
if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
preset="$1"
shift
seeds="${SEEDS:-0,1,2}"
sweep_dir="${SWEEP_DIR:-outputs/reproduce/${preset}/$(date +%Y-%m-%d_%H-%M-%S)}"
python="${PYTHON:-python}"

start=$(date +%s)
status=0
"$python" -m swa_research.train -m "experiment=${preset}" "seed=${seeds}" \
    "hydra.sweep.dir=${sweep_dir}" "$@" || status=$?
end=$(date +%s)
echo "wall time: $((end - start)) s for ${preset} over seeds ${seeds}" | tee "${sweep_dir}/wall_time.txt"
"$python" -m swa_research.report "${sweep_dir}" || status=$?
exit "${status}"
