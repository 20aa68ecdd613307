#!/usr/bin/env bash
# One short training run on a lent CUDA GPU machine (the `device` tool), at most ~9 minutes.
#
# The device tool sends the whole working tree, tracked files included, and refuses more
# than 64 MiB.  This repository's tracked files are 95 MiB (models 62 MiB, committed
# checkpoints 31 MiB) before the 45 MiB of training data, so a run takes the files it does
# not need out of git's index for the call and puts them back afterwards:
#
#     bash training/gpu/run.sh prepare hn_oar    # data + MONAI wheel in .gpu/, the tree slimmed to
#                                               # what a new hn_oar stage reads: the committed best.pt
#                                               # (the released weights in float16, half model.ts's size);
#                                               # refuses (exit 3) if still over
#     bash training/gpu/run.sh prepare hn_oar resume   # ... or the committed state.pt, to resume the stage
#     device run:  command: bash training/gpu/run.sh remote hn_oar 7 --new-stage [TRAIN ARGS...]
#                  carry:   [".gpu"]         timeout_s: 600
#     bash training/gpu/run.sh restore           # the files back in the index: DO THIS BEFORE ANY COMMIT
#     bash training/gpu/run.sh fetch FILES_AT hn_oar   # the returned checkpoint into training/checkpoints/hn_oar
#
# The files stay on disk throughout; only the index changes.  TRAIN ARGS go to
# training.train as they are, e.g. a widened deep-supervised stage:
#     bash training/gpu/run.sh remote hn_oar 7 --new-stage --channels 16 32 96 192 384 --network unet-ds --lr 3e-4 --iterations 6000
# There the patches come from 8 worker processes (training/loader.py; --workers N to change), the
# forward pass runs in bf16 where the GPU has it, and the held-out patients are scored on the GPU.
# Files over 15 MiB come back in parts (the tool returns at most 16 MiB a file); fetch joins them.
# Without --new-stage the committed stage resumes there (prepare ... resume; extend a finished
# one with --reschedule N).  A new stage starts from the committed best.pt, which is what
# training.export exported into models/TASK (checked equal for both tasks on 2026-12-04).
set -euo pipefail
cd "$(dirname "$0")/../.."
LIMIT=$((64 * 1024 * 1024))   # the device tool's working-tree limit (tracked + untracked + carried)
SELF=training/gpu/run.sh
PART=15M                      # returned files: at most 16 MiB each, 8 in all
case "${1:-}" in
prepare|restore)
    EXCLUDE=$(git rev-parse --git-path info/exclude)   # here only (also in a git worktree)
    mkdir -p "$(dirname "$EXCLUDE")"
    ;;&
prepare)
    task=${2:?task (the tree is slimmed to what a new stage of it reads)}
    case "${3:-new}" in new) keep=best.pt;; resume) keep=state.pt;; *) echo "prepare TASK [new|resume]" >&2; exit 2;; esac
    [[ -f "training/checkpoints/$task/$keep" ]] || { echo "no training/checkpoints/$task/$keep" >&2; exit 2; }
    [[ ! -f .gpu/slim.txt ]] || { echo "a slimmed tree is still out: bash $SELF restore first" >&2; exit 2; }
    grep -qx '/.gpu/' "$EXCLUDE" 2>/dev/null || echo '/.gpu/' >> "$EXCLUDE"
    rm -rf .gpu && mkdir -p .gpu/whl
    cp -r ../shared/data/openkbp/train .gpu/openkbp-train          # 46 MB of npz
    # MONAI is not on the GPU image (torch is); it is pure Python
    python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu/whl monai==1.6.1
    # out of the index for the call (and ignored, so they do not travel as untracked files):
    # every model file, every checkpoint but the one the run starts from, the sample CT
    git ls-files -- 'models/*/model.onnx' 'models/*/model.ts' 'training/checkpoints/*/*.pt' sample \
        | grep -vx -e "training/checkpoints/$task/$keep" > .gpu/slim.txt
    xargs -a .gpu/slim.txt git rm -q --cached --
    sed 's|^|/|' .gpu/slim.txt >> "$EXCLUDE"
    echo "WARNING: $(wc -l < .gpu/slim.txt) files are out of git's index until 'bash $SELF restore': commit nothing before it"
    tree=$({ git ls-files -z; git ls-files -z --others --exclude-standard; } \
           | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
    carried=$(du -sb .gpu | cut -f1)
    echo "the device tool would send $((tree / 1048576)) MiB of working tree + $((carried / 1048576)) MiB of .gpu" \
         "= $(((tree + carried) / 1048576)) MiB (limit $((LIMIT / 1048576)) MiB)"
    if (( tree + carried > LIMIT )); then
        echo "over the limit: the call would be refused before the machine starts (restoring the index)" >&2
        bash "$SELF" restore
        exit 3
    fi
    ;;
remote)
    task=${2:?task}; minutes=${3:-7}; shift $(( $# < 3 ? $# : 3 ))
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    python3 -m training.train --task "$task" --data .gpu/openkbp-train --threads 16 \
        --max-minutes "$minutes" --init "training/checkpoints/$task/best.pt" "$@" 2>&1 | grep -v Warning | tail -n 40
    # best.pt only when this run found a better checkpoint (a resumed stage may not)
    for f in state.pt best.pt history.json; do
        [[ ! -f "training/checkpoints/$task/$f" ]] || split -b "$PART" -d "training/checkpoints/$task/$f" "$OUT/$f.part-"
    done
    ls -l "$OUT"
    ;;
restore)
    [[ -f .gpu/slim.txt ]] || { echo "nothing to restore"; exit 0; }
    xargs -a .gpu/slim.txt git reset -q --       # the index entries as HEAD has them
    grep -vxF -f <(sed 's|^|/|' .gpu/slim.txt) "$EXCLUDE" > "$EXCLUDE.tmp" || true
    mv "$EXCLUDE.tmp" "$EXCLUDE"
    rm .gpu/slim.txt
    git status --short
    ;;
fetch)
    from=${2:?the folder the device tool returned the files in}; task=${3:?task}
    for f in state.pt history.json; do
        ls "$from/$f.part-"* > /dev/null   # these must have come back
    done
    for f in state.pt best.pt history.json; do   # no best.pt: the run found no better checkpoint
        if compgen -G "$from/$f.part-*" > /dev/null; then cat "$from/$f.part-"* > "training/checkpoints/$task/$f"; fi
    done
    ls -l "training/checkpoints/$task"
    ;;
*)
    echo "usage: $SELF prepare TASK [new|resume] | remote TASK MINUTES [TRAIN ARGS...] | restore | fetch FILES_AT TASK" >&2; exit 2;;
esac
