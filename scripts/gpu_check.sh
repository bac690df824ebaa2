#!/usr/bin/env bash
# One prepared command for a short GPU window: environment, CUDA-only tests, benchmarks, report.
#
#   scripts/gpu_check.sh OUT_DIR          on an H100/H200 (whole run < 8 min, cold compile caches)
#   scripts/gpu_check.sh --cpu OUT_DIR    dry run on a CPU: the same steps with the CPU subset,
#                                         kernels through TRITON_INTERPRET=1 (what CI runs)
#   scripts/gpu_check.sh --plan [--cpu]   print the steps' commands and limits, run nothing
#
# Runs from a source checkout, nothing installed: PYTHONPATH is the repository root, so
# `eos_kernels` is imported from the tree (and `eos_kernels.integrations` from ./integrations,
# through the finder in eos_kernels/__init__.py). Python is $PYTHON (default python3).
#
# Steps, in order; each is time-boxed with `timeout` (SIGINT first, so pytest still writes its
# junit XML and benchmark JSON; SIGKILL after a grace period) and the run continues past a
# failing or timed-out step:
#   1. env                    the environment record (env.json)
#   2. tests-kernels          CUDA-only kernel tests: operator fwd + 8 gradients at LLaVA-1.5-7B
#                             shapes, fp32/fp16/bf16, awkward shapes, importance kernel
#   3. tests-model            patched tiny LLaVA on CUDA (cache == no cache, padded batches, sdpa),
#                             tiny Qwen2.5-VL / LLaVA-NeXT / LLaVA-OneVision on CUDA (ragged batches,
#                             cache == no cache fp32/bf16, kernels vs the CPU reference),
#                             a few search steps in bf16 with the fused kernels
#   4. bench-operator-headline          fused + eager, fwd and fwd+bwd, B in {1,32}, K=64, bf16
#   5. bench-operator-headline-compile  torch.compile of the same 4 cases
#   6. bench-importance                 the importance kernel grid
#   7. bench-e2e-r64                    end-to-end prefill at r=64 (+ unpatched, vision tower)
#   8. bench-operator-grid              the rest of the operator grid, fused + eager
#   9. bench-e2e-rest                   the other budgets and the decode step
#  10. bench-search-step                one search step: hard (fused vs reference) and relaxed
#  11. bench-e2e-families              stock vs reduced (1/9) prefill of the newer families at their
#                                       vision towers, random weights, LLaVA-7B's decoder sizes (InternVL,
#                                       Gemma 3, Qwen3-VL; as time allows)
#  12. bench-lmms-eval                  the lmms-eval plugin's throughput, batch 1 and 8 (as time allows;
#                                       skips where lmms-eval is not importable: carry it, README)
#  13. bench-operator-compile-grid      the rest of the torch.compile grid (as time allows)
#  14. tests-full-suites                tests/test_eos_reduce.py + test_importance.py compiled on CUDA
#                                       (as time allows)
#  15. report                           python -m bench.report on bench.json (met/missed/not measured)
# A step gets min(its own limit, what is left of the budget); with nothing left it is skipped.
# With --cpu each step runs its CPU subset (EOS_CUDA_TESTS_ON_CPU=1 for the CUDA-only tests,
# TRITON_INTERPRET=1, EOS_BENCH_MAX_ROUNDS=1, CUDA hidden); steps 5 and 11-14 are skipped there.
#
# OUT_DIR (created; must be empty) receives at most 8 files, each well under 16 MB:
#   env.json      step 1's record (GPU, driver, CUDA, versions, commit, sanity checks)
#   steps.json    every step: status (ok/failed/timeout/skipped/empty), exit code, seconds, limit,
#                 test counts, first failures with their messages, log tail; the targets at the end
#   bench.json    the benchmark steps' pytest-benchmark JSON merged (per-round samples dropped)
#   report.md + up to 3 PNG plots     python -m bench.report (plots need matplotlib)
#   logs.tar.gz   full logs (tracebacks: --tb=long) and junit XML of every step
# steps.json, bench.json and logs.tar.gz are rewritten after every step.
#
# Environment:
#   GPU_CHECK_BUDGET=s     seconds for the whole run, report included (default 470 on a GPU, 420 with
#                          --cpu). The limits of steps 1-10 and 13 sum to 480 s, set from the first
#                          H200 run (bench/results/h200: cold compile caches; the test steps need
#                          most of it); a step gets what is left when that is less, and steps 11-14
#                          run only in what the earlier steps left (90, 60, 120 and 120 s at most).
#   GPU_CHECK_INJECT=name:fail[,name:hang]   replace a step by a deliberate failure / a hang
#                          (a hang is cut by the step's timeout, at most GPU_CHECK_HANG_S=3 s)
#   GPU_CHECK_COMMIT=sha   recorded in env.json when the checkout has no .git
#   PYTHON=...             the interpreter (default python3)
set -u

usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; }

MODE=gpu
PLAN=0
OUT_ARG=
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) MODE=cpu ;;
        --plan) PLAN=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu_check: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) if [ -n "$OUT_ARG" ]; then echo "gpu_check: one OUT_DIR only" >&2; exit 2; fi; OUT_ARG=$1 ;;
    esac
    shift
done
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
if [ "$PLAN" = 1 ]; then
    OUT=OUT_DIR; WORK=WORK
else
    if [ -z "$OUT_ARG" ]; then usage >&2; exit 2; fi
    mkdir -p "$OUT_ARG" || exit 2
    if [ -n "$(ls -A "$OUT_ARG")" ]; then
        echo "gpu_check: $OUT_ARG is not empty (the run must own its output folder)" >&2
        exit 2
    fi
    OUT=$(cd "$OUT_ARG" && pwd)
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
    mkdir -p "$WORK/logs" "$WORK/junit" "$WORK/bench"
    trap 'rm -rf "$WORK"' EXIT
fi

cd "$REPO" || exit 2
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ "$MODE" = cpu ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES="" EOS_CUDA_TESTS_ON_CPU=1
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} EOS_BENCH_CPU_THREADS=${EOS_BENCH_CPU_THREADS:-1}
    export EOS_BENCH_MAX_ROUNDS=${EOS_BENCH_MAX_ROUNDS:-1}
    # limits with room for a shared machine (the CI suite runs beside it under pytest -n 2): ~45-90 s
    # each when the 2 cores are free, up to twice that when another test process runs
    BUDGET=${GPU_CHECK_BUDGET:-420}; GRACE=5; MIN_STEP=3; REPORT_LIMIT=40
    MODEL_LIMIT=180   # tests-model: the interpreted kernels of four tiny model families
    KERNELS_LIMIT=160
else
    unset TRITON_INTERPRET EOS_CUDA_TESTS_ON_CPU EOS_BENCH_MAX_ROUNDS
    BUDGET=${GPU_CHECK_BUDGET:-470}; GRACE=10; MIN_STEP=15; REPORT_LIMIT=20
    MODEL_LIMIT=90   # tests-model: 32 s warm on an H200, cut at 60 s with cold Triton caches
    KERNELS_LIMIT=130   # tests-kernels: 63 s warm on an H200, 72 % done at 80 s cold (each awkward shape recompiles)
fi
INJECT=${GPU_CHECK_INJECT:-}
HANG_S=${GPU_CHECK_HANG_S:-3}
T0=$(date +%s)
# the steps before the report end by DEADLINE; the report keeps its own time inside the budget
DEADLINE=$((T0 + BUDGET - REPORT_LIMIT - GRACE - 5))
[ "$PLAN" = 1 ] || {
    echo "mode=$MODE"; echo "start_epoch=$T0"; echo "start_utc=$(date -u +%Y-%m-%dT%H:%M:%S+00:00)"
    echo "budget_s=$BUDGET"; echo "inject=$INJECT"
} > "$WORK/meta.env"

say() { [ "$PLAN" = 1 ] && return; echo "[gpu_check $(( $(date +%s) - T0 ))s] $*" | tee -a "$WORK/run.log"; }
collect() { [ "$PLAN" = 1 ] && return; "$PY" "$REPO/scripts/gpu_check_collect.py" "$1" "$WORK" "$OUT" 2>>"$WORK/run.log" || say "collect $1 failed"; }

