#!/usr/bin/env bash
# The one script run on the GPU machine (see the device tool). Usage: scripts/device_run.sh ARG...
# Each ARG is a SECTION, or lanes run side by side on the one GPU: 'A;B+C;D' runs A then B while C then D
# run (small models leave the GPU mostly idle, so two trainings at once take little longer than one; do
# not time benchmarks beside a lane). At the end every *.metrics.jsonl under $OUT goes into one
# train-metrics.tgz (at most 8 files come back).
# Sections (run in the order given, each bounded by its own timeout, outputs under $OUT):
#   tests        the GPU tests but the slow ones (fp32 fla kernels: minutes of compiling); this and pytest:FILES print
#                a line per test with the time it finished, so a run cut by its timeout still shows where the time went
#   tests-model  the GPU tests of the model (fast paths against the CPU paths, cache and offload, a training step)
#   hsa          HSA GPU tests + ramba bench kernels (ramba/bench/hsa.py; beside .carry/hsa_triton_v2.py's kernels when carried:
#                git show 9efe38d:ramba/ops/hsa/triton.py > .carry/hsa_triton_v2.py)
#                HSA_BLOCK_TOKENS=1,2,8: the forward also timed with those tokens per tile (hsa_bt*_fwd_ms);
#                HSA_BASELINE=FILE: the earlier kernels timed beside (default .carry/hsa_triton_v2.py when carried);
#                HSA_TESTS=0: the benchmark alone (the tests ran in an earlier section, e.g. pytest:tests/gpu/test_hsa_gpu.py)
#   hsa-sweep    ramba bench kernels --sweep: the other supported shapes (beside the same baseline)
#   ssd[:KEXPR]  the GPU tests of the SSD fast paths but the slow ones (those pytest -k KEXPR selects)
#   train[:PRESETS[:ARCHS[:LENGTHS[:FLAGS]]]]
#                ramba bench train (default the 370m and tiny layouts, RAMba, Mamba-2 and Transformer, 4K and
#                16K; gradient checkpointing where one sequence does not fit; the CUDA graph unless --fused-loss); FLAGS: more options, comma-separated
#                (e.g. --fused-loss; the results file stem gets them and LENGTHS); environment: BENCH_TOKENS tokens a step
#                (default 16384), BENCH_STEPS timed steps (default 15), BENCH_NAME results file stem (default bench_train),
#                BENCH_FLAGS more options (e.g. --fused-loss)
#   train-eager[:PRESETS[:ARCHS[:LENGTHS[:FLAGS]]]]
#                the same with --no-compile-glue (the mixers' element-wise work in eager PyTorch; bench_train-eager)
#   train-graph[:PRESETS[:ARCHS[:LENGTHS[:FLAGS]]]]
#                the same with --cuda-graph (the default since 2026-12-01; bench_train-graph)
#   suite-cold   issue 18's build item 3: the whole GPU suite (`pytest -m gpu tests/gpu`, the README's command) on empty
#                Triton and Inductor caches, timed (bounded by TESTS_SECONDS, default 420); gpu-suite-cold.xml (JUnit) under $OUT
#   pytest:FILES the GPU tests of FILES (space-separated test paths), bounded by TESTS_SECONDS (default 300)
#   tests-graph  the GPU tests of the CUDA-graph training step (tests/gpu/test_cuda_graph_gpu.py)
#   tests-nsa    the GPU tests of the NSA baseline (fla's kernels vs the torch path; tests/gpu/test_nsa_gpu.py)
#   profile:PRESET:ARCHS:LENGTH
#                ramba bench train --profile for the comma-separated architectures (BENCH_TOKENS a step, default 8192): a table of
#                the kernels by device time per model under $OUT/profile/
#   inference    ramba bench inference (tiny preset, 4K..64M, offload)
#   prefill-ablation[:LENGTH]
#                issue 16 item 4: bench_inference.py at LENGTH (default 16m, fast mode, offload) three ways: mamba_ssm SSD
#                with eager glue (today's inference), mamba_ssm with compiled glue, fla's SSD with eager glue
#   inference-long[:LENGTHS[:DEPTHS]]
#                issue 16: the shipped model's passkey (fast mode, offload, segments of 65536, python-doc haystack: run
#                corpus first) at LENGTHS (default 128m,256m) x DEPTHS (default 0,0.5,1), 1 sample;
#                passkey-ramba-long-LENGTHS-DEPTH.json/.png, one eval a depth (about 125 s a sample at 128M, 250 s at
#                256M, plus the exit's unpinning); LONG_SECONDS bounds each (default 400)
#   bench-long[:LENGTHS]
#                issue 16: bench_inference.py (tiny preset, ramba, fast mode, offload, segments of 65536) at LENGTHS
#                (default 4k,64k,1m,16m,64m,256m); bench_inference_long.json/.png; LANDMARKS=host|device keeps the
#                landmarks in host memory only or on the GPU (default: host memory, an int8 sketch on the GPU for
#                decoding; bench_inference_long-landmarks-LANDMARKS.json); after the 16 timed decoding steps, 4 more
#                under the profiler: a table of their ops per length under $OUT/profile-decode/
#   disk-tier[:LENGTH[:BUDGET]]
#                issue 16: the same passkey at LENGTH (default 128m), depth 0.5, with the disk tier (--offload-dir
#                /tmp/ramba-disk, --host-budget BUDGET, default 8g), then bench_inference.py at LENGTH with the same
#   retrieval-probe[:STEPS[:ARMS[:SECONDS[:LR[:LANDMARKS[:TASK[:FRESH]]]]]]]
#                issue 22: benchmarks/retrieval_supervision_probe.py on the GPU (run corpus first): the retrieval loss alone
#                trains one part of the shipped model (ARMS, default encoder,below; STEPS default 3000, 32 x 2K a step,
#                evaluated every STEPS/20) at LR (default 1e-3) with the probe's --landmarks LANDMARKS (cls, the default,
#                or max) on TASK (default niah_multikey), bounded by SECONDS
#                (default 500); FRESH (e.g. tiny/chunk_size=32): from a fresh model of that layout instead; TASK and
#                FRESH write their colons as '/';
#                retrieval_supervision_probe_gpu[-lrLR][-TASK][-fresh-FRESH][-landmarks-LANDMARKS].json/.png
#   save-cache   the Triton kernel cache as $OUT/triton-cache.tgz.part-* (copy them into .carry/ for the
#                next fresh machine: the kernels of the last run then need no compiling or autotuning)
#   corpus[:NAME] unpack the corpora carried in .carry/corpus/ (only NAME's) and prepare their token files under data/
#   passkey-train:ARCH:STAGE:STEPS[:SECONDS[:INIT]]
#                train stage 1, 2, 3 or 4 (recipes/tiny-passkey-1k.yaml, tiny-passkey.yaml, tiny-passkey-distractors.yaml,
#                tiny-passkey-hard.yaml; each stage from the one before: this call's run, else the carried model)
#                of ARCH (ramba, mamba2, swa, or ramba2g: two retrieval groups) for STEPS steps, then export $OUT/passkey-ARCH[-sN].safetensors and its
#                metrics; SECONDS bounds the run (default 540); INIT: continue from these weights instead
#                (a continuation: 50 warmup steps to lr 5e-4)
#   recipe:FILE:NAME:STEPS[:SECONDS[:SETTINGS]]
#                ramba train FILE for STEPS steps (SECONDS bounds it, default 540) with the overrides SETTINGS
#                (comma-separated KEY=VALUE), then export $OUT/NAME.safetensors and NAME.metrics.jsonl
#   recipe-old:FILE:NAME:STEPS[:SECONDS[:SETTINGS]]
#                the same with the code and recipes carried in .carry/old (as for train-run-old)
#   passkey-eval:NAME:LENGTHS:SAMPLES[:DEPTHS[:HAYSTACK]]
#                ramba eval passkey of passkey-NAME.safetensors (this call's $OUT, else .carry/models/, else the
#                shipped model for NAME ramba) on data/HAYSTACK (default python-doc; template: the repeated sentence),
#                fast mode, offload; JSON + PNG. Both evaluations: EVAL_BATCH prompts of a cell generated together
#                (default 1), LONG_SAMPLES samples a cell beyond 1M tokens (default SAMPLES), EVAL_SECONDS bounds each (default 540)
#   tasks-eval:NAME:LENGTHS:SAMPLES[:HAYSTACK[:DEPTHS[:TASKS]]]
#                ramba eval tasks (default niah_single, niah_multikey; TASKS comma-separated) of passkey-NAME.safetensors,
#                found as for passkey-eval, on data/HAYSTACK (default python-doc), DEPTHS (default 0,0.5,1), fast mode, offload;
#                one task alone: its name ends the results file's (one file a task, so a cut run keeps the tasks done)
#   ranks:NAME:LENGTHS
#                ramba eval ranks of passkey-NAME.safetensors (found as for passkey-eval) on the python-doc haystack:
#                the needle chunk's rank and score margin at every answer digit (3 depths, fast mode)
#   multigpu:NAME:STEPS[:SETTINGS]
#                issue 8's scaling run (needs 2 GPUs): recipes/tiny-gpu.yaml with the overrides SETTINGS
#                (comma-separated KEY=VALUE, e.g. model.preset=370m,micro_batch=2) for STEPS steps on 1, then 2 GPUs
#                (torchrun), then the 2-GPU run continued on 1 GPU for 10 steps; metrics as
#                multigpu-NAME-{1,2,resumed}.metrics.jsonl (train-metrics.tgz), tokens/s = the logged global rate
#   train-run:NAME:STEPS[:SETTINGS]
#                issue 17: `ramba train recipes/tiny-gpu.yaml` (run corpus first) for STEPS steps with the overrides
#                SETTINGS (comma-separated KEY=VALUE, e.g. model.preset=370m,micro_batch=4), no evaluation, one
#                checkpoint at the end; train-run-NAME.metrics.jsonl (tokens_per_s and mfu per logged step)
#   train-run-old:NAME:STEPS[:SETTINGS]
#                the same with the code carried in .carry/old (git archive REV ramba recipes | tar -x -C .carry/old):
#                an earlier version's rate on the same machine; train-run-old-NAME.metrics.jsonl
#   ddp-one-gpu[:STEPS]
#                issue 17: recipes/tiny-gpu.yaml with 2 DDP ranks on the one GPU (torchrun, gloo, micro-batch 8) for
#                STEPS steps (default 30) against one process at micro-batch 16, then the 2-rank run resumed in one
#                process for 10 more; losses and checkpoint folders -> ddp-one-gpu.json (run corpus first)
#   drop:GLOB    delete $OUT/GLOB (models a later stage of the same call superseded)
#   pack:NAME:GLOB  move $OUT/GLOB (space-separated patterns) into $OUT/NAME.tgz (at most 8 files come back)
# Carried wheels in .whl/ (fla-core, mamba-ssm built with MAMBA_SKIP_CUDA_BUILD=TRUE, einops) are installed first. At most 8 files come back from $OUT.
# The carried folder .carry/ (git-ignored; name it and .whl in the device call's carry list) holds the
# corpora (scripts/device_carry.sh packs them), models and the kernel cache.
set -o pipefail
OUT=${OUT:-/tmp/ramba_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || set -- tests hsa train inference

setup() {
    echo "== setup $(date -u +%FT%TZ)"
    if compgen -G ".whl/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
        export PYTHONPATH=/tmp/site
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    # compiled kernels and autotuning results (fla caches them) outlive a call on a warm machine, and on a
    # fresh one when the parts section save-cache wrote travel in .carry/
    export TRITON_CACHE_DIR=/tmp/ramba-triton-cache
    mkdir -p "$TRITON_CACHE_DIR"
    if compgen -G ".carry/triton-cache.tgz.part-*" > /dev/null; then
        cat .carry/triton-cache.tgz.part-* | tar -xz -C "$TRITON_CACHE_DIR"
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
}

arch_overrides() {
    case "$1" in
        ramba) ;;
        mamba2) echo "--set model.overrides.architecture=mamba2" ;;
        swa) echo "--set model.overrides.local_mixer=swa" ;;
        ramba2g) echo "--set model.overrides.retrieval_groups=2" ;;
        *) echo "unknown architecture: $1" >&2; return 2 ;;
    esac
}

