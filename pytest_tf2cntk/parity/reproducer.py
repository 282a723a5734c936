"""Reproducers: one .npz per failure with the inputs, the three outputs, versions and options.

``tf2cntk replay FILE.npz`` runs the stored inputs through the three backends again and prints
the same diagnostic table, so a failure seen in CI can be examined anywhere.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pytest_tf2cntk.convert.pipeline import Conversion
    from pytest_tf2cntk.parity.engine import Evaluation, ParityResult

DEFAULT_DIR = Path(".tf2cntk") / "reproducers"
EMBED_ONNX_LIMIT = 64 << 20  # the CNTK-bound graph travels inside the file up to this size


def write_reproducer(result: "ParityResult", ev: "Evaluation", directory: str | os.PathLike | None,
                     conv: "Conversion", cntk_onnx: str) -> Path:
    directory = Path(directory or DEFAULT_DIR)
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
    size = os.path.getsize(cntk_onnx)
    if size <= EMBED_ONNX_LIMIT:
        arrays["cntk_onnx"] = np.frombuffer(Path(cntk_onnx).read_bytes(), np.uint8)
    meta = {"model": os.path.abspath(result.model), "device": result.device,
            "batch": conv.batch, "opset": conv.opset, "signature": conv.signature,
            "unsafe_load": conv.unsafe_load, "cntk_onnx_path": os.path.abspath(cntk_onnx),
            "seed": result.seed, "versions": result.versions, "inputs": result.inputs,
            "budgets": {k: c.budget.to_json() for k, c in result.outputs.items()},
            "verdict": {k: c.to_json() for k, c in result.outputs.items()}}
    arrays["meta"] = np.frombuffer(json.dumps(meta, default=str).encode(), np.uint8)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return path


def read_reproducer(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    from pytest_tf2cntk.errors import Tf2CntkError

    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            groups: dict[str, dict[str, np.ndarray]] = {"input": {}, "tf": {}, "cntk": {}, "ort": {}}
            for key in data.files:
                kind, _, name = key.partition(":")
                if kind in groups and name:
                    groups[kind][name] = data[key]
            if "cntk_onnx" in data.files:
                groups["cntk_onnx"] = {"bytes": data["cntk_onnx"]}
    except (OSError, KeyError, ValueError) as exc:
        raise Tf2CntkError(f"{path} is not a tf2cntk reproducer: {exc}",
                           hint="reproducers are the .npz files named in parity failure messages")
    return meta, groups


def replay(path: str | os.PathLike, cntk_python: str | None = None,
           cache_dir: str | os.PathLike | None = None) -> "ParityResult":
    """Re-run a stored failure: the same inputs through TF, ONNX Runtime and CNTK."""
    import tempfile

    from pytest_tf2cntk.parity.budgets import OutputBudget
    from pytest_tf2cntk.convert.pipeline import convert
    from pytest_tf2cntk.parity.engine import ParityEngine, ParityResult, conversion_summary, versions

    meta, groups = read_reproducer(path)
    conv = convert(meta["model"], batch=meta["batch"], opset=meta["opset"], signature=meta["signature"],
                   unsafe_load=meta["unsafe_load"], cache_dir=cache_dir)
    cntk_onnx = meta["cntk_onnx_path"]
    if "cntk_onnx" in groups:  # the exact graph CNTK saw, even if the file is gone
        tmp = Path(tempfile.mkdtemp(prefix="tf2cntk-replay-")) / "cntk.onnx"
        tmp.write_bytes(groups["cntk_onnx"]["bytes"].tobytes())
        cntk_onnx = str(tmp)
    engine = ParityEngine(conv, meta["device"], cntk_python=cntk_python, cntk_onnx=cntk_onnx)
    started = time.perf_counter()
    try:
        # judge against the budgets recorded at failure time, so a replay cannot pass by drift
        engine.budgets = {k: OutputBudget(k, b["value"], b["unit_roundoff"], b["terms"],
                                          tuple(tuple(d) for d in b["dominant"]), b["overridden"],
                                          tuple(b["unknown_ops"])) for k, b in meta["budgets"].items()}
        ev = engine.evaluate(groups["input"], with_ort=True)
    finally:
        engine.close()
    return ParityResult(model=meta["model"], device=meta["device"], passed=ev.passed, outputs=ev.checks,
                        examples=1, seconds=time.perf_counter() - started,
                        conversion=conversion_summary(conv, cntk_onnx), inputs=meta["inputs"],
                        timings=dict(engine.timings), seed=meta.get("seed"), versions=versions())