# pytest options shared by every pytest step: full tracebacks, junit XML with output, slowest tests
PYTEST=("$PY" -m pytest -p no:cacheprovider --tb=long -rfEs -o junit_logging=all
        -o faulthandler_timeout=60 --durations=15)
TESTS=(-v)
BENCH=(--benchmark-only -p no:hypothesispytest --benchmark-sort=fullname
       --benchmark-columns=min,median,max,rounds)
if [ "$MODE" = cpu ]; then
    BENCH+=(--benchmark-max-time=0.02 --benchmark-min-rounds=1)
    BENCH_LONG=(); BENCH_SHORT=()
else
    BENCH_LONG=(--benchmark-max-time=0.5); BENCH_SHORT=(--benchmark-max-time=0.2)
fi

STEP=0
# run_step NAME KIND LIMIT_S [skip:REASON | --] COMMAND...
#   KIND: env | test | bench | report. For test/bench steps the junit XML (and benchmark JSON)
#   paths are appended to the command.
run_step() {
    local name=$1 kind=$2 limit=$3; shift 3
    local skip_reason=
    if [ "${1:-}" != "--" ]; then skip_reason=${1#skip:}; fi
    shift
    STEP=$((STEP + 1))
    local idx; idx=$(printf '%02d' "$STEP")
    local log="logs/$idx-$name.log" junit= bench= note= status rc=0 secs=0
    local cmd=("$@")
    case "$kind" in
        test) junit="junit/$idx-$name.xml"; cmd+=(--junitxml="$WORK/$junit") ;;
        bench) junit="junit/$idx-$name.xml"; bench="bench/$idx-$name.json"
               cmd+=(--junitxml="$WORK/$junit" --benchmark-json="$WORK/$bench") ;;
    esac
    if [ "$PLAN" = 1 ]; then   # idx, name, kind, limit, skip reason, command (shell-quoted)
        printf '%s\t%s\t%s\t%s\t%s\t' "$idx" "$name" "$kind" "$limit" "$skip_reason"
        printf ' %q' "${cmd[@]}"; echo
        return
    fi
    local now; now=$(date +%s)
    local left=$((DEADLINE - now - GRACE))
    if [ "$kind" = report ]; then left=$limit; fi   # the report always runs (its time is kept aside)
    local t=$limit
    if [ "$left" -lt "$t" ]; then t=$left; fi
    local out_of_time=0
    if [ "$t" -lt "$MIN_STEP" ]; then out_of_time=1; fi
    case ",$INJECT," in
        *",$name:fail,"*) cmd=(bash -c "echo 'gpu_check: step $name failed on purpose (GPU_CHECK_INJECT)' >&2; exit 3")
                          note="injected failure" ;;
        *",$name:hang,"*) cmd=(sleep 100000); note="injected hang"
                          if [ "$HANG_S" -lt "$t" ]; then t=$HANG_S; fi ;;
    esac
    {
        echo "# step $idx $name ($kind), limit ${t}s of ${limit}s, mode $MODE"
        echo "# cwd $REPO"
        printf '# command:'; printf ' %q' "${cmd[@]}"; echo
        echo "# started $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    } > "$WORK/$log"
    if [ -n "$skip_reason" ]; then
        status=skipped; rc=-1; note=$skip_reason
        echo "# skipped: $skip_reason" >> "$WORK/$log"
    elif [ "$out_of_time" = 1 ]; then
        status=skipped; rc=-1; note="out of time budget (${left}s left)"
        echo "# skipped: $note" >> "$WORK/$log"
    else
        local start_ns; start_ns=$(date +%s%N)
        timeout -s INT -k "$GRACE" "$t" "${cmd[@]}" >> "$WORK/$log" 2>&1 < /dev/null
        rc=$?
        secs=$(( ($(date +%s%N) - start_ns) / 1000000 ))
        secs=$(printf '%d.%03d' $((secs / 1000)) $((secs % 1000)))
        case $rc in
            0) status=ok ;;
            124) status=timeout; note="${note:+$note; }stopped after ${t}s (SIGINT)" ;;
            137) status=timeout; note="${note:+$note; }killed (SIGKILL after ${t}s + ${GRACE}s, or out of memory)" ;;
            5) if [ "$kind" = test ] || [ "$kind" = bench ]; then status=empty; note="${note:+$note; }no test selected"
               else status=failed; fi ;;
            *) status=failed ;;
        esac
        echo "# finished $(date -u +%Y-%m-%dT%H:%M:%SZ): exit $rc, ${secs}s, $status" >> "$WORK/$log"
    fi
    local cmdtext; cmdtext=$(printf ' %q' "${cmd[@]}")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$STEP" "$name" "$kind" "$status" "$rc" "$secs" \
        "$t" "$log" "$junit" "$bench" "$note" "${cmdtext# }" >> "$WORK/steps.tsv"
    say "$idx $name: $status (exit $rc, ${secs}s of ${t}s)${note:+ - $note}"
    collect update
}

