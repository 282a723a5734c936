"""State of one pytest run: conversions (each once), parity results, the merged report.

No pytest import: the plugin passes what it needs. Results are plain JSON-able dicts so xdist
workers can send them to the controller, which merges them into one summary and one report.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pytest_tf2cntk.options import Settings

REPORT_FORMAT = 1


@dataclass
class ModelHandle:
    """What the ``tf2cntk_model`` fixture gives a hand-written test."""

    session: "Tf2CntkSession"
    path: Path
    budgets: dict[str, Any] | None = None
    inputs: dict[str, tuple[float, float]] | None = None

    @property
    def conversion(self) -> Any:
        return self.session.conversion(self.path)

    @property
    def tf(self) -> Any:
        return self.conversion.tf_model

    @property
    def onnx(self) -> Any:
        return self.conversion.onnx_model

    @property
    def domains(self) -> dict[str, Any]:
        from pytest_tf2cntk.convert.domains import derive_domains

        return derive_domains(self.onnx, self._ranges())

    def _ranges(self) -> dict[str, tuple[float, float]]:
        return {**self.session.settings.inputs, **(self.inputs or {})}

    def inputs_strategy(self, edge_values: bool | None = None) -> Any:
        from pytest_tf2cntk.parity.inputs import inputs_strategy, materialize

        doms = self.domains
        edges = self.session.settings.edge_values if edge_values is None else edge_values
        return inputs_strategy(doms, edges).map(lambda recipes: materialize(recipes, doms))

    def run_tf(self, feeds: dict[str, Any], device: str = "cpu") -> dict[str, Any]:
        return self.tf.run(feeds, device)

    def run_ort(self, feeds: dict[str, Any]) -> dict[str, Any]:
        from pytest_tf2cntk.convert import onnxrt

        return onnxrt.run(self.onnx, feeds)

    def run_cntk(self, feeds: dict[str, Any], device: str = "cpu", outputs: list[str] | None = None) -> dict[str, Any]:
        return self.session.worker().eval(self.session.loaded(self.conversion.onnx_path, device),
                                          feeds, outputs)

    def check(self, device: str = "cpu", **kwargs: Any) -> Any:
        """A full parity check with this test's budgets and input ranges; returns a ParityResult."""
        return self.session.parity(self.conversion, device, budgets=self.budgets, inputs=self.inputs,
                                   **kwargs)


