#!/usr/bin/env bash
# Packs what scripts/device_run.sh needs on a GPU machine that has no internet into git-ignored folders,
# to be named in the device call's carry list: .whl/ (the fla-core, liger-kernel and einops wheels, and mamba-ssm's built
# as pure Python: its Triton SSD kernels without the CUDA extensions) and .carry/corpus/
# (corpora from scripts/get_corpus.sh's ./corpus, compressed). A call carries at most 64 MiB with the
# working tree (~12 MB) and any kernel-cache parts (~21 MB): pack only the corpora the call uses, e.g.
#   scripts/device_carry.sh shakespeare gcide python-doc    # training stages 1-2 and the evaluation
#   scripts/device_carry.sh shakespeare linux-doc python-doc  # stage 3 and the evaluation
# Names: shakespeare (5 MB packed), gcide (13 MB), linux-doc (9 MB), python-doc (3 MB), debian-handbook and
# debian-manuals (~1 MB each); default: the first four.
# Kernel-cache parts that section save-cache returned go into .carry/ by hand (see device_run.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
[ $# -gt 0 ] || set -- shakespeare gcide linux-doc python-doc
mkdir -p .whl .carry/corpus
if ! compgen -G ".whl/fla_core-*.whl" > /dev/null; then
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl fla-core==0.6.0
fi
if ! compgen -G ".whl/mamba_ssm-*.whl" > /dev/null; then
    # PyPI has only its source; MAMBA_SKIP_CUDA_BUILD builds the Python files alone (setup.py imports torch)
    tmp=$(mktemp -d)
    MAMBA_SKIP_CUDA_BUILD=TRUE "$PY" -m pip download -q --no-deps --no-binary=:all: --no-build-isolation -d "$tmp" mamba-ssm==2.3.2.post1
    "$PY" -m pip install -q wheel
    tar -xzf "$tmp"/mamba_ssm-*.tar.gz -C "$tmp"
    MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$tmp"/mamba_ssm-*/
    "$PY" -m pip download -q --no-deps -d .whl einops==0.8.2
    rm -rf "$tmp"
fi
if ! compgen -G ".whl/liger_kernel-*.whl" > /dev/null; then  # pure Python (Triton kernels): the fused loss
    "$PY" -m pip download -q --no-deps -d .whl liger-kernel==0.8.5
fi
for c in "$@"; do
    case "$c" in
        gcide) [ -f .carry/corpus/gcide.txt.gz ] || gzip -c corpus/gcide.txt > .carry/corpus/gcide.txt.gz ;;
        shakespeare|python-doc|linux-doc|debian-handbook|debian-manuals) [ -f ".carry/corpus/$c.tgz" ] || tar -czf ".carry/corpus/$c.tgz" -C corpus "$c" ;;
        *) echo "unknown corpus: $c (shakespeare, gcide, linux-doc, python-doc, debian-handbook, debian-manuals)" >&2; exit 2 ;;
    esac
done
du -sh .whl .carry
