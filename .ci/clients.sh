#!/usr/bin/env bash
# Installs the clients that `pytest -m clients` runs exports in, under $SLIMLM_CLIENTS (~/.cache/slimlm-clients):
# transformers.js 4 for Node, and Optimum's ORTModelForCausalLM in a venv of its own (optimum-onnx pins
# transformers < 4.58, which slimlm's own environment cannot have). Both stay cached on the machine, so a
# second run only checks that they are there.
set -euo pipefail
home="${SLIMLM_CLIENTS:-$HOME/.cache/slimlm-clients}"
mkdir -p "$home/node"

if ! command -v node >/dev/null; then
  apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null
fi
if [ ! -f "$home/node/node_modules/@huggingface/transformers/package.json" ]; then
  # --ignore-scripts: onnxruntime-node ships its native binary; its install script would only try to download more
  (cd "$home/node" && npm install --ignore-scripts --no-audit --no-fund --silent @huggingface/transformers@4)
fi

if ! "$home/optimum/bin/python" -c "import optimum.onnxruntime" 2>/dev/null; then
  rm -rf "$home/optimum"
  python3 -m venv "$home/optimum"
  "$home/optimum/bin/pip" install -q "optimum-onnx==0.1.0" "transformers>=4.50,<4.58" "torch<2.14" "onnxruntime>=1.22,<2"
fi
echo "clients in $home: transformers.js $(node -p "require('$home/node/node_modules/@huggingface/transformers/package.json').version"), optimum-onnx $("$home/optimum/bin/python" -c 'from importlib.metadata import version; print(version("optimum-onnx"))')"
