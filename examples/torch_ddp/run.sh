#!/bin/sh
# Start train.py with one process per GPU that Rigshift gave the job.
#
# N is the number of entries in CUDA_VISIBLE_DEVICES ("0,1" -> 2), or 1 when it is
# unset or empty. Arguments go to train.py:  sh run.sh --epochs 5
set -eu

nproc=0
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    set -f  # no glob expansion of the entries
    old_ifs=$IFS
    IFS=,
    for device in $CUDA_VISIBLE_DEVICES; do
        if [ -n "$device" ]; then
            nproc=$((nproc + 1))
        fi
    done
    IFS=$old_ifs
    set +f
fi
if [ "$nproc" -lt 1 ]; then
    nproc=1
fi

# One intra-op thread per process unless the caller chose: N processes share the cores.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export OMP_NUM_THREADS
# torch warns at import when NumPy is missing (it is not needed here): keep it out of the log.
PYTHONWARNINGS="${PYTHONWARNINGS:+$PYTHONWARNINGS,}ignore:Failed to initialize NumPy"
export PYTHONWARNINGS

here=$(cd "$(dirname "$0")" && pwd)
# `python -m torch.distributed.run` is torchrun without relying on the console script.
exec python -m torch.distributed.run --standalone --nproc-per-node="$nproc" \
    "$here/train.py" "$@"
