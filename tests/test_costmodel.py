"""costmodel/: features (deterministic, schema), train/save/load without pickle, qc costmodel /
qc predict (JSON shape, bad model file / other target -> exit 2, roofline fallback labelled).

The records are made here: a few small VNNI dense workloads x configs, with a synthetic latency
(a smooth function of the tile shape), written in the ``qc-tune/1`` format."""

import json
import math

import numpy as np
import pytest
from onnx import helper

from costmodel import FEATURE_SCHEMA, MODEL_SCHEMA
from costmodel import data as D
from costmodel import features as F
from costmodel import train as T
from costmodel.predict import CostModel, CostModelError
from qcompiler.cli import main
from tests.helpers import make_model, tensor

TARGET = None
SMALL = dict(n_estimators=20, max_depth=3, learning_rate=0.3, subsample=1.0, colsample_bytree=1.0,
             min_child_weight=1.0, tree_method="hist", n_jobs=1, random_state=0)


def _target():
    from qcompiler.targets import parse_target
    from qcompiler.tune.device import describe

    return describe(parse_target("cpu", None))


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    """A log folder with synthetic records of 4 workloads x 5 configs."""
    from qcompiler.tune import records as R
    from qcompiler.tune.workload import Workload

    d = tmp_path_factory.mktemp("cmlog")
    tgt = _target()
    recs = []
    for (M, N, K) in ((16, 32, 64), (8, 64, 32), (32, 16, 128), (4, 48, 64)):
        w = Workload("cpu_vnni", "dense", (M, N, K), "uint8", "uint8", 0, 255, f"cpu:{tgt['arch']}")
        default = w.default_config()
        for mr, nr in ((1, 1), (2, 1), (4, 1), (3, 1), (default.mr, default.nr)):
            if (-(-N // 16)) % nr:
                continue
            cfg = {"mr": mr, "nr": nr, "kc": 0, "n_outer": True}
            lat = 1e-6 * (1 + M * N * K / 2e4 / (mr * nr) ** 0.5 + mr)
            recs.append(R.make_record(w, tgt, cfg, [lat * f for f in (0.99, 1.0, 1.01)], None, "local",
                                      is_default=(mr, nr) == (default.mr, default.nr)))
    with R.RecordWriter(d) as wr:
        for r in recs:
            wr.append(r)
    return d


@pytest.fixture(scope="module")
def trained(log, tmp_path_factory):
    samples, mrecs = D.samples_from(log)
    X, y = D.matrix(samples)
    doc = T.train(samples, X, y, calibration=D.fit_overhead(mrecs), params=SMALL)
    path = tmp_path_factory.mktemp("cm") / "dev.json"
    T.save(doc, path)
    return samples, X, y, doc, path


def test_features_deterministic_and_schema(trained):
    samples, X, _, _, _ = trained
    X2 = F.featurize(samples[:3])
    assert np.array_equal(np.nan_to_num(X[:3], nan=-7.0), np.nan_to_num(X2, nan=-7.0))
    assert X.shape[1] == len(F.NAMES) == F.schema()["n_features"]
    assert F.schema()["schema"] == FEATURE_SCHEMA
    assert F.columns(["text"]).size == F.TEXT_DIM
    # the TIR analysis sees the VNNI intrinsic and the parallel loop of every candidate
    tir = X[:, F.columns(["tir"])]
    assert (tir[:, F.TIR_NAMES.index("x_log_dyn_vnni")] > 0).all()
    assert (tir[:, F.TIR_NAMES.index("x_n_parallel")] >= 1).all()
    toks = F.tokens(samples[0]["text"])
    assert "T.parallel" in toks and "llvm.x86.avx512.vpdpbusd.512" in toks


def test_roundtrip_without_pickle(trained):
    samples, X, y, doc, path = trained
    raw = path.read_bytes()
    assert raw[:1] == b"{" and b"pickle" not in raw and not raw.startswith(b"\x80")
    on_disk = json.loads(raw)
    assert on_disk["schema"] == MODEL_SCHEMA and on_disk["feature_schema"] == FEATURE_SCHEMA
    assert set(on_disk["boosters"]) == {"reg", "q", "rank", "cfg"}
    mem = CostModel(doc)
    disk = CostModel.load(path, _target())
    a, b = mem.predict(X), disk.predict(X)
    for u, v in zip(a, b):
        assert np.allclose(u, v)
    mu, lo, hi = b
    assert (lo <= mu).all() and (mu <= hi).all() and (mu > 0).all()
    assert np.allclose(mem.score(X), disk.score(X))
    cfg = np.stack([F.cfg_only(s["workload"], s["config"], s["target"]) for s in samples])
    assert np.all(np.isfinite(disk.predict_cfg(cfg)))
    # the fit is meaningful on its own training data
    assert abs(np.corrcoef(np.log(mu), y)[0, 1]) > 0.8


def test_bad_model_files_exit_2(trained, tmp_path, small_model, capsys):
    _, _, _, doc, path = trained
    garbage = tmp_path / "g.json"
    garbage.write_text("{not json")
    other_schema = tmp_path / "s.json"
    other_schema.write_text(json.dumps({**doc, "schema": "qc-costmodel/0"}))
    other_feat = tmp_path / "f.json"
    other_feat.write_text(json.dumps({**doc, "feature_schema": "qc-cost-features/0"}))
    other_target = tmp_path / "t.json"
    other_target.write_text(json.dumps({**doc, "target": {"kind": "cuda", "arch": "sm_90", "device": "sm_90"}}))
    for p, words in ((garbage, "not a cost model"), (other_schema, "schema"), (other_feat, "feature schema"),
                     (other_target, "trained for cuda")):
        capsys.readouterr()
        rc = main(["-q", "predict", str(small_model / "m.onnx"), "--calib", str(small_model / "calib.npz"),
                   "--cost-model", str(p), "--json"])
        err = capsys.readouterr().err
        assert rc == 2 and words in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(CostModelError):
        CostModel.load(tmp_path / "missing.json")


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    import onnx

    R = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("pm")
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "W2"], ["logits"])]
    inits = [tensor("W", (R.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32)),
             tensor("B", np.zeros(16, np.float32)), tensor("W2", R.standard_normal((16, 4)).astype(np.float32))]
    onnx.save(make_model(nodes, [("x", ["N", 3, 16, 16])], [("logits", None)], inits), d / "m.onnx")
    np.savez(d / "calib.npz", x=R.standard_normal((4, 3, 16, 16)).astype(np.float32))
    return d