say "mode $MODE, budget ${BUDGET}s, output $OUT, python $(command -v "$PY")"

# ---------------------------------------------------------------------------- 1. environment
ENV_ARGS=("$OUT/env.json"); if [ "$MODE" = gpu ]; then ENV_ARGS+=(--expect-cuda); fi
run_step env env 20 -- "$PY" scripts/gpu_check_env.py "${ENV_ARGS[@]}"

# ---------------------------------------------------------------------------- 2. CUDA-only tests
run_step tests-kernels test "$KERNELS_LIMIT" -- "${PYTEST[@]}" "${TESTS[@]}" \
    tests/test_cuda_kernels.py \
    tests/test_eos_reduce.py::test_gpu_llava_shapes tests/test_eos_reduce.py::test_gpu_inference_fast_path_bf16 \
    tests/test_importance.py::test_gpu_llava7b_shapes
# the families last: a step cut at its limit keeps the results of the earlier files
run_step tests-model test "$MODEL_LIMIT" -- "${PYTEST[@]}" "${TESTS[@]}" \
    tests/test_cuda_search.py::test_search_steps_bf16_fused_kernels tests/test_cuda_patch_llava.py \
    tests/test_cuda_search.py::test_fused_and_reference_agree_on_the_device tests/test_cuda_patch_families.py

# ---------------------------------------------------------------------------- 3. benchmarks
HEADLINE="(B1-K64-bf16 or B32-K64-bf16)"
if [ "$MODE" = gpu ]; then
    run_step bench-operator-headline bench 30 -- "${PYTEST[@]}" "${BENCH[@]}" "${BENCH_LONG[@]}" \
        bench/test_bench_operator.py -k "cuda and not compile and $HEADLINE"
    run_step bench-operator-headline-compile bench 50 -- "${PYTEST[@]}" "${BENCH[@]}" "${BENCH_LONG[@]}" \
        bench/test_bench_operator.py -k "cuda-compile and $HEADLINE"
    run_step bench-importance bench 25 -- "${PYTEST[@]}" "${BENCH[@]}" "${BENCH_LONG[@]}" \
        bench/test_bench_importance.py -k "cuda"
    run_step bench-e2e-r64 bench 35 -- "${PYTEST[@]}" "${BENCH[@]}" \
        bench/test_bench_e2e.py -k "cuda and not family and (vision or (prefill and (unpatched or r64)))"
    # on the first H200 run 20 s measured about half of this grid (57 cases) and 1 case of each step after it
    run_step bench-operator-grid bench 25 -- "${PYTEST[@]}" "${BENCH[@]}" "${BENCH_SHORT[@]}" \
        bench/test_bench_operator.py -k "cuda and not compile and not $HEADLINE"
    run_step bench-e2e-rest bench 25 -- "${PYTEST[@]}" "${BENCH[@]}" \
        bench/test_bench_e2e.py -k "cuda and not family and not vision and not (prefill and (unpatched or r64))"
    # the hard step (fused and reference) and the relaxed step of the default search (decision 7)
    run_step bench-search-step bench 30 -- "${PYTEST[@]}" "${BENCH[@]}" \
        bench/test_bench_search_step.py -k "cuda"
    run_step bench-e2e-families bench 90 -- "${PYTEST[@]}" "${BENCH[@]}" \
        bench/test_bench_e2e.py -k "cuda and family"
    run_step bench-lmms-eval bench 60 -- "${PYTEST[@]}" "${BENCH[@]}" \
        bench/test_bench_lmms_eval.py -k "cuda"
    run_step bench-operator-compile-grid bench 120 -- "${PYTEST[@]}" "${BENCH[@]}" "${BENCH_SHORT[@]}" \
        bench/test_bench_operator.py -k "cuda-compile and not $HEADLINE"
    run_step tests-full-suites test 120 -- "${PYTEST[@]}" "${TESTS[@]}" \
        tests/test_eos_reduce.py tests/test_importance.py
