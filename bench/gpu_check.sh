#!/usr/bin/env bash
# Every GPU check in one go, under 8 minutes on one H100/H200 (see bench/gpu_check.py):
#     bash bench/gpu_check.sh OUT_DIR [--budget-s 450] [--dry-run]
# Logs, results.json and summary.md go to OUT_DIR; the table is printed at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash bench/gpu_check.sh OUT_DIR [gpu_check.py flags]}"
shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# python3 is the interpreter that holds torch on the GPU machines; the hard limit backs up the
# script's own time boxes (it rewrites summary.md after every section, so a kill keeps the rest)
timeout -k 10 480 "${PYTHON:-python3}" bench/gpu_check.py --out "$out" "$@"