def test_predict_json_with_model(trained, small_model, capsys, tmp_path):
    _, _, _, _, path = trained
    capsys.readouterr()
    png = tmp_path / "p.png"
    rc = main(["-q", "predict", str(small_model / "m.onnx"), "--calib", str(small_model / "calib.npz"),
               "--cost-model", str(path), "--json", "--plot", str(png)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["source"] == "model" and out["note"] is None
    assert out["total_ms"] > 0 and len(out["layers"]) >= 3
    for layer in out["layers"]:
        assert {"op", "inputs", "output", "bits", "predicted_ms", "band_ms", "kernel"} <= set(layer)
        assert layer["band_ms"][0] <= layer["predicted_ms"] <= layer["band_ms"][1]
    assert math.isclose(out["total_ms"], sum(la["predicted_ms"] for la in out["layers"]) + out["overhead_ms"],
                        rel_tol=1e-6)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_predict_roofline_fallback_labelled(small_model, capsys, monkeypatch):
    from qcompiler import progress

    monkeypatch.setenv("QC_COSTMODEL", "off")
    capsys.readouterr()
    old = progress.get()
    try:  # without -q: the console reporter writes the fallback warning to (captured) stderr
        rc = main(["predict", str(small_model / "m.onnx"), "--calib", str(small_model / "calib.npz"), "--json"])
    finally:
        progress.set_reporter(old)
    cap = capsys.readouterr()
    assert rc == 0
    out = json.loads(cap.out)
    assert out["source"] == "roofline" and "roofline" in out["note"] and out["cost_model"] is None
    assert all(la["source"] == "roofline" for la in out["layers"]) and out["total_ms"] > 0
    assert "roofline" in cap.err  # the warning says so too
    rc = main(["-q", "predict", str(small_model / "m.onnx"), "--calib", str(small_model / "calib.npz")])
    assert rc == 0 and "ROOFLINE ESTIMATE" in capsys.readouterr().out


def test_costmodel_cli_train_and_errors(log, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["-q", "costmodel", "train", str(log), "-o", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tuning_samples"] >= 16 and out.is_file()
    assert json.loads(out.read_text())["schema"] == MODEL_SCHEMA
    assert main(["-q", "costmodel", "train", str(tmp_path / "nope"), "-o", str(out)]) == 2
    assert main(["-q", "costmodel", "train", str(log), "-o", str(tmp_path / "m.pkl")]) == 2
    assert main(["-q", "costmodel", "eval", str(log), "--folds", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"rank_by_ranker", "mape_tune"} <= set(r) and 0 <= r["rank_by_ranker"]["top1"] <= 1


def test_compile_time_pick_by_model(trained, monkeypatch):
    """No tuned record: generate() builds the candidate the cost model predicts fastest."""
    from qcompiler.targets import parse_target
    from qcompiler.tune import apply as A
    from qcompiler.tune.workload import Workload

    _, _, _, _, path = trained
    monkeypatch.setenv("QC_COSTMODEL", str(path))
    spec = parse_target("cpu", None)
    w = Workload("cpu_vnni", "dense", (24, 32, 64), "uint8", "uint8", 0, 255, f"cpu:{spec.arch}")
    with A.activate(spec, "off") as tc:
        f = A.generate(w, "layer0", lambda c: w.make_func(c))
    assert f is not None and len(tc.predicted) == 1
    p = tc.predicted[0]
    assert p["workload_key"] == w.key and p["predicted_s"] <= p["default_predicted_s"] * 1.03 + 1e-12
    assert "predicted_layers" in tc.summary()


def test_tuner_warm_start(trained, monkeypatch):
    """QC_TUNE_COSTMODEL: the tuner's random proposals become the model's best of a random pool."""
    from qcompiler.targets import parse_target
    from qcompiler.tune import tuner
    from qcompiler.tune.workload import Task, Workload

    _, _, _, _, path = trained
    monkeypatch.setenv("QC_TUNE_COSTMODEL", str(path))
    monkeypatch.setattr(tuner, "_WARM", {})
    spec = parse_target("cpu", None)
    w = Workload("cpu_vnni", "dense", (24, 32, 64), "uint8", "uint8", 0, 255, f"cpu:{spec.arch}")
    st = tuner.TaskState(Task(w, [], 1))
    props = st.propose(3, set())
    assert len(props) == 3 and str(path) in tuner._WARM
    cm = tuner._WARM[str(path)]
    # the chosen point is the pool's predicted minimum
    pool = st.space[:8]
    best = tuner._best_predicted(cm, w, pool)
    from costmodel.features import cfg_only
    import dataclasses

    preds = cm.predict_cfg(np.stack([cfg_only(w.fields(), dataclasses.asdict(c), cm.target) for c in pool]))
    assert best == pool[int(np.argmin(preds))]