else
    # the CPU subset of each suite (PyTorch paths; torch.compile on a CPU is too slow for a dry run)
    run_step bench-operator-headline bench 30 -- "${PYTEST[@]}" "${BENCH[@]}" \
        bench/test_bench_operator.py -k "cpu-torch-B1-K64"
    run_step bench-operator-headline-compile bench 30 "skip:GPU only (inductor's CPU compile is too slow for a dry run)" \
        "${PYTEST[@]}" "${BENCH[@]}" bench/test_bench_operator.py -k "cpu-compile-B1-K64"
    run_step bench-importance bench 20 -- "${PYTEST[@]}" "${BENCH[@]}" \
        bench/test_bench_importance.py -k "cpu-torch-B1-T16"
    run_step bench-e2e-r64 bench 45 -- "${PYTEST[@]}" "${BENCH[@]}" \
        bench/test_bench_e2e.py -k "cpu and not family and (vision or (prefill and (unpatched or paper-r64)))"
    run_step bench-operator-grid bench 20 -- "${PYTEST[@]}" "${BENCH[@]}" \
        bench/test_bench_operator.py -k "cpu-torch-B1-K16 and not fwdbwd"
    run_step bench-e2e-rest bench 30 -- "${PYTEST[@]}" "${BENCH[@]}" \
        bench/test_bench_e2e.py -k "cpu and decode and paper-r64"
    run_step bench-search-step bench 40 -- "${PYTEST[@]}" "${BENCH[@]}" \
        bench/test_bench_search_step.py -k "cpu-torch"
    run_step bench-e2e-families bench 30 "skip:GPU only (the CPU subset: pytest bench/test_bench_e2e.py -k 'cpu and family')" \
        "${PYTEST[@]}" "${BENCH[@]}" bench/test_bench_e2e.py -k "cpu and family"
    run_step bench-lmms-eval bench 30 "skip:GPU only (the CPU figures: bench/results/cpu-2core-lmms-eval)" \
        "${PYTEST[@]}" "${BENCH[@]}" bench/test_bench_lmms_eval.py -k "cpu-B1"
    run_step bench-operator-compile-grid bench 30 "skip:GPU only (inductor's CPU compile is too slow for a dry run)" \
        "${PYTEST[@]}" "${BENCH[@]}" bench/test_bench_operator.py -k "cpu-compile"
    run_step tests-full-suites test 30 "skip:GPU only (CI runs these suites under the interpreter)" \
        "${PYTEST[@]}" "${TESTS[@]}" tests/test_eos_reduce.py tests/test_importance.py
fi

# ---------------------------------------------------------------------------- 4. report
if [ -f "$OUT/bench.json" ] || [ "$PLAN" = 1 ]; then
    run_step report report "$REPORT_LIMIT" -- "$PY" -m bench.report "$OUT/bench.json" --out "$OUT"
else
    run_step report report "$REPORT_LIMIT" "skip:no benchmark results (bench.json) to report on" \
        "$PY" -m bench.report "$OUT/bench.json" --out "$OUT"
fi

[ "$PLAN" = 1 ] && exit 0
collect final
say "done in $(( $(date +%s) - T0 ))s: $OUT"
exit 0
