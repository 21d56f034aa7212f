#!/usr/bin/env bash
# The GPU box (see BENCHMARKS.md) has torch with CUDA, transformers, peft, accelerate, numpy, tqdm,
# requests, matplotlib; it has no network and lacks the packages below. Two steps:
#   here, with the package registry:  bash benchmarks/gpu_box.sh wheels    (fills .whl/, git-ignored)
#   there, carrying .whl:            bash benchmarks/gpu_box.sh run [gpu_check.py options]
# `run` installs the wheels into /tmp/site and runs benchmarks/gpu_check.py with one overall deadline
# (--deadline_s, default 480 s: inside a 10-minute call); the table, the JSON and each part's log are
# written to $OUT (when set) as each part finishes, so a call cut short still brings back what ran.
# `run --parts=gen` times decoding alone (benchmarks/gen_speed.py: tokens/s vs the bandwidth floor).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  wheels)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    mkdir -p .whl
    plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    # pure-Python or cp312 wheels of what the box lacks (pydantic-core, zstandard and xxhash are compiled)
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${plat[@]}" -d .whl bottle==0.13.4 waitress==3.0.2 hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 \
      annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.16.0 math-verify==0.9.0 \
      latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 zstandard==0.25.0 xxhash==4.1.0  # the versions the tests pass with
    # deepspeed is an sdist on the registry: build its pure-Python wheel here
    python -m pip wheel -q --no-deps -w .whl "$(grep '^deepspeed==' requirements-core.txt)"
    ls -la .whl
    ;;
  run)
    shift
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    rc=0
    python3 benchmarks/gpu_check.py --out=/tmp/gpu_check --report_dir="${OUT:-/tmp/gpu_check}" "$@" || rc=$?
    exit $rc
    ;;
  *)
    echo "usage: bash benchmarks/gpu_box.sh wheels | run [gpu_check.py options]" >&2
    exit 2
    ;;
esac
