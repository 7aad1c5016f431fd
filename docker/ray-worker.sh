#!/usr/bin/env bash
# Start a Ray worker node that owns PISA_GPUS_PER_WORKER GPUs (default all) of the ones it sees.
#
#   docker/ray-worker.sh --address=ray-head:6379 [more `ray start` options]
#
# Docker gives every replica of a scaled service the same devices, so with
# `--scale ray-worker=N` each container sees all the host's GPUs. Each replica claims free
# GPUs by holding an exclusive lock per GPU UUID under PISA_GPU_LOCK_DIR (on the volume all
# replicas share) for as long as its `ray start` runs, and exposes only those through
# CUDA_VISIBLE_DEVICES. PISA_GPUS_PER_WORKER=all (the default) gives one worker every
# visible GPU: the layout NCCL is fast in (one network namespace and /dev/shm per host).
# Without a GPU the node joins as a CPU-only worker.
set -euo pipefail

per_worker="${PISA_GPUS_PER_WORKER:-all}"
lock_dir="${PISA_GPU_LOCK_DIR:-/data/.gpu-locks}"

gpus=()
if command -v nvidia-smi >/dev/null 2>&1; then
    mapfile -t gpus < <(nvidia-smi --query-gpu=index,uuid --format=csv,noheader,nounits 2>/dev/null \
                        | tr -d ' ' | grep -v '^$' || true)
fi
if [ "${#gpus[@]}" -eq 0 ]; then
    echo "ray-worker: no GPU visible; joining as a CPU-only node" >&2
    exec ray start "$@" --num-gpus=0 --block
fi

if [ "$per_worker" = "all" ]; then
    per_worker="${#gpus[@]}"
fi
if ! [[ "$per_worker" =~ ^[1-9][0-9]*$ ]]; then
    echo "ray-worker: PISA_GPUS_PER_WORKER must be a positive integer or 'all', got '$per_worker'" >&2
    exit 2
fi

mkdir -p "$lock_dir"
claimed=()
for entry in "${gpus[@]}"; do
    [ "${#claimed[@]}" -ge "$per_worker" ] && break
    index="${entry%%,*}"
    uuid="${entry#*,}"
    exec {fd}>"$lock_dir/$uuid.lock"
    if flock --nonblock "$fd"; then
        claimed+=("$index")  # the lock stays held by this fd, inherited by `ray start`
    else
        exec {fd}>&-
    fi
done

if [ "${#claimed[@]}" -lt "$per_worker" ]; then
    echo "ray-worker: wanted $per_worker free GPU(s), found ${#claimed[@]} of ${#gpus[@]};" \
         "other ray-worker replicas hold the rest (scale down, or lower PISA_GPUS_PER_WORKER)" >&2
    exit 1
fi

export CUDA_VISIBLE_DEVICES
CUDA_VISIBLE_DEVICES="$(IFS=,; echo "${claimed[*]}")"
echo "ray-worker: GPUs $CUDA_VISIBLE_DEVICES" >&2
exec ray start "$@" --num-gpus="${#claimed[@]}" --block
