#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment from the lock file.
#
#   scripts/setup_env.sh            # .venv in the repository root
#   VENV=/some/where scripts/setup_env.sh
#
# Idempotent: a stamp in the venv records the hash of the lock, pyproject.toml and this
# script; when nothing changed it returns in well under a second.
#
# Why a lock installed with --no-deps: safety-gymnasium 1.0.0 pins pygame 2.1.0 (no wheel
# for Python 3.11) and numpy < 1.24, which pip cannot resolve next to datasets' pyarrow
# (numpy >= 2). requirements/lock.txt is the exact, tested set; installing it with
# --no-deps reproduces the environment without asking pip to resolve those pins.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${VENV:-$root/.venv}"
lock="$root/requirements/lock.txt"
torch_version="2.13.0"

py="${PYTHON:-}"
if [ -z "$py" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1; then py="$cand"; break; fi
  done
fi
[ -n "$py" ] || { echo "setup_env: no python3 found" >&2; exit 1; }

stamp_of() { cat "$lock" "$root/pyproject.toml" "$root/scripts/setup_env.sh" | sha256sum | cut -d' ' -f1; }
want="$(stamp_of)"
if [ -f "$venv/.llm_safepref_stamp" ] && [ "$(cat "$venv/.llm_safepref_stamp")" = "$want" ] \
   && "$venv/bin/python" -c "import llm_safepref" >/dev/null 2>&1; then
  exit 0
fi

echo "setup_env: building $venv (first time takes a few minutes)"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

# 1. torch first, and the CPU build where there is no CUDA: a plain `torch` requirement
#    would otherwise pull a CUDA build of several GB.
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('$torch_version') else 1)" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" install "torch==$torch_version"
  else
    # A local CPU wheel (pip's configured find-links) first, else PyTorch's CPU index.
    "${pip[@]}" install "torch==$torch_version+cpu" 2>/dev/null \
      || "${pip[@]}" install "torch==$torch_version" --index-url https://download.pytorch.org/whl/cpu
  fi
fi

# 2. Everything else, exactly as locked; 3. the package itself, editable.
"${pip[@]}" install --no-deps -r "$lock"
"${pip[@]}" install --no-deps --no-build-isolation -e "$root"

# Smoke check: the stack imports (control's import shim included).
"$venv/bin/python" - <<'PY'
import importlib
for name in ("torch", "trl", "transformers", "peft", "datasets", "accelerate", "gymnasium", "bullet_safety_gym", "matplotlib", "llm_safepref.losses"):
    importlib.import_module(name)
PY
echo "$want" > "$venv/.llm_safepref_stamp"
echo "setup_env: ready ($venv)"
