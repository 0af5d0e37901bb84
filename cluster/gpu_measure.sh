#!/usr/bin/env bash
# The GPU numbers of BENCHMARKS.md, in stages that each fit in about 10 minutes of one GPU:
#
#   cluster/gpu_measure.sh kernels   # bf16 kernel tests, then the kernel benchmark table
#   cluster/gpu_measure.sh giant     # the 1.9B giant on one GPU, kernels on and off
#   cluster/gpu_measure.sh all
#
# Run from the repository root. Results go to $OUT (default gpu_results/): logs, the kernel
# table (kernels_table.md), the giant's metrics and profile, and giant_table.md. Wheels the
# machine lacks (deepspeed, webdataset, ...) are installed from .whl/ when it exists: fetch them
# where the package index is reachable with ../shared/gpu/wheels.sh .whl (or pip download).
set -uo pipefail
stage=${1:-all}
case "$stage" in kernels|giant|all) ;; *)
  echo "usage: $0 kernels|giant|all (got '$stage')" >&2; exit 2 ;;
esac
out=${OUT:-gpu_results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: these measurements need a GPU'" || exit 2
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$out/env.txt"

status=0
if [ "$stage" = kernels ] || [ "$stage" = all ]; then
  timeout 200 python3 -m pytest tests/kernels -m gpu -q -p no:cacheprovider 2>&1 | tee "$out/kernel_gpu_tests.txt" || status=1
  timeout 330 python3 -m megatron_style.benchmarks.kernels --out "$out/kernels_table.md" 2>&1 | tee "$out/kernels_bench.log" || status=1
fi

if [ "$stage" = giant ] || [ "$stage" = all ]; then
  for kernels in triton reference; do
    # one micro-batch per step (the recipe's 6144 would be 128 of them on one GPU)
    args=(--config configs/pretrain/giant.yaml data.source=synthetic data.global_batch_size=48
          steps=30 logging.every_steps=5
          logging.progress=lines checkpoint.save=false "model.kernels=$kernels"
          "checkpoint.dir=/tmp/giant_ckpt_$kernels" logging.dir="$out/giant_$kernels")
    # the kernels-on run also writes a profile of steps 26-27 (trace, top ops, memory snapshot)
    [ "$kernels" = triton ] && args+=(logging.profile_at_step=26 logging.profile_steps=2)
    timeout 280 python3 -m megatron_style.train.pretrain "${args[@]}" 2>&1 | tee "$out/giant_$kernels.log" || status=1
  done
  python3 -m megatron_style.cli.run_summary "$out/giant_triton/metrics.jsonl" \
    "$out/giant_reference/metrics.jsonl" --skip 10 --names "kernels on (triton),kernels off (reference)" \
    2>&1 | tee "$out/giant_table.md" || status=1
fi
exit $status