@dataclass
class Tf2CntkSession:
    settings: Settings
    rootdir: Path
    worker_id: str | None = None
    results: list[dict[str, Any]] = field(default_factory=list)
    conversions: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _converted: dict[Path, Any] = field(default_factory=dict)
    _loaded: dict[tuple[str, str], Any] = field(default_factory=dict)
    _last: Any = None  # the last ParityResult, for the item's JUnit properties
    started: float = field(default_factory=time.time)
    judge: Any = None  # drift.DriftJudge once the history is open
    layerwise: list[dict[str, Any]] = field(default_factory=list)  # per-op rows for the history

    # -- history and drift ----------------------------------------------------------------
    def open_history(self) -> None:
        """Create/migrate the history (controller only) and read the baselines for drift.
        Called at start-up when models are configured, else by the first parity check, so a
        project that has the plugin installed but does not use it gets no history file."""
        if self.settings.no_history or self.judge is not None:
            return
        from pytest_tf2cntk.history import drift
        from pytest_tf2cntk.history import store as history

        if self.worker_id is None:
            history.ensure_history(self.settings.history)
        self.judge = drift.DriftJudge(self.settings.history, self.settings.baseline,
                                      self.settings.fail_on_drift or drift.DEFAULT_FACTOR)

    def judge_drift(self) -> list[str]:
        """Attach drift verdicts to the last result; the messages of significant drift when
        --tf2cntk-fail-on-drift is set (they fail the item)."""
        if self.judge is None or not self.results:
            return []
        record = self.results[-1]
        verdicts = self.judge.judge_result(record)
        record["drift"] = {k: v.to_json() for k, v in verdicts.items()}
        if not self.settings.fail_on_drift:
            return []
        return [v.message for v in verdicts.values() if v.significant]

    # -- models ---------------------------------------------------------------------------
    def is_model(self, path: Path) -> bool:
        if not self.settings.models:
            return False
        resolved = Path(path).resolve()
        return any(resolved == m.resolve() for m in self.settings.models)

    def conversion(self, path: Path, progress: Callable[[str], None] | None = None) -> Any:
        """Convert once per session; a failure is remembered and re-raised for every item."""
        from pytest_tf2cntk.convert.pipeline import convert
        from pytest_tf2cntk.errors import Tf2CntkError

        key = Path(path).resolve()
        if key not in self._converted:
            s = self.settings
            try:
                conv = convert(key, batch=s.batch, opset=s.opset, signature=s.signature,
                               unsafe_load=s.unsafe_load, cache_dir=s.cache_dir, progress=progress)
                self._converted[key] = conv
                self.conversions.append({"model": self._rel(key), "ok": True, "onnx": str(conv.onnx_path),
                                         "ops": conv.ops, "passes": conv.passes, "warnings": conv.warnings,
                                         "from_cache": conv.from_cache, "seconds": conv.seconds})
            except Tf2CntkError as exc:
                self._converted[key] = exc
                self.conversions.append({"model": self._rel(key), "ok": False, "error": str(exc),
                                         "type": type(exc).__name__})
        value = self._converted[key]
        if isinstance(value, Exception):
            raise value
        return value

    def handle(self, path: Path, budgets: dict | None = None, inputs: dict | None = None) -> ModelHandle:
        return ModelHandle(self, path, budgets, inputs)

    def worker(self) -> Any:
        from pytest_tf2cntk.cntk.client import get_worker

        worker = get_worker(self.settings.cntk_python)
        worker.timeout = self.settings.timeout  # --tf2cntk-timeout: per call, then replaced
        return worker

    def loaded(self, onnx_path: Path, device: str) -> Any:
        """The model loaded in the worker, once per (file, device) for the whole session."""
        key = (str(onnx_path), device)
        if key not in self._loaded:
            self._loaded[key] = self.worker().load(str(onnx_path), device=device)
        return self._loaded[key]

    # -- parity ---------------------------------------------------------------------------
    def parity(self, conv: Any, device: str, budgets: dict | None = None,
               inputs: dict | None = None, config: Any = None, **kwargs: Any) -> Any:
        """One parity check with the session's settings; ``config`` (pytest's) enables progress."""
        from pytest_tf2cntk.parity.engine import check_parity

        s = self.settings
        self.open_history()
        self.worker()  # the shared worker, with this session's timeout
        merged_budgets = {**s.budgets, **(budgets or {})}
        ranges = {**s.inputs, **(inputs or {})}
        db = None
        if not os.environ.get("CI") and s.seed is None:
            from hypothesis.database import DirectoryBasedExampleDatabase

            db = DirectoryBasedExampleDatabase(str(self.rootdir / ".hypothesis" / "tf2cntk"))
        params: dict[str, Any] = dict(max_examples=s.max_examples, seed=s.seed, budgets=merged_budgets,
                                      budget_scale=s.budget_scale, inputs=ranges, edge_values=s.edge_values,
                                      cntk_python=s.cntk_python, conversion=conv, database=db,
                                      reproducer_dir=self.rootdir / ".tf2cntk" / "reproducers",
                                      layerwise="always" if s.layerwise else "on-failure")
        if config is not None:
            params["progress"] = self._example_progress(config, f"{self._rel(conv.source)} [{device}]")
        params.update(kwargs)
        result = check_parity(conv.source, device, **params)
        record = result.to_json()
        record["model"] = self._rel(Path(conv.source))
        self.results.append(record)
        self.layerwise.extend(dict(row, model=record["model"]) for row in result.layer_rows)
        self._last = result
        drifted = self.judge_drift()
        if drifted and result.passed:
            from pytest_tf2cntk.errors import ParityFailure

            raise ParityFailure(f"{result}\nerror drift beyond --tf2cntk-fail-on-drift="
                                f"{s.fail_on_drift:g}:\n" + "\n".join(f"  {m}" for m in drifted))
        return result

    def record_skip(self, path: Path, device: str, reason: str) -> None:
        self.results.append({"model": self._rel(path), "device": device, "skipped": reason})

    def properties(self) -> list[tuple[str, Any]]:
        """Key numbers of the last parity check for JUnit XML (record_property)."""
        result = self._last
        if result is None:
            return []
        self._last = None
        props: list[tuple[str, Any]] = [("tf2cntk_passed", result.passed), ("tf2cntk_examples", result.examples)]
        for name, c in result.outputs.items():
            props += [(f"tf2cntk_{name}_scaled_error", f"{c.error:.6g}"),
                      (f"tf2cntk_{name}_budget", f"{c.budget.value:.6g}"),
                      (f"tf2cntk_{name}_headroom", f"{c.headroom:.6g}")]
        if result.reproducer:
            props.append(("tf2cntk_reproducer", result.reproducer))
        drift = self.results[-1].get("drift", {}) if self.results else {}
        props += [(f"tf2cntk_{name}_drift_ratio", f"{v['ratio']:.4g}") for name, v in drift.items()
                  if v.get("ratio") is not None]
        return props

    def progress(self, config: Any, msg: str) -> None:
        """Long work (a cold conversion) shows a line in verbose mode, past output capture."""
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        capman = config.pluginmanager.get_plugin("capturemanager")
        if reporter is None or capman is None or config.option.verbose <= 0 or self.worker_id is not None:
            return
        with capman.global_and_fixture_disabled():
            reporter.write_line(f"tf2cntk: {msg}")

    def _example_progress(self, config: Any, label: str) -> Callable[[int, int], None]:
        """Report examples every few seconds when a check is slow (large models)."""
        last = [time.perf_counter()]

        def report(done: int, total: int) -> None:
            now = time.perf_counter()
            if now - last[0] >= 5.0:
                last[0] = now
                self.progress(config, f"{label}: {done}/{total} examples")
        return report

    def _rel(self, path: Path) -> str:
        try:
            return str(Path(path).resolve().relative_to(self.rootdir.resolve()))
        except ValueError:
            return str(path)

    # -- xdist ----------------------------------------------------------------------------
    def payload(self) -> dict[str, Any]:
        return {"results": self.results, "conversions": self.conversions, "layerwise": self.layerwise}

    def merge(self, payload: dict[str, Any]) -> None:
        self.results.extend(payload.get("results", []))
        self.layerwise.extend(payload.get("layerwise", []))
        seen = {(c["model"], c["ok"]) for c in self.conversions}
        for c in payload.get("conversions", []):
            if (c["model"], c["ok"]) not in seen:
                self.conversions.append(c)
                seen.add((c["model"], c["ok"]))

    # -- reports --------------------------------------------------------------------------
    def summary_rows(self) -> list[tuple[str, ...]]:
        rows = []
        for r in sorted(self.results, key=lambda r: (r["model"], r["device"])):
            if "skipped" in r:
                rows.append((r["model"], r["device"], "-", "-", "-", "-", "-", f"skipped: {r['skipped']}"))
                continue
            for name, o in sorted(r["outputs"].items()):
                rows.append((r["model"], r["device"], name, f"{o['scaled_error']:.3g}",
                             f"{o['budget']['value']:.3g}", f"{o['headroom']:.3g}x", str(r["examples"]),
                             "PASS" if o["passed"] else f"FAIL ({o['stage']})"))
        for c in self.conversions:
            if not c["ok"]:
                rows.append((c["model"], "-", "-", "-", "-", "-", "-",
                             f"conversion failed: {c['error'].splitlines()[0]}"))
        return rows

    HEADER = ("model", "device", "output", "error", "budget", "headroom", "examples", "verdict")

    def summary_lines(self) -> list[str]:
        rows = self.summary_rows()
        if not rows:
            return []
        table = [self.HEADER] + rows
        widths = [max(len(r[i]) for r in table) for i in range(len(self.HEADER))]
        return ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in table]

    def markdown(self) -> str:
        rows = self.summary_rows()
        out = ["## tf2cntk parity", "", "| " + " | ".join(self.HEADER) + " |",
               "|" + "---|" * len(self.HEADER)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out) + "\n"

    def _record_history(self, exitstatus: int) -> None:
        if self.settings.no_history or not self.results:
            return
        from pytest_tf2cntk.history import store as history
        from pytest_tf2cntk.errors import HistoryError

        try:
            run = history.run_info(self.rootdir, options=self._settings_json(), results=self.results,
                                   exitstatus=exitstatus, duration=time.time() - self.started,
                                   started=self.started)
            run_id = history.record_run(self.settings.history, run, self.results,
                                        layerwise=self.layerwise or None)
            self.notes.append(f"tf2cntk: run {run_id} recorded in {self.settings.history}")
        except HistoryError as exc:
            self.notes.append(f"tf2cntk: history not recorded: {exc}")

    def _settings_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.settings.__dict__.items()
                if k != "models"}

    def report(self, exitstatus: int) -> dict[str, Any]:
        from pytest_tf2cntk.convert.cache import host_versions

        passed = all(r.get("passed", True) for r in self.results) and all(c["ok"] for c in self.conversions)
        return {"format": REPORT_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "duration": time.time() - self.started, "exitstatus": int(exitstatus), "passed": passed,
                "settings": self._settings_json(),
                "models": [self._rel(m) for m in self.settings.models],
                "versions": host_versions(),
                "conversions": self.conversions, "results": self.results}

    def finish(self, exitstatus: int) -> None:
        if not self.results and not self.conversions:
            return
        if self.settings.report:
            path = Path(self.settings.report)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(json.dumps(self.report(exitstatus), indent=1, default=str), "utf-8")
            os.replace(tmp, path)
            self.notes.append(f"tf2cntk: JSON report written to {path}")
        self._record_history(exitstatus)
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary:
            with open(summary, "a", encoding="utf-8") as fh:
                fh.write(self.markdown())
