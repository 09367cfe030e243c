#!/usr/bin/env bash
# Creates tools/.venv, the Python oracle for the golden-data generators in tools/*.py
# (torch, transformers, peft, safetensors, numpy, gguf; trl, accelerate and datasets for the cluster job
# script that adapters.exportJob() writes; onnx, onnxscript and onnxruntime for tools/export_onnx.py,
# the bench's transformers.js exports), offline from this machine's local wheel mirror. The
# tests and the benchmark find it through tools/python.ts ($WEBTUNE_PYTHON, .venv, tools/.venv,
# python3 on PATH).
#
# Run from anywhere:   bash tools/setup-python.sh
# Then, e.g.:          tools/.venv/bin/python tools/convert_stories260k.py
#
# Idempotent: an existing tools/.venv that already imports every package is left as it is.
# pip is configured here with the mirror as an *extra* index next to an unreachable default one,
# and then spends minutes retrying the default; so the mirror is passed as the only index
# (see WEBGPU_ON_CPU.md, "Python oracle"). Set PYTHON=/path/to/python3 to choose the interpreter.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
python="${PYTHON:-python3}"
packages=(torch transformers peft safetensors numpy trl accelerate datasets gguf onnx onnxscript onnxruntime)
check='import torch, transformers, peft, safetensors, numpy, tokenizers, trl, accelerate, datasets, gguf, onnx, onnxscript, onnxruntime'

if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c "$check" 2>/dev/null; then
  echo "tools/.venv is ready: $("$venv/bin/python" -c 'import torch, transformers, peft, trl; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "trl", trl.__version__)')"
  exit 0
fi

# The mirror: the extra-index-url entries of pip's configuration that are local (file://).
# The first one becomes --index-url, as WEBGPU_ON_CPU.md describes; any further local ones are
# kept as extra indexes (they are on disk too, so they cost no retries). pip's configured
# find-links (a folder of wheels) still applies.
extra="$("$python" -m pip config list 2>/dev/null | sed -n "s/^global.extra-index-url='\([^']*\)'.*/\1/p" | head -n 1)"
local_indexes=()
for url in $extra; do
  case "$url" in
  file://*) [[ -d "${url#file://}" ]] && local_indexes+=("$url") ;;
  esac
done
if [[ ${#local_indexes[@]} -eq 0 ]]; then
  echo "error: no local wheel mirror found." >&2
  echo "  'pip config list' has no global.extra-index-url pointing at an existing file:// folder" >&2
  echo "  (found: '${extra:-nothing}'). This script installs offline only; on a machine with" >&2
  echo "  network access run: python3 -m venv tools/.venv && tools/.venv/bin/pip install ${packages[*]}" >&2
  exit 1
fi

pip_args=(--index-url "${local_indexes[0]}")
for url in "${local_indexes[@]:1}"; do
  pip_args+=(--extra-index-url "$url")
done

echo "creating tools/.venv with $("$python" --version) from ${local_indexes[*]}"
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
"$venv/bin/pip" install --disable-pip-version-check "${pip_args[@]}" "${packages[@]}"
"$venv/bin/python" -c "$check"
echo "tools/.venv is ready: $("$venv/bin/python" -c 'import torch, transformers, peft, trl; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "trl", trl.__version__)')"
