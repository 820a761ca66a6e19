#!/usr/bin/env bash
# The one script run on the GPU machine (see the device tool). Usage: scripts/device_run.sh SECTION...
# Sections (run in the order given, each bounded by its own timeout, outputs under $OUT):
#   tests        all GPU tests (pytest -m gpu tests/gpu)
#   tests-model  GPU tests of the SSD fast path and the model only
#   hsa          HSA GPU tests + benchmarks/bench_hsa.py
#   train        benchmarks/bench_train.py (370m layout, 4K and 16K)
#   inference    benchmarks/bench_inference.py (tiny preset, 4K..16M, offload)
#   save-cache   the Triton kernel cache as $OUT/triton-cache.tgz.part-* (copy them into .carry/ for the
#                next fresh machine: the kernels of the last run then need no compiling or autotuning)
#   corpus       unpack the corpora carried in .carry/corpus/ and prepare their token files under data/
#   passkey-train:ARCH:STAGE:STEPS[:SECONDS[:INIT]]
#                train stage 1, 2 or 3 (recipes/tiny-passkey-1k.yaml, tiny-passkey.yaml, tiny-passkey-distractors.yaml)
#                of ARCH (ramba, mamba2 or swa) for STEPS steps, then export $OUT/passkey-ARCH[-sN].safetensors and its
#                metrics; SECONDS bounds the run (default 540); INIT: continue from these weights instead
#                (a continuation: 50 warmup steps to lr 5e-4)
#   passkey-eval:NAME:LENGTHS:SAMPLES[:DEPTHS]
#                ramba eval passkey of passkey-NAME.safetensors (this call's $OUT, else .carry/models/, else the
#                shipped model for NAME ramba) on the unseen python-doc haystack, fast mode, offload; JSON + PNG
# Carried wheels in .whl/ (fla-core) are installed first. At most 8 files come back from $OUT.
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
        *) echo "unknown architecture: $1" >&2; return 2 ;;
    esac
}

passkey_model() {  # NAME: this call's export in $OUT, else the carried model, else the shipped one (ramba)
    local file=$OUT/passkey-$1.safetensors
    [ -f "$file" ] || file=.carry/models/passkey-$1.safetensors
    [ -f "$file" ] || [ "$1" != ramba ] || file=ramba/pretrained/tiny-passkey.safetensors
    echo "$file"
}

section() {
    local name=${1%%:*} arch stage steps seconds init_from lengths samples depths
    echo "== $1 $(date -u +%FT%TZ)"
    case "$name" in
        corpus)
            mkdir -p corpus data
            for f in .carry/corpus/*.tgz; do tar -xzf "$f" -C corpus; done
            for f in .carry/corpus/*.txt.gz; do [ -e "$f" ] && zcat "$f" > "corpus/$(basename "$f" .gz)"; done
            for src in corpus/*; do
                python3 -m ramba prepare "$src" -o "data/$(basename "$src" .txt)" --overwrite --no-progress || return 1
            done ;;
        passkey-train)
            # stage 1: recipes/tiny-passkey-1k.yaml from scratch; stages 2 and 3 (tiny-passkey.yaml,
            # tiny-passkey-distractors.yaml) from the stage before
            local overrides recipe run init="" stem prev
            IFS=: read -r _ arch stage steps seconds init_from <<<"$1"
            overrides=$(arch_overrides "$arch") || return 2
            case "$stage" in
                1) recipe=recipes/tiny-passkey-1k.yaml run=runs/passkey-$arch-s1 stem=passkey-$arch-s1 ;;
                2) recipe=recipes/tiny-passkey.yaml run=runs/passkey-$arch stem=passkey-$arch prev=passkey-$arch-s1 ;;
                3) recipe=recipes/tiny-passkey-distractors.yaml run=runs/passkey-$arch-s3 stem=passkey-$arch-s3 prev=passkey-$arch ;;
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
            timeout "${seconds:-540}" python3 -m ramba train "$recipe" --set out_dir="$run" --set max_steps="$steps" \
                --set log.progress=false $overrides $init
            local rc=$?
            cp "$run/metrics.jsonl" "$OUT/$stem.metrics.jsonl" 2>/dev/null
            python3 -m ramba export --model "$run" -o "$OUT/$stem.safetensors" || return 1
            return $rc ;;
        passkey-eval)
            IFS=: read -r _ arch lengths samples depths <<<"$1"
            python3 -m ramba eval passkey --model "$(passkey_model "$arch")" --lengths "$lengths" \
                --depths "${depths:-0,0.25,0.5,0.75,1}" --samples "$samples" --mode fast --offload \
                --segment-len 65536 --haystack data/python-doc --out "$OUT" --name "passkey-$arch-to-${lengths##*,}" --no-progress ;;
        tests) timeout 300 python3 -m pytest -m gpu tests/gpu -q -rfE -p no:cacheprovider ;;
        tests-model) timeout 150 python3 -m pytest -m gpu tests/gpu/test_ssd_gpu.py tests/gpu/test_model_gpu.py -q -rfE -x -p no:cacheprovider ;;
        hsa) timeout 150 python3 -m pytest -m gpu tests/gpu/test_hsa_gpu.py -q -rfE -p no:cacheprovider &&
             timeout 150 python3 benchmarks/bench_hsa.py "$OUT" ;;
        train) timeout 200 python3 benchmarks/bench_train.py --presets 370m --lengths 4096,16384 --batch-tokens 32768 \
                   --steps 5 --warmup 2 --out "$OUT" ;;
        inference) timeout 200 python3 benchmarks/bench_inference.py --preset tiny --architectures ramba \
                   --lengths 4k,64k,1m,16m --decode-tokens 16 --segment-len 65536 --mode fast --offload --out "$OUT" ;;
        save-cache) tar -czf - -C "$TRITON_CACHE_DIR" . | split -b 15000000 - "$OUT/triton-cache.tgz.part-" && ls -la "$OUT" ;;
        *) echo "unknown section: $name"; return 2 ;;
    esac
}

main() {
    local rc=0
    setup || return 1
    for name in "$@"; do
        section "$name" || { echo "== section $name failed"; rc=1; }
    done
    echo "== done rc=$rc $(date -u +%FT%TZ)"
    return $rc
}

main "$@" 2>&1 | tee "$OUT/log.txt"
