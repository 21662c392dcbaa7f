#!/usr/bin/env bash
# The main job, offline, on the bundled support-tickets example.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/stepwise validate examples/support-tickets/recipe.yaml
