#!/usr/bin/env bash
# Every GPU code path of psdclip as a very short run, one PASS/FAIL line per check (docs/reference.md, "Device check").
#
#   bash bench/device_prepare.sh            # first, where PyPI is reachable: the wheels the GPU machine lacks
#   bash bench/device_check.sh              # on the GPU machine: install them, run the checks, then the bench
#   bash bench/device_check.sh --no-bench   # the checks only;   --bench-only: the throughput bench only
#   bash bench/device_check.sh --cpu        # the same checks on CPU with the tiny model (tests/test_device_check.py)
#
# Runs train on generated Fashion-MNIST-format files under $DEVICE_CHECK_DIR (default: a new temporary folder).
# DEVICE_CHECK_SKIP="compile bench" skips checks by id (printed SKIP); DEVICE_CHECK_ONLY="compile syncs" runs only
# those (install and device always run). Each PASS line ends with the check's seconds, to plan the next lease by. Exits
# non-zero when a check fails; a failing check prints its log's tail.
# shellcheck disable=SC2317  # the check functions run through check(), which shellcheck cannot follow
set -euo pipefail
cd "$(dirname "$0")/.."

mode=gpu run_checks=1 run_bench=1
for arg in "$@"; do
  case "$arg" in
    --cpu) mode=cpu ;;
    --no-bench) run_bench=0 ;;
    --bench-only) run_checks=0 ;;
    *)
      echo "usage: bash bench/device_check.sh [--cpu] [--no-bench | --bench-only]" >&2
      exit 2
      ;;
  esac
done

python=${PYTHON:-python3}
work=${DEVICE_CHECK_DIR:-$(mktemp -d -t device_check.XXXXXX)}
mkdir -p "$work"
export PYTHONUNBUFFERED=1
failed=0

if [[ $mode == gpu ]]; then
  steps=5 batch=64 workers=2 # 2 workers share the 4 training shards evenly
  single=(trainer=gpu model=vit_b32)
  ddp=(trainer=ddp trainer.devices=1 model=vit_b32)
  # one round: four trainers' start-ups did not fit 180 s on the first H200 lease (docs/device_runs.md)
  bench=(--model vit_b32 --precision bf16 --batch-size 256 --workers 8 --rounds 1)
else
  steps=3 batch=16 workers=0
  single=(trainer=cpu model=vit_tiny)
  # 2 processes over gloo with the GPU strategy's DDP settings (conf/trainer/ddp.yaml)
  ddp=(trainer=ddp_cpu model=vit_tiny +trainer.strategy.static_graph=true +trainer.strategy.gradient_as_bucket_view=true)
  bench=(--model vit_tiny --precision fp32 --batch-size 32 --workers 1 --rounds 1 --warmup 1 --measure 2
    --only open_clip "psdclip clip" "psdclip psd")
fi
common=(
  debug=tiny
  "paths.fashion_mnist_dir=$work/fashion"
  "paths.cache_dir=$work/cache"
  trainer.precision=bf16-mixed
  trainer.enable_progress_bar=false
  "trainer.max_steps=$steps"
  "data.batch_size=$batch"
  "data.num_workers=$workers"
  data.shard_size=100
  "~callbacks.media"
)
no_evaluation=("~callbacks.evaluation")
# the EMA teacher's targets from the first step (alpha > 0 throughout), as the throughput bench times it
psd_from_start=(loss=psd loss.schedule=constant)

# check ID NAME [--show N] COMMAND...: runs COMMAND, its output to a log; PASS with the log's last line and the
# seconds it took (and its "  >" detail lines, or its last N lines with --show), or FAIL with the log's tail; SKIP
# when DEVICE_CHECK_SKIP names ID, or DEVICE_CHECK_ONLY does not (install and device are prerequisites: never skipped)
check() {
  local id=$1 name=$2 show=1 log started
  shift 2
  if [[ " ${DEVICE_CHECK_SKIP:-} " == *" $id "* ]]; then
    echo "SKIP $name (DEVICE_CHECK_SKIP)"
    return
  fi
  if [[ -n ${DEVICE_CHECK_ONLY:-} && " install device $DEVICE_CHECK_ONLY " != *" $id "* ]]; then
    echo "SKIP $name (not in DEVICE_CHECK_ONLY)"
    return
  fi
  if [[ $1 == --show ]]; then
    show=$2
    shift 2
  fi
  log="$work/$id.log"
  started=$SECONDS
  if "$@" >"$log" 2>&1; then
    echo "PASS $name: $(tail -n 1 "$log") [$((SECONDS - started)) s]"
    if ((show > 1)); then tail -n "$show" "$log" | head -n -1 | sed 's/^/    /'; fi
    grep '^  > ' "$log" | sed 's/^  > /    /' || true
  else
    echo "FAIL $name after $((SECONDS - started)) s (log: $log)"
    tail -n 40 "$log" | sed 's/^/    /'
    failed=$((failed + 1))
  fi
}

