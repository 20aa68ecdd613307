#!/usr/bin/env bash
# One short training run on a lent CUDA GPU machine (the `device` tool), at most ~9 minutes.
#
# Prepare here (once per session), from the repository root:
#     bash training/gpu/run.sh prepare
# then call the device tool with
#     command: bash training/gpu/run.sh remote TASK MINUTES [TRAIN ARGS...]     (e.g. hn_oar 7)
#     carry:   [".gpu"]         timeout_s: 600
# TRAIN ARGS go to training.train as they are, e.g. a new deep-supervised stage:
#     bash training/gpu/run.sh remote hn_oar 7 --new-stage --network unet-ds --lr 3e-4 --iterations 6000
# and copy the returned state.pt / best.pt / history.json into training/checkpoints/TASK/.
# The stage in training/checkpoints/TASK/state.pt (committed) is resumed there exactly as
# `make train` resumes it here: same settings, same patch stream; only the device differs.
set -euo pipefail
cd "$(dirname "$0")/../.."
case "${1:-}" in
prepare)
    grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >> .git/info/exclude
    rm -rf .gpu && mkdir -p .gpu/whl
    cp -r ../shared/data/openkbp/train .gpu/openkbp-train          # 46 MB of npz
    # MONAI is not on the GPU image (torch is); it is pure Python
    python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu/whl monai==1.6.1
    du -sh .gpu
    ;;
remote)
    task=${2:?task}; minutes=${3:-7}; shift $(( $# < 3 ? $# : 3 ))
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    python3 -m training.train --task "$task" --data .gpu/openkbp-train --threads 16 \
        --max-minutes "$minutes" --init "models/$task/model.ts" "$@" 2>&1 | grep -v Warning | tail -n 40
    cp "training/checkpoints/$task/"{state.pt,best.pt,history.json} "$OUT/"
    ;;
*)
    echo "usage: $0 prepare | remote TASK MINUTES [TRAIN ARGS...]" >&2; exit 2;;
esac
