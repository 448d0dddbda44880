#!/usr/bin/env bash
# The GPU checks of lorafleet on one CUDA node, as one command:
#
#   scripts/gpu_check.sh [OUT_DIR]        (default runs/gpu-check)
#
# 1. tests/gpu (pytest -m gpu): the training engine, the multi-LoRA layers and
#    the torch rollout engine on CUDA against the CPU engine and peft.
# 2. benchmarks/trainer_fused.py on a random-init model of Qwen2.5-0.5B's
#    architecture, bf16: fused multi-adapter steps against separate ones, with
#    mixed micro-batches (the GPU default) and with batch-invariant ones, for a
#    small step (16 x 128 tokens per adapter) and an RL-sized one (32 x 512);
#    then the RL-sized step at smaller micro-batches, for the peak device
#    memory per micro-batch size.
# 3. `lorafleet bench throughput --quick` with the torch rollout engine and the
#    trainer on CUDA: the whole mesh (every service a process, gRPC between
#    them) on the GPU node. The tiny model: a launch-bound smoke run, not a
#    throughput figure.
#
# Each step has its own time limit and log in OUT_DIR; one failing step does
# not stop the next, and the script exits non-zero if any failed.
# GPU_CHECK_STEPS="PATTERN ..." runs only the steps whose names match a shell
# pattern (e.g. "gpu_tests fused_rl_*"). With GPU_CHECK_ARCHIVE=FILE.tgz set,
# OUT_DIR's logs and JSON (not the benchmark's stack directories) are packed
# into that file after every step, for a node that hands back one small file.
# Run it from the repository's root. It needs the project's core and train
# dependencies importable by $PYTHON (default python3); the repository's
# services/ is put on PYTHONPATH here.
set -uo pipefail

out=${1:-runs/gpu-check}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$PWD/services${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
failed=()

wanted() {  # wanted NAME: is NAME selected by GPU_CHECK_STEPS (all when unset)?
  local pattern
  [ -z "${GPU_CHECK_STEPS:-}" ] && return 0
  for pattern in $GPU_CHECK_STEPS; do
    # shellcheck disable=SC2053  # the pattern is meant to glob
    [[ $1 == $pattern ]] && return 0
  done
  return 1
}

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to OUT_DIR/NAME.log
  local name=$1 limit=$2 start rc
  shift 2
  wanted "$name" || return 0
  echo "== $name (limit ${limit}s)"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  tail -n 25 "$out/$name.log"
  echo "== $name: exit $rc after $(( $(date +%s) - start )) s"
  [ "$rc" -eq 0 ] || failed+=("$name")
  if [ -n "${GPU_CHECK_ARCHIVE:-}" ]; then
    tar czf "$GPU_CHECK_ARCHIVE" -C "$out" --exclude='*-stacks' .
  fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$py" -c "import torch, transformers, peft; print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), '| transformers', \
transformers.__version__, '| peft', peft.__version__)"

step gpu_tests 200 "$py" -m pytest -q -p no:cacheprovider -m gpu tests/gpu \
  --junitxml="$out/gpu_tests.xml"

model=""
fused() {  # fused NAME SECONDS ARGS...: trainer_fused.py on the Qwen2.5-0.5B-shaped model
  local name=$1 limit=$2
  shift 2
  wanted "$name" || return 0
  if [ -z "$model" ]; then  # built once, on the first fused step that runs
    model=$("$py" -c "import sys; sys.path.insert(0, 'benchmarks'); \
from trainer_fused import _model_dir; print(_model_dir(None, 'qwen2.5-0.5b')[0])" | tail -n 1)
    echo "random-init Qwen2.5-0.5B architecture at: ${model:-<not built>}"
  fi
  if [ -z "$model" ]; then
    failed+=("$name")
    return 0
  fi
  step "$name" "$limit" "$py" benchmarks/trainer_fused.py --device cuda --dtype bfloat16 \
    --model-dir "$model" --out "$out/$name.json" "$@"
}
for mode in off on; do
  fused "fused_small_invariant_$mode" 60 --seqs 16 --tokens 128 --rank 16 \
    --repeats 5 --warmup 2 --batch-invariant "$mode"
done
for mode in off on; do
  fused "fused_rl_invariant_$mode" 100 --seqs 32 --tokens 512 --rank 16 \
    --adapters 1,4,8 --repeats 3 --warmup 1 --batch-invariant "$mode"
done
for tokens in 4096 8192 16384; do
  fused "fused_rl_micro_batch_$tokens" 60 --seqs 32 --tokens 512 --rank 16 \
    --adapters 4 --repeats 2 --warmup 1 --micro-batch-tokens "$tokens"
done

config="$out/tiny-torch-cuda.toml"
# The default benchmark config with the torch rollout engine and a CUDA trainer.
sed -e 's/^kv_cache_gib = 0.5$/kv_cache_gib = 0.5\nengine = "torch"/' \
  benchmarks/configs/tiny.toml > "$config"
printf '\n[services.trainer]\ndevice = "cuda"\n' >> "$config"
step bench_quick 180 "$py" -m lorafleet.cli.main bench throughput --config "$config" --quick \
  --out "$out/throughput_quick.json"

if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}"
  exit 1
fi
echo "all GPU checks passed"
