#!/usr/bin/env bash
# The checks that need an accelerator, in one run of at most 8 minutes, on whatever the machine
# has (CUDA, an NPU; on a CPU-only machine they run on the CPU and show nothing new): the patch
# report, the parity and fused-op tests, where the engine's tensors live after a step
# (bench/placement_check.py), a TP=1 pretrain stopped at 4 and resumed to 8 (the resumed
# iterations must equal the uninterrupted run's), TP=2 where there are two devices, greedy and
# beam generation against HF, and the step bench.  Each step has its own time limit; its log
# goes to $OUT (or /tmp/accelerator_check); the end is one line per step and the exit code is
# the number of steps that failed.
#
# On this workplace's GPU machines (no network; python3 there has torch, transformers,
# sentencepiece, wrapt), carry megatron-core and what else is missing as wheels, fetched here:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl megatron-core==0.19.2
# and run with `carry: [.whl, ../shared/fixtures copied to .fixtures]`:  bash bench/accelerator_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/accelerator_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD" OUT PY
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
fi
FIXTURES=${FIXTURES:-$( [ -d .fixtures ] && echo "$PWD/.fixtures" || echo "$PWD/../shared/fixtures" )}
devices=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
summary=()
failed=0
step() {  # name, seconds, command...
    local name=$1 limit=$2 t rc
    shift 2
    t=$(date +%s)
    timeout "$limit" bash -c "$(declare -f pretrain resume_equal)"'; "$@"' _ "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    [ $rc -ne 0 ] && failed=$((failed + 1))
    summary+=("$name: exit $rc in $(( $(date +%s) - t )) s (log $OUT/$name.log)")
    echo "${summary[-1]}"
    tail -n 3 "$OUT/$name.log"
}

pretrain() {  # save folder, nproc, extra flags...
    local save=$1 nproc=$2
    shift 2
    "$PY" -m torch.distributed.run --nproc-per-node "$nproc" -m recipes.pretrain --model llama2-tiny \
        --data-path "${data}_output_document" --tokenizer-name-or-path "$tok" --train-iters 8 --seq-length 64 \
        --log-interval 1 --save-interval 4 --save "$save" "$@"
}
resume_equal() {  # nproc, extra flags...: the full run, the stopped run, the resumed run; equal losses
    local nproc=$1 dir
    shift
    dir=$(mktemp -d "$OUT/resume.XXXX")
    pretrain "$dir/full" "$nproc" "$@" && pretrain "$dir/part" "$nproc" --exit-after-iters 4 "$@" &&
        pretrain "$dir/part" "$nproc" --load "$dir/part" "$@" &&
        "$PY" -c "import json, sys
a, b = ([json.loads(l)['loss'] for l in open(sys.argv[i] + '/metrics.jsonl')] for i in (1, 2))
print('losses', a); print('resumed', b); sys.exit(0 if a == b and len(a) == 8 else 1)" "$dir/full" "$dir/part"
}
export data="$OUT/data/alpaca" tok="$FIXTURES/stories260K/tokenizer.model"
step report 40 "$PY" -m ascend_patches
step data 20 "$PY" -m recipes.preprocess_data --input "$FIXTURES/alpaca/alpaca_data_sample.json" \
    --tokenizer-name-or-path "$FIXTURES/stories260K/tokenizer.model" --output-prefix "$data" --json-keys output \
    --append-eod
step parity 80 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_parity.py tests/test_ops.py
step placement 40 "$PY" bench/placement_check.py --data-path "${data}_output_document" --tokenizer-name-or-path "$tok"
step pretrain_tp1_resume 90 resume_equal 1
if [ "$devices" -ge 2 ]; then
    step pretrain_tp2_resume 90 resume_equal 2 --tensor-model-parallel-size 2
else
    summary+=("pretrain_tp2_resume: not run: $devices accelerator(s); TP=2 needs two (NCCL takes one rank per device)")
fi
step generate_hf 60 "$PY" -m pytest -q -x -p no:cacheprovider \
    "tests/test_generate.py::test_greedy_and_beam_search_equal_hf_generate[tp1]"
step bench_step 60 "$PY" bench/bench_step.py --shape cpu --steps 3
echo "== accelerator check on $("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')")"
printf '%s\n' "${summary[@]}"
exit $failed
