"""The deployable artifact: ``model.so`` (TVM library) + ``model.json`` (metadata), written atomically.

model.json holds: format version, target, precision and I/O mode, every input/output with its
name, shape, dtype and scale, the precision of every layer, versions, and the scheduled TIR of
the library (gzip + base64) so ``qc inspect`` can prove integer-only-ness from the code itself.
Nothing is published until both files are complete: each is written to a temporary name in the
destination folder and renamed into place (``os.replace`` is atomic on POSIX).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import json
import os
import tempfile
from pathlib import Path

from .errors import ArtifactError

FORMAT = "qcompiler-library"
FORMAT_VERSION = 1


def metadata_path(lib_path: str | os.PathLike) -> Path:
    p = Path(lib_path)
    return p.with_suffix(".json") if p.suffix == ".so" else Path(str(p) + ".json")


def encode_text(text: str) -> dict:
    raw = text.encode()
    return {"encoding": "gzip+base64", "sha256": hashlib.sha256(raw).hexdigest(),
            "data": base64.b64encode(gzip.compress(raw, 6)).decode()}


def decode_text(blob: dict) -> str:
    if blob.get("encoding") != "gzip+base64":
        raise ArtifactError("metadata: unknown TIR encoding")
    raw = gzip.decompress(base64.b64decode(blob["data"]))
    if hashlib.sha256(raw).hexdigest() != blob.get("sha256"):
        raise ArtifactError("metadata: the stored TIR is corrupt (checksum mismatch)")
    return raw.decode()


def check_writable(out: str | os.PathLike) -> Path:
    p = Path(out)
    d = p.parent if str(p.parent) else Path(".")
    if p.exists() and p.is_dir():
        raise ArtifactError(f"{p}: is a directory; give a file name such as model.so")
    if not d.exists():
        raise ArtifactError(f"{d}: output folder does not exist; create it first")
    if not os.access(d, os.W_OK):
        raise ArtifactError(f"{d}: output folder is not writable")
    return p


@contextlib.contextmanager
def atomic_paths(*finals: Path):
    """Yields temporary paths beside ``finals``; renames them into place only if the block succeeds."""
    tmps = []
    try:
        for f in finals:
            fd, t = tempfile.mkstemp(prefix=f".{f.name}.", suffix=f.suffix or ".tmp", dir=f.parent or ".")
            os.close(fd)
            tmps.append(Path(t))
        yield tmps
        for t, f in zip(tmps, finals):
            os.replace(t, f)
        tmps = []
    finally:
        for t in tmps:
            with contextlib.suppress(OSError):
                t.unlink()


def write_json(path: Path, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=_json_default)
        f.flush()
        os.fsync(f.fileno())


def _json_default(o):
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o)}")


def read_metadata(lib_path: str | os.PathLike) -> dict:
    lib = Path(lib_path)
    if not lib.exists():
        raise ArtifactError(f"{lib}: no such library (compile one with `qc compile`)")
    meta = metadata_path(lib)
    if not meta.exists():
        raise ArtifactError(f"{meta}: metadata file missing beside {lib.name} (copy it along with the library)")
    try:
        with open(meta) as f:
            m = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{meta}: unreadable metadata ({e})") from None
    if m.get("format") != FORMAT:
        raise ArtifactError(f"{meta}: not a qcompiler library metadata file")
    if m.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{meta}: metadata format {m.get('format_version')} is not supported by this "
                            f"version (expects {FORMAT_VERSION}); recompile the model")
    return m
