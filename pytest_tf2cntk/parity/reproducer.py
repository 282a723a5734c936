"""Reproducers: one .npz per failure with the inputs, the three outputs, versions and options.

``tf2cntk replay FILE.npz`` (``replay.py``) runs the stored inputs through the three backends
again and prints the same diagnostic table, so a failure seen in CI can be examined anywhere.
The metadata is a typed ``ReproducerMeta`` stored as JSON bytes (no pickle).
"""
from __future__ import annotations

import json
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pytest_tf2cntk.codec import Jsonable
from pytest_tf2cntk.convert.options import ConversionOptions
from pytest_tf2cntk.errors import Tf2CntkError
from pytest_tf2cntk.parity.budgets import OutputBudget
from pytest_tf2cntk.parity.options import REPRODUCER_DIR
from pytest_tf2cntk.parity.result import OutputCheck

if TYPE_CHECKING:
    from pytest_tf2cntk.convert.pipeline import Conversion
    from pytest_tf2cntk.parity.result import Evaluation, ParityResult

FORMAT = 2
EMBED_ONNX_LIMIT = 64 << 20  # the CNTK-bound graph travels inside the file up to this size


@dataclass
class ReproducerMeta(Jsonable):
    model: str
    device: str
    conversion: ConversionOptions
    cntk_onnx_path: str
    seed: int | None = None
    versions: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)  # how each input was drawn
    budgets: dict[str, OutputBudget] = field(default_factory=dict)  # judged against these on replay
    verdict: dict[str, OutputCheck] = field(default_factory=dict)
    format: int = FORMAT


@dataclass
class Reproducer:
    meta: ReproducerMeta
    inputs: dict[str, np.ndarray]
    tf: dict[str, np.ndarray]
    cntk: dict[str, np.ndarray]
    ort: dict[str, np.ndarray]
    cntk_onnx: bytes | None = None  # the exact graph CNTK saw


def write_reproducer(result: "ParityResult", ev: "Evaluation", directory: str | os.PathLike | None,
                     conv: "Conversion", cntk_onnx: str) -> Path:
    directory = Path(directory or REPRODUCER_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    stem = Path(result.model.rstrip("/")).name.replace(".", "_")
    path = directory / f"{stem}-{result.device.replace(':', '')}-{time.strftime('%Y%m%d-%H%M%S')}.npz"
    n = 1
    while path.exists():
        n += 1
        path = path.with_name(f"{path.stem.rsplit('.', 1)[0]}-{n}.npz")
    arrays: dict[str, Any] = {f"input:{k}": v for k, v in ev.feeds.items()}
    arrays.update({f"tf:{k}": v for k, v in ev.tf.items()})
    arrays.update({f"cntk:{k}": v for k, v in ev.cntk.items()})
    arrays.update({f"ort:{k}": v for k, v in (ev.ort or {}).items()})
    if os.path.getsize(cntk_onnx) <= EMBED_ONNX_LIMIT:
        arrays["cntk_onnx"] = np.frombuffer(Path(cntk_onnx).read_bytes(), np.uint8)
    meta = ReproducerMeta(os.path.abspath(result.model), result.device, conv.options, os.path.abspath(cntk_onnx),
                          result.seed, result.versions, result.inputs,
                          {k: c.budget for k, c in result.outputs.items()}, dict(result.outputs))
    arrays["meta"] = np.frombuffer(json.dumps(meta.to_json()).encode(), np.uint8)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return path


def read_reproducer(path: str | os.PathLike) -> Reproducer:
    """The stored failure; Tf2CntkError for anything that is not a reproducer."""
    try:
        with np.load(path, allow_pickle=False) as data:
            raw = json.loads(bytes(data["meta"]).decode())
            groups: dict[str, dict[str, np.ndarray]] = {"input": {}, "tf": {}, "cntk": {}, "ort": {}}
            for key in data.files:
                kind, _, name = key.partition(":")
                if kind in groups and name:
                    groups[kind][name] = data[key]
            graph = data["cntk_onnx"].tobytes() if "cntk_onnx" in data.files else None
        meta = ReproducerMeta.from_json(_upgrade(raw))
    except (OSError, EOFError, zipfile.BadZipFile, KeyError, ValueError, TypeError) as exc:
        raise Tf2CntkError(f"{path} is not a tf2cntk reproducer: {_why(path, exc)}",
                           hint="reproducers are the .npz files named in parity failure messages; if this "
                                "is one, it was cut short: run the failing test again to write it anew") from None
    return Reproducer(meta, groups["input"], groups["tf"], groups["cntk"], groups["ort"], graph)


def _why(path: str | os.PathLike, exc: BaseException) -> str:
    """What is wrong with the file, in its terms: numpy's own words for a non-zip file advise
    allow_pickle, which a reproducer never needs."""
    if isinstance(exc, OSError) and not isinstance(exc, zipfile.BadZipFile):
        return exc.strerror or str(exc)
    size = os.path.getsize(path) if os.path.isfile(path) else 0
    if isinstance(exc, EOFError) or size == 0:
        return "the file is empty"
    if isinstance(exc, zipfile.BadZipFile) or not zipfile.is_zipfile(path):
        return f"it is not an .npz (zip) archive, or it is truncated ({size} bytes)"
    if isinstance(exc, KeyError):
        return f"it is an .npz archive without tf2cntk's entries ({exc})"
    return f"its contents cannot be read ({type(exc).__name__}: {exc})"


def _upgrade(raw: dict[str, Any]) -> dict[str, Any]:
    """Format 1 (pytest-tf2cntk 0.1) kept the conversion options at the top level."""
    if raw.get("format", 1) >= 2:
        return raw
    conversion = {k: raw.pop(k) for k in ("batch", "opset", "signature", "unsafe_load") if k in raw}
    return dict(raw, conversion=conversion, format=FORMAT)
