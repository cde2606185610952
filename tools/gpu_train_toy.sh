#!/usr/bin/env bash
# Trains the built-in toy:shapes model on a lent GPU in one call of the workplace's device
# tool, and leaves the model folder in $OUT, split into pieces small enough to come back
# (docs/toy.md#training-on-a-gpu says why each setting is what it is).
#
#   here, once: python3 -m pip download --no-deps --only-binary=:all: -d .whl \
#                   diffusers==$(.venv/bin/python -c 'import diffusers; print(diffusers.__version__)')
#   device:     run(command="bash tools/gpu_train_toy.sh", carry=[".whl"], timeout_s=600)
#   back here:  bash tools/gpu_train_toy.sh --unpack FOLDER   # FOLDER: the run's files_at
#   smoke test: OUT=/tmp/gpu-smoke SMOKE=1 PYTHON=.venv/bin/python bash tools/gpu_train_toy.sh
#
# $OUT gets train.log, training.json and model.tar.part-aa, -ab, … (15 MB each: a file
# that comes back is at most 16 MiB). MINUTES (default 9.3) is how long the training
# command may take: the device tool allows one command 10 minutes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "${1:-}" = "--unpack" ]; then
    # the pieces back into runtime/toy/shapes (the committed model is replaced, not kept)
    from="${2:?--unpack needs the folder that the files came back to}"
    rm -rf runtime/toy/shapes.new
    mkdir -p runtime/toy/shapes.new
    cat "$from"/model.tar.part-* | tar xf - -C runtime/toy/shapes.new
    rm -rf runtime/toy/shapes
    mv runtime/toy/shapes.new/model runtime/toy/shapes
    rmdir runtime/toy/shapes.new
    du -sh runtime/toy/shapes
    exit 0
fi

: "${OUT:?OUT must name the folder whose files come back}"
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import diffusers" 2>/dev/null; then
    # the device machine has torch and transformers but not diffusers: the carried wheel
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

work="${WORK:-/tmp/toy-gpu}"
rm -rf "$work/model"
# the trainer saves its state with perfusion_runtime's atomic writer; the device machine has
# the checkout but not the installed package, whose folder is runtime/ (pyproject.toml)
mkdir -p "$work/link"
ln -sfn "$PWD/runtime" "$work/link/perfusion_runtime"
export PYTHONPATH="$work/link${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${SMOKE:-}" ]; then
    settings=(--quick --device cpu --threads 2)
else
    "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no GPU here'"
    settings=(--device cuda --workers 14 --threads 8 --images 200000 --vae-steps 6000
              --vae-decay-from 4000 --vae-batch 64 --batch 256 --minutes "${MINUTES:-9.3}"
              --save-every 2000)
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt" || true
PYTHONUNBUFFERED=1 "$PYTHON" tools/train_toy_model.py "${settings[@]}" \
    --state "$work/state" --out "$work/model" 2>&1 | tee "$OUT/train.log"
cp "$work/model/training.json" "$OUT/training.json"
(cd "$work" && tar cf - model) | split -b 15M - "$OUT/model.tar.part-"
ls -l "$OUT"
