#!/usr/bin/env bash
# The one script run on the GPU machine (see the device tool). Usage: scripts/device_run.sh SECTION...
# Sections (run in the order given, each bounded by its own timeout, outputs under $OUT):
#   tests        all GPU tests (pytest -m gpu tests/gpu)
#   tests-model  GPU tests of the SSD fast path and the model only
#   hsa          HSA GPU tests + benchmarks/bench_hsa.py
#   train        benchmarks/bench_train.py (370m layout, 4K and 16K)
#   inference    benchmarks/bench_inference.py (tiny preset, 4K..16M, offload)
# Carried wheels in .whl/ (fla-core) are installed first. At most 8 files come back from $OUT.
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
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
}

section() {
    local name=$1
    echo "== $name $(date -u +%FT%TZ)"
    case "$name" in
        tests) timeout 300 python3 -m pytest -m gpu tests/gpu -q -rfE -p no:cacheprovider ;;
        tests-model) timeout 150 python3 -m pytest -m gpu tests/gpu/test_ssd_gpu.py tests/gpu/test_model_gpu.py -q -rfE -x -p no:cacheprovider ;;
        hsa) timeout 150 python3 -m pytest -m gpu tests/gpu/test_hsa_gpu.py -q -rfE -p no:cacheprovider &&
             timeout 150 python3 benchmarks/bench_hsa.py "$OUT" ;;
        train) timeout 200 python3 benchmarks/bench_train.py --presets 370m --lengths 4096,16384 --batch-tokens 32768 \
                   --steps 5 --warmup 2 --out "$OUT" ;;
        inference) timeout 200 python3 benchmarks/bench_inference.py --preset tiny --architectures ramba \
                   --lengths 4k,64k,1m,16m --decode-tokens 16 --segment-len 16384 --mode fast --offload --out "$OUT" ;;
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
