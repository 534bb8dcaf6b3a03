#!/usr/bin/env bash
# Runs an experiment preset over 3 seeds as one multirun and writes the sweep report.
#
#   scripts/reproduce.sh PRESET [extra Hydra overrides...]
#   scripts/reproduce.sh paper [MODEL] [DATASET] [extra Hydra overrides...]
#   scripts/reproduce.sh cpu_quick data.root=/data/cifar10-jpeg
#   SEEDS=0,1,2,3,4 scripts/reproduce.sh seed_notebook hydra/launcher=local_gpus
#   scripts/reproduce.sh paper preresnet164 cifar100 hydra/launcher=slurm_gpu
#
# `paper` runs the SWA paper's Table 1 (docs/paper.md): the presets experiment=paper/* of every
# model (vgg16, preresnet164, wrn28x10) and data set (cifar10, cifar100), or of one MODEL,
# one DATASET or one row, each an SGD run and a SWA run of 1.5 budgets, in one multirun; the
# report then compares every cell with the published figure. The sweep goes to
# outputs/reproduce/PRESET/<date>_<time>/ (or $SWEEP_DIR); the report (report.md, report.csv,
# plots) is written into it, and the wall time is printed. DRY_RUN=1 prints the command only.
set -euo pipefail
if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
preset="$1"
shift
seeds="${SEEDS:-0,1,2}"
python="${PYTHON:-python}"
experiment="${preset}"
name="${preset}"
if [[ "${preset}" == paper ]]; then
    model="" dataset=""
    if [[ $# -gt 0 && "$1" =~ ^(vgg16|preresnet164|wrn28x10|all)$ ]]; then
        model="$1"
        shift
    fi
    if [[ $# -gt 0 && "$1" =~ ^(cifar10|cifar100|all)$ ]]; then
        dataset="$1"
        shift
    fi
    if [[ $# -gt 0 && "$1" != *=* && "$1" != -* ]]; then
        echo "error: $1: expected a model (vgg16, preresnet164, wrn28x10, all), then a data set" \
            "(cifar10, cifar100, all), then Hydra overrides (key=value)" >&2
        exit 2
    fi
    [[ "${model}" == all ]] && model=""
    [[ "${dataset}" == all ]] && dataset=""
    experiment=$("$python" -c 'import sys
from swa_research.paper import presets
print(",".join(presets(sys.argv[1] or None, sys.argv[2] or None)))' "${model}" "${dataset}")
    name="paper${model:+_${model}}${dataset:+_${dataset}}"
fi
sweep_dir="${SWEEP_DIR:-outputs/reproduce/${name}/$(date +%Y-%m-%d_%H-%M-%S)}"
command=("$python" -m swa_research.train -m "experiment=${experiment}" "seed=${seeds}"
         "hydra.sweep.dir=${sweep_dir}" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${command[@]}"
    echo
    exit 0
fi

start=$(date +%s)
status=0
"${command[@]}" || status=$?
end=$(date +%s)
mkdir -p "${sweep_dir}"
echo "wall time: $((end - start)) s for ${name} over seeds ${seeds}" | tee "${sweep_dir}/wall_time.txt"
"$python" -m swa_research.report "${sweep_dir}" || status=$?
exit "${status}"
