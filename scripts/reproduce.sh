#!/usr/bin/env bash
# Runs an experiment preset over 3 seeds as one multirun and writes the sweep report.
#
#   scripts/reproduce.sh PRESET [extra Hydra overrides...]
#   scripts/reproduce.sh paper [MODEL] [DATASET] [extra Hydra overrides...]
#   scripts/reproduce.sh cpu_quick data.root=/data/cifar10-jpeg
#   SEEDS=0,1,2,3,4 scripts/reproduce.sh seed_notebook hydra/launcher=local_gpus
#   scripts/reproduce.sh paper preresnet164 cifar100 hydra/launcher=slurm_gpu
#   BUDGET=8 scripts/reproduce.sh paper preresnet164 cifar10 data=synthetic  # a toy-size row
#
# `paper` runs the SWA paper's Table 1 (docs/paper.md): the presets experiment=paper/* of every
# model (vgg16, preresnet164, wrn28x10) and data set (cifar10, cifar100), or of one MODEL,
# one DATASET or one row, each an SGD run and a SWA run of 1.5 budgets, in one multirun; the
# report then compares every cell with the published figure. The sweep goes to
# outputs/reproduce/PRESET/<date>_<time>/ (or $SWEEP_DIR); the report (report.md, report.csv,
# plots) is written into it, and the wall time is printed. DRY_RUN=1 prints the command only.
# BUDGET=N (paper only) scales the recipes to a budget of N epochs: each preset is then a
# multirun of its own in the sweep's folder <preset>, an SGD preset for N epochs, a SWA preset
# for 1.5 N with its averaging start scaled alike (swa_research.analysis.paper.scaled_overrides); the
# report over the whole sweep marks them as another recipe than the paper's (docs/paper.md).
set -euo pipefail
if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
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
from swa_research.analysis.paper import presets
print(",".join(presets(sys.argv[1] or None, sys.argv[2] or None)))' "${model}" "${dataset}")
    name="paper${model:+_${model}}${dataset:+_${dataset}}"
fi
sweep_dir="${SWEEP_DIR:-outputs/reproduce/${name}/$(date +%Y-%m-%d_%H-%M-%S)}"
budget="${BUDGET:-}"
if [[ -n "${budget}" && ( "${preset}" != paper || ! "${budget}" =~ ^[1-9][0-9]*$ ) ]]; then
    echo "error: BUDGET=${budget}: a whole number of epochs, with the paper mode only" >&2
    exit 2
fi
# One multirun per entry: experiment, sweep dir and the scaled overrides, separated by tabs.
tab=$'\t'
runs=()
if [[ -z "${budget}" ]]; then
    runs=("${experiment}${tab}${sweep_dir}")
else
    for p in ${experiment//,/ }; do
        scaled=$("$python" -c 'import sys
from swa_research.analysis.paper import scaled_overrides
print("\t".join(scaled_overrides(sys.argv[1], int(sys.argv[2]))))' "${p}" "${budget}")
        runs+=("${p}${tab}${sweep_dir}/${p//\//_}${tab}${scaled}")
    done
fi
status=0
start=$(date +%s)
for entry in "${runs[@]}"; do
    IFS="${tab}" read -r -a parts <<< "${entry}"
    command=("$python" -m swa_research.train -m "experiment=${parts[0]}" "seed=${seeds}"
             "hydra.sweep.dir=${parts[1]}" "${parts[@]:2}" "$@")
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        printf '%q ' "${command[@]}"
        echo
        continue
    fi
    "${command[@]}" || status=$?
done
[[ "${DRY_RUN:-0}" == 1 ]] && exit 0
end=$(date +%s)
mkdir -p "${sweep_dir}"
echo "wall time: $((end - start)) s for ${name}${budget:+ at budget ${budget}} over seeds ${seeds}" \
    | tee "${sweep_dir}/wall_time.txt"
"$python" -m swa_research.report "${sweep_dir}" || status=$?
exit "${status}"