# train NAME OVERRIDES...: a short train.py run whose run folder lies under $work/runs/NAME
# (check runs its command as an if-condition, where set -e does not stop at a failure: each step is chained with &&)
train() {
  local name=$1
  shift
  "$python" train.py "${common[@]}" "paths.log_dir=$work/runs/$name" "$@"
}

verify() {
  "$python" -m bench.device_check "$@"
}

last_checkpoint() {
  local runs=("$work"/runs/"$1"/train/runs/*)
  echo "${runs[-1]}/checkpoints/last.ckpt"
}

install() {
  # CPU mode checks the imports only: it must not reinstall the machine's editable psdclip
  if [[ $mode == gpu && -d bench/wheels ]]; then
    # the wheels bench/device_prepare.sh fetched; everything else (torch first) is the machine's own
    "$python" -m pip install -q --no-index --find-links bench/wheels -r bench/wheels/requirements.txt &&
      "$python" -m pip install -q --no-index --no-deps --no-build-isolation -e . || return
  fi
  "$python" -c "import open_clip, webdataset, hydra, omegaconf, lightning, psdclip; print('psdclip at', psdclip.__file__)"
}

single_run() {
  train single "${single[@]}" "${psd_from_start[@]}" "evaluation.tasks=[zeroshot,linear_probe,retrieval]" &&
    verify losses "$work/runs/single" --step "$steps"
}

resume() {
  train resumed "${single[@]}" "${no_evaluation[@]}" "ckpt_path=$(last_checkpoint single)" \
    "trainer.max_steps=$((steps + 2))" &&
    verify losses "$work/runs/resumed" --step $((steps + 2))
}

export_and_load() {
  "$python" -m psdclip.tools.export "ckpt=$(last_checkpoint single)" "out=$work/exported" weights=ema &&
    verify open-clip "$work/exported"
}

ddp_run() {
  train "$1" "${ddp[@]}" "${no_evaluation[@]}" "${@:2}" &&
    verify losses "$work/runs/$1" --step "$steps"
}

single_setting() {
  train "$1" "${single[@]}" "${no_evaluation[@]}" "${@:2}" &&
    verify losses "$work/runs/$1" --step "$steps"
}

compiled() {
  # TORCH_LOGS writes to stderr: kept beside the check's log, then counted
  TORCH_LOGS=recompiles,graph_breaks single_setting compiled model.compile=true 2>&1 | tee "$work/compiled.torch_log" &&
    verify compiled "$work/compiled.torch_log"
}

host_syncs() {
  # steps 3 to 7 (CPU: 2 to 3), after the first steps' one-off work and before the last step's end-of-run work, at
  # the default logging interval (the guard and the throughput figure wait for the device only when they log)
  local first=2 last=7
  if [[ $mode == cpu ]]; then first=1 last=3; fi
  train syncs "${single[@]}" "${no_evaluation[@]}" "${psd_from_start[@]}" "trainer.max_steps=$((last + 1))" \
    trainer.log_every_n_steps=10 \
    +callbacks.syncs._target_=bench.sync_window.SyncWindow "+callbacks.syncs.first=$first" \
    "+callbacks.syncs.last=$last" >"$work/syncs.out" 2>&1 &&
    grep -e '^  > ' -e '^host syncs' "$work/syncs.out"
}

check install "install: wheels and psdclip on the machine's torch" install
if ((run_checks)); then
  gpu_flag=()
  if [[ $mode == gpu ]]; then gpu_flag=(--require-gpu); fi
  check device "CUDA visible, driver version" verify device "${gpu_flag[@]}"
  verify data "$work/fashion" >/dev/null
  check single "${single[0]}, bf16, EMA teacher from step 0, evaluation" single_run
  check teacher "EMA teacher (loss=psd, alpha > 0 from step 0)" verify teacher "$work/runs/single"
  check evaluation "evaluation: zero-shot, linear probe, retrieval" verify evaluation "$work/runs/single"
  check resume "resume from last.ckpt" resume
  check export "export, load in open_clip" export_and_load
  check ddp "${ddp[0]}" ddp_run ddp
  check micro_batches "micro-batches under DDP (optim.micro_batches=2)" ddp_run ddp_micro_batches optim.micro_batches=2
  check grad_checkpointing "gradient checkpointing" single_setting grad_checkpointing model.grad_checkpointing=true
  check compile "model.compile=true" compiled
  check syncs "host syncs per step (set_sync_debug_mode)" host_syncs
fi
if ((run_bench)); then
  check bench "throughput against open_clip's trainer" --show 10 "$python" -m bench.train_throughput "${bench[@]}"
fi

echo "$failed check(s) failed; logs and runs in $work"
exit $((failed > 0))
