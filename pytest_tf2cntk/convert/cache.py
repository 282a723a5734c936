"""Content-addressed cache of conversions, safe under concurrent processes.

Key: sha256 over the model's files, the conversion options and the versions of everything that
shapes the result. Entries are written to a temp dir and renamed into place under a file lock;
each entry records the sha256 of its ONNX file, and an entry that fails that check is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pytest_tf2cntk.versions import package_versions

CACHE_FORMAT = "1"
ENV_CACHE_DIR = "TF2CNTK_CACHE_DIR"


def default_cache_dir() -> Path:
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "pytest-tf2cntk" / "conversions"


def hash_model_files(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ConversionCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root or default_cache_dir())

    def key(self, model_path: Path, options: dict[str, Any], pipeline: str) -> str:
        material = {"format": CACHE_FORMAT, "model": hash_model_files(model_path),
                    "options": options, "versions": package_versions(), "pipeline": pipeline}
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]

    def entry_dir(self, key: str) -> Path:
        return self.root / key

    @contextmanager
    def lock(self, key: str, timeout: float = 1800) -> Iterator[None]:
        """Held while converting, so parallel processes convert each model once."""
        from filelock import FileLock

        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / f"{key}.lock"), timeout=timeout):
            yield

    def get(self, key: str) -> tuple[Path, dict[str, Any]] | None:
        """(onnx path, metadata) of a sound entry, or None. A corrupt entry is removed."""
        entry = self.entry_dir(key)
        meta_path = entry / "meta.json"
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text("utf-8"))
            if meta.get("error"):
                return entry / "model.onnx", meta
            onnx_path = entry / "model.onnx"
            if file_sha256(onnx_path) != meta["onnx_sha256"]:
                raise ValueError("checksum mismatch")
            return onnx_path, meta
        except (OSError, ValueError, KeyError):
            shutil.rmtree(entry, ignore_errors=True)
            return None

    def put(self, key: str, onnx_bytes: bytes | None, meta: dict[str, Any]) -> Path:
        """Atomically install an entry (a failed conversion is stored as meta with 'error')."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
        if onnx_bytes is not None:
            (tmp / "model.onnx").write_bytes(onnx_bytes)
            meta = dict(meta, onnx_sha256=hashlib.sha256(onnx_bytes).hexdigest())
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True), "utf-8")
        entry = self.entry_dir(key)
        if entry.exists():
            shutil.rmtree(entry, ignore_errors=True)
        os.replace(tmp, entry)
        return entry / "model.onnx"