passkey_model() {  # NAME: this call's export in $OUT, else the carried model, else the shipped one (ramba)
    local file=$OUT/passkey-$1.safetensors
    [ -f "$file" ] || file=.carry/models/passkey-$1.safetensors
    [ -f "$file" ] || [ "$1" != ramba ] || file=ramba/pretrained/tiny-ruler.safetensors
    echo "$file"
}

haystack_arg() {  # a corpus name under data/, or template (the repeated sentence)
    if [ "$1" = template ]; then echo template; else echo "data/$1"; fi
}

# the evaluations' batch size and samples a cell beyond 1M tokens (environment: EVAL_BATCH, LONG_SAMPLES)
eval_opts=(--batch-size "${EVAL_BATCH:-1}")
[ -z "${LONG_SAMPLES:-}" ] || eval_opts+=(--long-samples "$LONG_SAMPLES")

stamped() {  # run "$@", every output line prefixed with the time: a test run cut by its timeout still shows its pace
    "$@" 2>&1 | while IFS= read -r line; do printf '%(%T)T %s\n' -1 "$line"; done
    return "${PIPESTATUS[0]}"
}

section() {
    local name=${1%%:*} arch stage steps seconds init_from lengths samples depths
    echo "== $1 $(date -u +%FT%TZ)"
    case "$name" in
        corpus)
            local only=
            [[ $1 != corpus:* ]] || only=${1#corpus:}
            mkdir -p corpus data
            for f in .carry/corpus/$only*.tgz; do [ -e "$f" ] && tar -xzf "$f" -C corpus; done
            for f in .carry/corpus/$only*.txt.gz; do [ -e "$f" ] && zcat "$f" > "corpus/$(basename "$f" .gz)"; done
            local pids=() pid
            for src in corpus/*; do  # side by side: one process a corpus
                python3 -m ramba prepare "$src" -o "data/$(basename "$src" .txt)" --overwrite --no-progress &
                pids+=($!)
            done
            for pid in "${pids[@]}"; do wait "$pid" || return 1; done ;;
        recipe|recipe-old)
            local file sets tree=. args=()
            IFS=: read -r _ file stem steps seconds sets <<<"$1"
            for kv in ${sets//,/ }; do args+=(--set "$kv"); done
            [ "$name" = recipe ] || { tree=.carry/old; ln -sfn "$PWD/data" .carry/old/data; }
            rm -rf "runs/$stem"
            (cd "$tree" && timeout -k 60 "${seconds:-540}" python3 -m ramba train "$file" --set "out_dir=$OLDPWD/runs/$stem" \
                --set "max_steps=$steps" --set log.progress=false "${args[@]}")
            local rc=$?
            cp "runs/$stem/metrics.jsonl" "$OUT/$stem.metrics.jsonl" 2>/dev/null
            python3 -m ramba export --model "runs/$stem" -o "$OUT/$stem.safetensors" || return 1
            return $rc ;;
        passkey-train)
            # stage 1: recipes/tiny-passkey-1k.yaml from scratch; stages 2 to 4 from the stage before
            local overrides recipe run init="" stem prev
            IFS=: read -r _ arch stage steps seconds init_from <<<"$1"
            overrides=$(arch_overrides "$arch") || return 2
            case "$stage" in
                1) recipe=recipes/tiny-passkey-1k.yaml run=runs/passkey-$arch-s1 stem=passkey-$arch-s1 ;;
                2) recipe=recipes/tiny-passkey.yaml run=runs/passkey-$arch stem=passkey-$arch prev=passkey-$arch-s1 ;;
                3) recipe=recipes/tiny-passkey-distractors.yaml run=runs/passkey-$arch-s3 stem=passkey-$arch-s3 prev=passkey-$arch ;;
                4) recipe=recipes/tiny-passkey-hard.yaml run=runs/passkey-$arch-s4 stem=passkey-$arch-s4 prev=passkey-$arch-s3 ;;
                *) echo "unknown stage: $stage"; return 2 ;;
            esac
            if [ "$stage" != 1 ]; then  # from the previous stage: this call's run, else the carried model
                overrides="" init=runs/$prev
                [ -d "$init" ] || init=.carry/models/$prev.safetensors
                init="--set model.init_from=$init"
            fi
            [ -z "$init_from" ] || init="--set model.init_from=$init_from --set optim.warmup_steps=50 --set optim.lr=5e-4 --set optim.min_lr=5e-5"
            rm -rf "$run"
            # shellcheck disable=SC2086
            timeout -k 60 "${seconds:-540}" python3 -m ramba train "$recipe" --set out_dir="$run" --set max_steps="$steps" \
                --set log.progress=false $overrides $init
            local rc=$?
            cp "$run/metrics.jsonl" "$OUT/$stem.metrics.jsonl" 2>/dev/null
            python3 -m ramba export --model "$run" -o "$OUT/$stem.safetensors" || return 1
            return $rc ;;
        passkey-eval)
            local haystack tasks
            IFS=: read -r _ arch lengths samples depths haystack <<<"$1"
            timeout "${EVAL_SECONDS:-540}" python3 -m ramba eval passkey --model "$(passkey_model "$arch")" --lengths "$lengths" \
                --depths "${depths:-0,0.25,0.5,0.75,1}" --samples "$samples" "${eval_opts[@]}" --mode fast --offload \
                --segment-len 65536 --haystack "$(haystack_arg "${haystack:-python-doc}")" --out "$OUT" \
                --name "passkey-$arch-${haystack:-python-doc}-to-${lengths##*,}" --no-progress ;;
        tasks-eval)
            local suffix=
            IFS=: read -r _ arch lengths samples haystack depths tasks <<<"$1"
            [[ -z $tasks || $tasks == *,* ]] || suffix=-$tasks
            timeout "${EVAL_SECONDS:-540}" python3 -m ramba eval tasks --model "$(passkey_model "$arch")" --lengths "$lengths" \
                --tasks "${tasks:-niah_single,niah_multikey}" --depths "${depths:-0,0.5,1}" --samples "$samples" \
                "${eval_opts[@]}" --mode fast --offload --segment-len 65536 \
                --haystack "$(haystack_arg "${haystack:-python-doc}")" \
                --out "$OUT" --name "tasks-$arch-${haystack:-python-doc}-to-${lengths##*,}$suffix" --no-progress ;;
        ranks)
            IFS=: read -r _ arch lengths <<<"$1"
            python3 -m ramba eval ranks --model "$(passkey_model "$arch")" --lengths "$lengths" --depths 0,0.5,1 \
                --mode fast --segment-len 65536 --haystack data/python-doc --out "$OUT" --name "ranks-$arch" --no-progress ;;
        tests) stamped timeout "${TESTS_SECONDS:-300}" python3 -m pytest -m "gpu and not slow" tests/gpu -v -rfE --tb=short --show-capture=no -p no:cacheprovider ;;
        pytest) stamped timeout "${TESTS_SECONDS:-300}" python3 -m pytest -m gpu ${1#pytest:} -v -rfE --tb=short -p no:cacheprovider ;;
        suite-cold)
            local start=$SECONDS rc
            TRITON_CACHE_DIR=$(mktemp -d) TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) stamped timeout "${TESTS_SECONDS:-420}" \
                python3 -m pytest -m gpu tests/gpu -v -rfE --tb=short --durations=15 -p no:cacheprovider \
                --junitxml="$OUT/gpu-suite-cold.xml"
            rc=$?
            echo "== suite-cold: $((SECONDS - start)) s wall, rc $rc"
            return "$rc" ;;
        tests-graph) timeout 400 python3 -m pytest -m gpu tests/gpu/test_cuda_graph_gpu.py -q -rfE -p no:cacheprovider ;;
        tests-nsa) timeout 300 python3 -m pytest -m gpu tests/gpu/test_nsa_gpu.py -v -rfEs --durations=5 -p no:cacheprovider ;;
        tests-model) timeout 400 python3 -m pytest -m "gpu and not slow" tests/gpu/test_model_gpu.py -q -rfE -p no:cacheprovider ;;
        hsa|hsa-sweep)
            # earlier kernels are timed beside: HSA_BASELINE (a carried copy of an earlier ramba/ops/hsa/triton.py,
            # default .carry/hsa_triton_v2.py when carried)
            local baseline=() base=${HSA_BASELINE:-.carry/hsa_triton_v2.py}
            [ ! -f "$base" ] || baseline=(--baseline "$base")
            if [ "$name" = hsa-sweep ]; then
                timeout 400 python3 -m ramba bench kernels "$OUT" --sweep "${baseline[@]}"
            else
                local rc=0
                if [ "${HSA_TESTS:-1}" != 0 ]; then
                    timeout 200 python3 -m pytest -m gpu tests/gpu/test_hsa_gpu.py -q -rfE --durations=5 -p no:cacheprovider
                    rc=$?
                fi
                timeout 300 python3 -m ramba bench kernels "$OUT" "${baseline[@]}" --block-tokens "${HSA_BLOCK_TOKENS:-}" || return 1
                return $rc
            fi ;;
        ssd)
            local select=${1#ssd}
            timeout 200 python3 -m pytest -m "gpu and not slow" tests/gpu/test_ssd_gpu.py -q -rfEs -p no:cacheprovider \
                ${select:+-k "${select#:}"} ;;
        train|train-eager|train-graph)
            local presets archs flags mode=()
            IFS=: read -r _ presets archs lengths flags <<<"$1"
            [ "$name" != train-eager ] || mode=(--no-compile-glue)
            [ "$name" != train-graph ] || mode=(--cuda-graph)
            timeout 300 python3 -m ramba bench train --presets "${presets:-370m,tiny}" \
                --architectures "${archs:-ramba,mamba2,transformer}" --lengths "${lengths:-4096,16384}" \
                --batch-tokens "${BENCH_TOKENS:-16384}" --steps "${BENCH_STEPS:-15}" --warmup 2 --checkpoint-fallback \
                "${mode[@]}" ${BENCH_FLAGS:-} ${flags//,/ } --out "$OUT" \
                --name "${BENCH_NAME:-bench_$name${lengths:+-${lengths//,/_}}${flags:+-${flags//[^a-z0-9]/}}}" ;;
        profile)
            IFS=: read -r _ preset archs length <<<"$1"
            timeout 300 python3 -m ramba bench train --presets "$preset" --architectures "$archs" --lengths "$length" \
                --batch-tokens "${BENCH_TOKENS:-8192}" --steps 3 --warmup 2 --profile "$OUT/profile" --out "$OUT" --name "profile-$preset" ;;
        inference-long)
            # one eval a depth, each with its own time limit and results file (a cut sample loses only itself)
            local depth rc=0
            IFS=: read -r _ lengths depths <<<"$1"
            lengths=${lengths:-128m,256m} depths=${depths:-0,0.5,1}
            for depth in ${depths//,/ }; do
                timeout "${LONG_SECONDS:-400}" python3 -m ramba eval passkey --model tiny-ruler \
                    --lengths "$lengths" --depths "$depth" --samples 1 --mode fast --offload --segment-len 65536 \
                    --haystack data/python-doc --out "$OUT" --name "passkey-ramba-long-${lengths//,/_}-$depth" \
                    --no-progress || rc=1
            done
            return $rc ;;
        bench-long)
            IFS=: read -r _ lengths <<<"$1"
            timeout 590 python3 -m ramba bench inference --preset tiny --architectures ramba \
                --lengths "${lengths:-4k,64k,1m,16m,64m,256m}" --decode-tokens 16 --segment-len 65536 --mode fast --offload \
                --landmarks "${LANDMARKS:-sketch}" --profile "$OUT/profile-decode" --out "$OUT" \
                --name "bench_inference_long${LANDMARKS:+-landmarks-$LANDMARKS}" ;;
        disk-tier)
            local length budget
            IFS=: read -r _ length budget <<<"$1"
            mkdir -p /tmp/ramba-disk
            timeout 400 python3 -m ramba eval passkey --model tiny-ruler \
                --lengths "${length:-128m}" --depths 0.5 --samples 1 --mode fast --offload-dir /tmp/ramba-disk \
                --host-budget "${budget:-8g}" --segment-len 65536 --haystack data/python-doc --out "$OUT" \
                --name "passkey-ramba-disk" --no-progress || return 1
            timeout 400 python3 -m ramba bench inference --preset tiny --architectures ramba --lengths "${length:-128m}" \
                --decode-tokens 16 --segment-len 65536 --mode fast --offload-dir /tmp/ramba-disk --host-budget "${budget:-8g}" \
                --out "$OUT" --name bench_inference_disk ;;
        prefill-ablation)
            local variant
            IFS=: read -r _ length <<<"$1"
            for variant in "mamba_ssm --no-compile-glue" "mamba_ssm --compile-glue" "fla --no-compile-glue"; do
                # shellcheck disable=SC2086
                timeout 200 python3 -m ramba bench inference --preset tiny --architectures ramba --lengths "${length:-16m}" \
                    --decode-tokens 16 --segment-len 65536 --mode fast --offload --ssd-backend $variant --out "$OUT" \
                    --name "bench_prefill_${variant// /}" || return 1
            done ;;
        inference) timeout 240 python3 -m ramba bench inference --preset tiny --architectures ramba \
                   --lengths 4k,64k,1m,16m,64m --decode-tokens 16 --segment-len 65536 --mode fast --offload --out "$OUT" ;;
        multigpu)
            local name sets n args=()
            IFS=: read -r _ name steps sets <<<"$1"
            for kv in ${sets//,/ }; do args+=(--set "$kv"); done
            args+=(--set "max_steps=$steps" --set log.progress=false --set eval.every=0 --set "checkpoint.every=$steps")
            for n in 1 2; do
                rm -rf "runs/multigpu-$name-$n"
                timeout 280 torchrun --standalone --nproc_per_node "$n" -m ramba train recipes/tiny-gpu.yaml \
                    --set "out_dir=runs/multigpu-$name-$n" "${args[@]}" || return 1
                cp "runs/multigpu-$name-$n/metrics.jsonl" "$OUT/multigpu-$name-$n.metrics.jsonl"
            done
            python3 -m ramba train recipes/tiny-gpu.yaml --set "out_dir=runs/multigpu-$name-2" "${args[@]}" \
                --set "max_steps=$((steps + 10))" --resume || return 1
            cp "runs/multigpu-$name-2/metrics.jsonl" "$OUT/multigpu-$name-resumed.metrics.jsonl" ;;
        train-run|train-run-old)
            local name sets tree=. args=()
            IFS=: read -r _ name steps sets <<<"$1"
            for kv in ${sets//,/ }; do args+=(--set "$kv"); done
            [ "${1%%:*}" = train-run ] || { tree=.carry/old; ln -sfn "$PWD/data" .carry/old/data; name=old-$name; }
            rm -rf "runs/train-run-$name"
            (cd "$tree" && timeout 500 python3 -m ramba train recipes/tiny-gpu.yaml --set "out_dir=$OLDPWD/runs/train-run-$name" \
                --set "max_steps=$steps" --set log.progress=false --set eval.every=0 --set log.every=5 "${args[@]}")
            local rc=$?
            cp "runs/train-run-$name/metrics.jsonl" "$OUT/train-run-$name.metrics.jsonl" 2>/dev/null
            return $rc ;;
        ddp-one-gpu)
            # issue 17 item 5: 2 DDP ranks sharing the one GPU (gloo) against one process at twice the micro-batch,
            # then the 2-rank run resumed in one process; losses, checkpoints -> $OUT/ddp-one-gpu.json
            local common
            IFS=: read -r _ steps <<<"$1"
            steps=${steps:-30}
            common=(--set log.progress=false --set eval.every=0 --set "checkpoint.every=$steps" --set log.every=1)
            rm -rf runs/ddp-1 runs/ddp-2
            timeout 200 python3 -m ramba train recipes/tiny-gpu.yaml --set out_dir=runs/ddp-1 --set micro_batch=16 \
                --set "max_steps=$((steps + 10))" "${common[@]}" || return 1
            timeout 200 torchrun --standalone --nproc_per_node 2 -m ramba train recipes/tiny-gpu.yaml \
                --set out_dir=runs/ddp-2 --set micro_batch=8 --set "max_steps=$steps" "${common[@]}" || return 1
            ls runs/ddp-2/checkpoints > runs/ddp-2-checkpoints-after-torchrun.txt
            timeout 200 python3 -m ramba train recipes/tiny-gpu.yaml --set out_dir=runs/ddp-2 --set micro_batch=16 \
                --set "max_steps=$((steps + 10))" "${common[@]}" --resume || return 1
            python3 - "$OUT/ddp-one-gpu.json" <<'EOF'
import json, os, sys
def curve(run):
    rows = [json.loads(line) for line in open(f"runs/{run}/metrics.jsonl")]
    return {r["step"]: r for r in rows if "loss" in r}
one, two = curve("ddp-1"), curve("ddp-2")
rel = {s: abs(two[s]["loss"] - one[s]["loss"]) / one[s]["loss"] for s in sorted(one) if s in two}
out = dict(
    single={s: r["loss"] for s, r in one.items()}, ddp_then_resumed={s: r["loss"] for s, r in two.items()},
    world_size={s: r.get("world_size") for s, r in two.items()}, max_rel_diff=max(rel.values()),
    rel_diff=rel, checkpoints_after_torchrun=open("runs/ddp-2-checkpoints-after-torchrun.txt").read().split(),
    checkpoints_after_resume=sorted(os.listdir("runs/ddp-2/checkpoints")),
)
json.dump(out, open(sys.argv[1], "w"), indent=1)
print("ddp-one-gpu: max relative loss difference", out["max_rel_diff"], "checkpoints", out["checkpoints_after_resume"])
EOF
            ;;
        drop) rm -f "$OUT"/${1#drop:} ;;
        pack)
            local stem globs
            IFS=: read -r _ stem globs <<<"$1"
            # shellcheck disable=SC2086
            (cd "$OUT" && shopt -s nullglob && files=($globs) &&  # nothing matched: nothing to pack
                { [ ${#files[@]} -eq 0 ] || { tar -czf "$stem.tgz" "${files[@]}" && rm -f "${files[@]}"; }; }) ;;
        retrieval-probe)
            local arms lr landmarks task fresh stem=retrieval_supervision_probe_gpu
            IFS=: read -r _ steps arms seconds lr landmarks task fresh <<<"$1"
            steps=${steps:-3000} task=${task//\//:} fresh=${fresh//\//:}
            [ -z "$lr" ] || stem+=-lr$lr
            [ -z "$task" ] || stem+=-$(tr ':=,' '---' <<<"$task")
            [ -z "$fresh" ] || stem+=-fresh-$(tr ':=,' '---' <<<"$fresh")
            [ -z "$landmarks" ] || stem+=-landmarks-$landmarks
            timeout -k 30 "${seconds:-500}" python3 benchmarks/retrieval_supervision_probe.py --device cuda --steps "$steps" \
                --arms "${arms:-encoder,below}" --batch 32 --eval-every $((steps / 20 > 0 ? steps / 20 : 1)) \
                --lr "${lr:-1e-3}" --task "${task:-niah_multikey}" ${fresh:+--fresh "$fresh"} \
                --landmarks "${landmarks:-cls}" --out "$OUT/$stem.json" ;;
        save-cache) tar -czf - -C "$TRITON_CACHE_DIR" . | split -b 15000000 - "$OUT/triton-cache.tgz.part-" && ls -la "$OUT" ;;
        *) echo "unknown section: $name"; return 2 ;;
    esac
}

lane() {  # 'A;B;C': the sections one after another
    local rc=0 name
    IFS=';' read -ra names <<<"$1"
    for name in "${names[@]}"; do
        section "$name" || { echo "== section $name failed"; rc=1; }
    done
    return $rc
}

lanes() {  # 'L1+L2+...': the lanes side by side, their lines tagged [1], [2], ...
    local rc=0 i=0 lane_args pids=()
    IFS='+' read -ra lane_args <<<"$1"
    for arg in "${lane_args[@]}"; do
        i=$((i + 1))
        lane "$arg" > >(sed -u "s/^/[$i] /") 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
    return $rc
}

main() {
    local rc=0
    setup || return 1
    for arg in "$@"; do
        if [[ $arg == *+* ]]; then lanes "$arg" || rc=1; else lane "$arg" || rc=1; fi
    done
    if compgen -G "$OUT/*.metrics.jsonl" > /dev/null; then
        (cd "$OUT" && tar -czf train-metrics.tgz ./*.metrics.jsonl && rm -f ./*.metrics.jsonl)
    fi
    echo "== done rc=$rc $(date -u +%FT%TZ)"
    return $rc
}

main "$@" 2>&1 | tee "$OUT/log.txt"
