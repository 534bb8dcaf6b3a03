#!/usr/bin/env bash
# The GPU checks of the speed targets as one command for a lent CUDA machine, which has
# PyTorch but no Hydra, no W&B and no network. About 7 to 10 minutes on an H100.
#
# Here, once per checkout (both folders are git-ignored through .git/info/exclude):
#   bash ../shared/tools/gpu-wheels.sh
#   mkdir -p .gpu-data && cp ../shared/data/cifar10-jpeg.tar.gz .gpu-data/ \
#       && (grep -qx '/.gpu-data/' .git/info/exclude || echo '/.gpu-data/' >> .git/info/exclude)
# Then, with the device tool: command "bash scripts/gpu_check.sh", carry .gpu-wheels and
# .gpu-data, timeout_s 600. What comes back in $OUT (at most 11 files):
#   summary.txt       GPU, torch, each step's exit status and seconds, and the targets judged
#                     by scripts/targets.py from the files below
#   logs.txt          every step's output
#   bench128.json     seed loop vs trainer, simplified and VGG16, fp32 and bf16, batch 128
#   bench512.json     VGG16 bf16 at batch 512 (the >= 30% of the bf16 peak target)
#   graphs.json       simplified bf16 at batch 128 with --compile reduce-overhead (CUDA graphs)
#   cifar.json        metrics.json of the seed experiment, 20 epochs, on the CIFAR-10 JPEG copy
#   data_memory.json, data_stream.json   two epochs of the seed's model on the same JPEG copy,
#                     decoded into memory and streamed from disk (8 workers); the streamed run's
#                     loader wait goes to summary.txt
#   paper_speed.txt   the training speed of PreResNet164 and WRN28x10 (two short epochs of the
#                     SWA paper's recipe, experiment=paper/<model>_cifar10_sgd, on synthetic
#                     32x32 images, bf16) and the GPU hours of their presets at that speed
#                     (python -m swa_research.paper --images-per-s ...; docs/paper.md)
#   scaling.json      DDP scaling, VGG16 bf16 on 1, 2, ... N ranks (only with several GPUs)
#   profile.txt       torch.profiler's op tables of bench128's and graphs' trainer paths, with
#                     the GPU's busy time per step (also device_busy_pct in their JSON rows):
#                     far below 100%, the step waits for the host (kernel launches)
# The steps run in order of importance; each appends to summary.txt and logs.txt as it ends, so
# a command cut off by the device tool's limit still brings back what finished.
#
# QUICK=1 DEVICE=cpu bash scripts/gpu_check.sh   runs every step tiny on a CPU (a dry run of
# this script); STEP_TIMEOUT (seconds, default 240) bounds each step, CIFAR_TIMEOUT (300) the
# CIFAR run; DATA_TARBALL names another copy of the data.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
DEVICE="${DEVICE:-cuda}"
mkdir -p "$OUT"
work=$(mktemp -d /tmp/gpu_check.XXXXXX)  # run dirs and the unpacked data: fresh every time
summary="$OUT/summary.txt"
logs="$OUT/logs.txt"
: >"$summary"
: >"$logs"

if [[ -d .gpu-wheels ]]; then
    python3 -m pip install -q --no-index --find-links .gpu-wheels hydra-core omegaconf wandb \
        >>"$logs" 2>&1 || echo "pip install from .gpu-wheels failed" | tee -a "$summary"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=offline
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
        || echo "no nvidia-smi"
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
        torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
} >>"$summary" 2>&1

step() {  # step NAME COMMAND...: runs it with a time limit, logs it, records status and time
    local name=$1 start rc
    shift
    start=$(date +%s)
    echo "===== $name: $*" >>"$logs"
    timeout "${STEP_TIMEOUT:-240}" "$@" >>"$logs" 2>&1
    rc=$?
    echo "$name: exit $rc, $(($(date +%s) - start)) s" | tee -a "$summary"
}

if [[ "${QUICK:-0}" == 1 ]]; then
    bench=(--width 0.125 --steps 2 --rounds 1 --warmup 1 --num-images 1200 --avg-calls 1
           --loader-batches 2 --matmul-size 128 --profile-steps 2)
    train_size=(trainer.epochs=1 model.width=0.125 swa.start=0.5 swa.freq=1 data.val_fraction=0.5)
    graphs_mode=default  # compiling for CUDA graphs on a CPU only takes time
    paper_size=(data.train_size=32 data.test_size=16 trainer.batch_size=16
                trainer.eval_batch_size=16 trainer.epochs=1)
    stream_size=(trainer.epochs=1 model.width=0.125)
else
    bench=(--steps 50 --rounds 3 --warmup 5)
    train_size=(trainer.epochs=20)  # the seed recipe (SWA from iteration 4000 of 7020)
    graphs_mode=reduce-overhead
    # 300 steps of batch 128 an epoch, two epochs (the first steps' cuDNN autotuning included).
    paper_size=(data.train_size=38400 data.test_size=1000 trainer.epochs=2)
    stream_size=(trainer.epochs=2)  # the seed's model, batch 128
fi

step smoke python3 -m swa_research.train experiment=smoke "trainer.device=$DEVICE" \
    "hydra.run.dir=$work/smoke"
step bench128 python3 scripts/benchmark.py --device "$DEVICE" --precision fp32,bf16 \
    --batch-size 128 "${bench[@]}" --json "$OUT/bench128.json" --profile "$OUT/profile.txt"
step bench512 python3 scripts/benchmark.py --device "$DEVICE" --precision bf16 --batch-size 512 \
    --model vgg16 "${bench[@]}" --json "$OUT/bench512.json"
step graphs python3 scripts/benchmark.py --device "$DEVICE" --precision bf16 --batch-size 128 \
    --model simplified --compile "$graphs_mode" "${bench[@]}" --json "$OUT/graphs.json" \
    --profile "$work/profile_graphs.txt"
if [[ -f "$work/profile_graphs.txt" ]]; then
    { echo; echo "===== graphs (--compile $graphs_mode)"; cat "$work/profile_graphs.txt"; } \
        >>"$OUT/profile.txt"
fi

tarball="${DATA_TARBALL:-.gpu-data/cifar10-jpeg.tar.gz}"
if [[ -f "$tarball" ]]; then
    mkdir -p "$work/data"
    tar xzf "$tarball" -C "$work/data"
    STEP_TIMEOUT="${CIFAR_TIMEOUT:-300}" step cifar python3 -m swa_research.train \
        data=imagefolder data.root="$work/data/cifar10-jpeg" "trainer.device=$DEVICE" \
        trainer.progress=line "${train_size[@]}" "hydra.run.dir=$work/cifar"
    cp "$work/cifar/metrics.json" "$OUT/cifar.json" 2>/dev/null \
        || echo "cifar: no metrics.json" | tee -a "$summary"
    # The streaming path against the in-memory one on the same images and settings
    # (docs/imagenet.md): training images/s and the loader's wait share.
    for path in memory stream; do
        in_memory=$([[ $path == memory ]] && echo true || echo false)
        step "data_$path" python3 -m swa_research.train data=imagefolder \
            data.root="$work/data/cifar10-jpeg" data.image_size=32 data.in_memory=$in_memory \
            trainer.num_workers=8 \
            data.val_fraction=0 swa=none "trainer.device=$DEVICE" trainer.progress=none \
            "${stream_size[@]}" trainer.save_checkpoints=false "hydra.run.dir=$work/$path"
        cp "$work/$path/metrics.json" "$OUT/data_$path.json" 2>/dev/null \
            || echo "data_$path: no metrics.json" | tee -a "$summary"
        grep -ho "loader wait [0-9]*% of training" "$work/$path/train.log" 2>/dev/null \
            | tail -1 | sed "s/^/data_$path: /" >>"$summary"
    done
else
    echo "cifar: skipped (no $tarball carried)" | tee -a "$summary"
fi

# The SWA paper's larger models (scripts/benchmark.py builds every model with model.width,
# which only the VGGs take): a short run of each one's paper recipe through the trainer, its
# images/s from metrics.json (train.images_per_s: training steps only, no evaluation).
for model in preresnet164 wrn28x10; do
    step "paper_$model" python3 -m swa_research.train "experiment=paper/${model}_cifar10_sgd" \
        data=synthetic "${paper_size[@]}" "trainer.device=$DEVICE" trainer.progress=none \
        trainer.save_checkpoints=false trainer.checkpoint_every=0 \
        "hydra.run.dir=$work/paper_$model"
done
python3 - "$work" >"$OUT/paper_speed.txt" 2>>"$logs" <<'PY' || echo "paper_speed: failed (see logs.txt)" | tee -a "$summary"
import json, sys
from pathlib import Path
from swa_research.analysis.paper import estimate_table
speeds = {}
for model in ("preresnet164", "wrn28x10"):
    try:
        m = json.loads((Path(sys.argv[1]) / f"paper_{model}" / "metrics.json").read_text())
    except (OSError, ValueError):
        print(f"{model}: no metrics.json")
        continue
    t = m["train"]
    speeds[model] = t["images_per_s"]
    print(f"{model}: {t['images_per_s']:.0f} training images/s ({t['iterations']} steps, "
          f"{t['wall_time_s']:.1f} s in all, peak GPU memory {t['peak_gpu_mb']} MiB)")
if speeds:
    print("\nGPU hours of the paper presets at these speeds (an evaluation image counted as a "
          "third of a training image):\n")
    print(estimate_table(images_per_s=speeds))
PY
grep -E '^(preresnet164|wrn28x10): ' "$OUT/paper_speed.txt" >>"$summary" 2>/dev/null

# DDP scaling (docs/distributed.md) where the machine has more than one GPU: one run of VGG16
# bf16 on 1, 2, ... N ranks under torchrun, 128 images per rank.
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [[ "$DEVICE" == cuda && "${gpus:-0}" -gt 1 ]]; then
    ranks=$(python3 -c "import sys; n = int(sys.argv[1]); print(','.join(str(k) for k in
        sorted({1, 2, 4, 8, n}) if k <= n))" "$gpus")
    step scaling python3 scripts/benchmark.py --ranks "$ranks" --device cuda --precision bf16 \
        --model vgg16 --batch-size 128 "${bench[@]}" --json "$OUT/scaling.json"
else
    echo "scaling: skipped (${gpus:-0} GPU(s); DDP scaling needs more than one)" \
        | tee -a "$summary"
fi

# The targets, judged from what came back (scripts/targets.py), at the end of summary.txt.
echo "----- targets" >>"$summary"
python3 scripts/targets.py "$OUT" >>"$summary" 2>>"$logs" \
    || echo "targets: scripts/targets.py failed (see logs.txt)" >>"$summary"
