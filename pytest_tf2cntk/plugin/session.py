"""State of one pytest run: conversions (each once), parity results, drift, the history.

No pytest import: the plugin passes what it needs. Results are typed records
(``history.records``) that xdist workers send to the controller as JSON, which merges them into
one summary and one report (``summary.py``). Nothing heavy is imported until a model is used.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from typing import TYPE_CHECKING

from pytest_tf2cntk.errors import DeviceUnavailable, LostCheck, ParityFailure, Tf2CntkError
from pytest_tf2cntk.options import Settings, group
from pytest_tf2cntk.project_tables import parse_budget_table, parse_input_ranges

MARKER_BUDGETS, MARKER_INPUTS = "@pytest.mark.tf2cntk(budgets=...)", "@pytest.mark.tf2cntk(inputs=...)"

if TYPE_CHECKING:  # the records import numpy and onnx: not at plugin load, only once a check runs
    from pytest_tf2cntk.history.records import CheckRecord, RunPayload


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

        return derive_domains(self.onnx, {**self.session.settings.inputs, **(self.inputs or {})})

    def inputs_strategy(self, edge_values: bool | None = None) -> Any:
        from pytest_tf2cntk.parity.inputs import inputs_strategy, materialize

        doms = self.domains
        edges = self.session.settings.edge_values if edge_values is None else edge_values
        return inputs_strategy(doms, edges).map(lambda recipes: materialize(recipes, doms))

    def run_tf(self, feeds: dict[str, Any], device: str = "cpu") -> dict[str, Any]:
        return self.tf.run(feeds, device)

    def run_ort(self, feeds: dict[str, Any]) -> dict[str, Any]:
        from pytest_tf2cntk.parity.runners import OrtRunner

        return OrtRunner(self.onnx, "cpu").run(feeds)

    def run_cntk(self, feeds: dict[str, Any], device: str = "cpu", outputs: list[str] | None = None) -> dict[str, Any]:
        return self.session.worker().eval(self.session.loaded(self.conversion.onnx_path, device), feeds, outputs)

    def check(self, device: str = "cpu", **kwargs: Any) -> Any:
        """A full parity check with this test's budgets and input ranges; returns a ParityResult."""
        return self.session.parity(self.conversion, device, budgets=self.budgets, inputs=self.inputs, **kwargs)


@dataclass
class Tf2CntkSession:
    settings: Settings
    rootdir: Path
    worker_id: str | None = None
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    judge: Any = None  # history.drift.DriftJudge once the history is open
    _converted: dict[Path, Any] = field(default_factory=dict)
    _loaded: dict[tuple[str, str], Any] = field(default_factory=dict)
    _cntk_checked: set[Path] = field(default_factory=set)  # converted models CNTK loads and runs
    _last: Any = None  # the last CheckRecord, for the item's JUnit properties
    _run: Any = None  # RunPayload, made on first use
    _sent: tuple[int, int, int] = (0, 0, 0)  # results, conversions, layers already sent (xdist worker)

    @property
    def run(self) -> "RunPayload":
        if self._run is None:
            from pytest_tf2cntk.history.records import RunPayload

            self._run = RunPayload()
        return self._run

    @property
    def used(self) -> bool:
        """Whether any model was converted or checked in this process."""
        return self._run is not None and bool(self._run.results or self._run.conversions)

    # -- history and drift ----------------------------------------------------------------
    def open_history(self) -> None:
        """Create/migrate the history (controller only) and read the baselines for drift.
        Called at start-up when models are configured, else by the first parity check, so a
        project that has the plugin installed but does not use it gets no history file."""
        if self.settings.no_history or self.judge is not None:
            return
        from pytest_tf2cntk.history import drift, store

        if self.worker_id is None:
            store.ensure_history(self.settings.history)
        self.judge = drift.DriftJudge(self.settings.history, self.settings.baseline,
                                      self.settings.fail_on_drift or drift.DEFAULT_FACTOR)

    def judge_drift(self, record: CheckRecord) -> list[str]:
        """Attach drift verdicts to ``record``; the messages of significant drift when
        --tf2cntk-fail-on-drift is set (they fail the item)."""
        if self.judge is None or record.result is None:
            return []
        record.drift = self.judge.judge_result(record.model, record.result)
        if not self.settings.fail_on_drift:
            return []
        return [v.message for v in record.drift.values() if v.significant]

    # -- models ---------------------------------------------------------------------------
    def is_model(self, path: Path) -> bool:
        if not self.settings.models:
            return False
        resolved = Path(path).resolve()
        return any(resolved == m.resolve() for m in self.settings.models)

    def conversion(self, path: Path, progress: Callable[[str], None] | None = None, check_cntk: bool = False) -> Any:
        """Convert once per session; a failure is remembered and re-raised for every item.
        ``check_cntk`` (the model's items): CNTK must also load and run the graph at its batch."""
        from pytest_tf2cntk.convert.pipeline import convert
        from pytest_tf2cntk.history.records import ConversionRecord

        key = Path(path).resolve()
        if key not in self._converted:
            try:
                conv = convert(key, **self.settings.pick(group("conversion")), progress=progress)
                self._converted[key] = conv
                self.run.conversions.append(ConversionRecord(self.rel(key), True, str(conv.onnx_path), conv.ops,
                                                             conv.passes, conv.warnings, conv.from_cache,
                                                             conv.seconds, repairs=list(conv.repairs)))
            except Tf2CntkError as exc:
                self._converted[key] = exc
                self.run.conversions.append(ConversionRecord(self.rel(key), False, error=str(exc),
                                                             type=type(exc).__name__))
        value = self._converted[key]
        if isinstance(value, Exception):
            raise value
        if check_cntk and key not in self._cntk_checked:
            self._check_cntk(key, value)
        return value

    def _check_cntk(self, key: Path, conv: Any) -> None:
        """Load and run the graph in CNTK at the batch under test; CNTK's refusal fails the
        conversion (its row, every item of the model) rather than each parity search."""
        from pytest_tf2cntk.errors import CNTKLoadError
        from pytest_tf2cntk.history.records import ConversionRecord
        from pytest_tf2cntk.parity.runners import check_cntk_runs

        devices = sorted(self.settings.devices)
        device = "cpu" if "cpu" in devices or not devices else devices[0]
        try:
            check_cntk_runs(conv, device, self.worker())
        except DeviceUnavailable:
            pass  # the parity item on that device skips and says why; asking again would not help
        except CNTKLoadError as exc:
            self._converted[key] = exc
            rel = self.rel(key)
            failed = ConversionRecord(rel, False, str(conv.onnx_path), conv.ops, conv.passes, conv.warnings,
                                      conv.from_cache, conv.seconds, error=str(exc), type=type(exc).__name__,
                                      repairs=list(conv.repairs))
            done = self.run.conversions
            done[:] = [failed if c.model == rel else c for c in done]  # in place: xdist counts what it sent
            raise
        self._cntk_checked.add(key)

    def handle(self, path: Path, budgets: dict | None = None, inputs: dict | None = None) -> ModelHandle:
        """A test's model; its marker's tables checked now (ConfigError), before any conversion."""
        return ModelHandle(self, path, parse_budget_table(budgets, MARKER_BUDGETS) if budgets else None,
                           parse_input_ranges(inputs, MARKER_INPUTS) if inputs else None)

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
    def parity_options(self, budgets: dict | None = None, inputs: dict | None = None, model: str = "",
                       **overrides: Any) -> Any:
        """The check this session asks for: its settings (the budgets of ``model``, a path relative
        to the rootdir), a test's budgets and ranges, overrides."""
        from pytest_tf2cntk.project_tables import budgets_for
        from pytest_tf2cntk.parity.options import ParityOptions

        s = self.settings
        values: dict[str, Any] = dict(
            max_examples=s.max_examples, seed=s.seed, derandomize=bool(os.environ.get("CI")) and s.seed is None,
            reference=s.reference,
            budgets={**budgets_for(s.budgets, model), **parse_budget_table(budgets, MARKER_BUDGETS)},
            budget_scale=s.budget_scale,
            inputs={**s.inputs, **parse_input_ranges(inputs, MARKER_INPUTS)}, edge_values=s.edge_values,
            cntk_python=s.cntk_python,
            reproducer_dir=self.rootdir / ".tf2cntk" / "reproducers",
            layerwise="always" if s.layerwise else "on-failure", database=self._database())
        values.update(overrides)
        return ParityOptions.build(**values)

    def _database(self) -> Any:
        if os.environ.get("CI") or self.settings.seed is not None:
            return None  # CI runs are derandomized; a seeded run must not replay old examples
        from hypothesis.database import DirectoryBasedExampleDatabase

        return DirectoryBasedExampleDatabase(str(self.rootdir / ".hypothesis" / "tf2cntk"))

    def parity(self, conv: Any, device: str, budgets: dict | None = None, inputs: dict | None = None,
               config: Any = None, **overrides: Any) -> Any:
        """One parity check with the session's settings; ``config`` (pytest's) enables progress."""
        from pytest_tf2cntk.history.records import CheckRecord
        from pytest_tf2cntk.parity.engine import run_check

        self.open_history()
        self.worker()  # the shared worker, with this session's timeout
        progress = overrides.pop("progress", None)
        if config is not None and progress is None:
            progress = self._example_progress(config, f"{self.rel(conv.source)} [{device}]")
        try:
            self.check_names(conv, budgets, inputs)
            options = self.parity_options(budgets, inputs, model=self.rel(Path(conv.source)), **overrides)
            result = run_check(conv, device, options, progress)
        except DeviceUnavailable:
            raise  # no error: the caller records the skip with its reason
        except Exception as exc:  # a worker crash, a timeout, bad config: a row, never lost
            self.record_error(Path(conv.source), device, exc)
            raise
        record = CheckRecord(self.rel(Path(conv.source)), result.device, result)
        self.run.results.append(record)
        self.run.layers.extend(result.layer_rows())
        self._last = record
        drifted = self.judge_drift(record)
        if drifted and result.passed:
            raise ParityFailure(f"{result}\nerror drift beyond --tf2cntk-fail-on-drift="
                                f"{self.settings.fail_on_drift:g}:\n" + "\n".join(f"  {m}" for m in drifted))
        return result

    def check_names(self, conv: Any, budgets: dict | None, inputs: dict | None) -> None:
        """The tables' op, output and input names against the converted model (ConfigError)."""
        from pytest_tf2cntk import validate

        validate.check_project(self.settings.pick(("budgets", "inputs")), conv.onnx_model, self.rel(Path(conv.source)))
        validate.check_budgets(budgets, conv.onnx_model, MARKER_BUDGETS, scoped=True)
        validate.check_inputs(inputs, conv.onnx_model, MARKER_INPUTS, scoped=True)

    def record_skip(self, path: Path, device: str, reason: str) -> None:
        from pytest_tf2cntk.history.records import CheckRecord

        self.run.results.append(CheckRecord(self.rel(path), device, skipped=reason))

    def record_error(self, path: Path, device: str, exc: BaseException) -> None:
        """A check that could not reach a verdict: its row carries the message (never a pass)."""
        from pytest_tf2cntk.history.records import CheckRecord

        message = str(exc) if isinstance(exc, Tf2CntkError) else f"{type(exc).__name__}: {exc}"
        record = CheckRecord(self.rel(path), device, error=message or type(exc).__name__,
                             error_type=type(exc).__name__)
        self.run.results.append(record)
        self._last = record

    def record_lost(self, nodeid: str, text: str) -> None:
        """A ``PATH::parity[DEVICE]`` item failed with no record: its process died under it
        (an xdist worker killed mid-check). The check becomes an error row, not a silent gap."""
        path, sep, name = nodeid.rpartition("::")
        if not (sep and name.startswith("parity[") and name.endswith("]")):
            return
        model = Path(path) if Path(path).is_absolute() else self.rootdir / path
        if not self.is_model(model):
            return
        last = next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), "no output")
        self.record_error(model, name[len("parity["):-1], LostCheck(
            f"the process running this check ended before it reported ({last}); no verdict was reached: "
            "rerun it (pytest --lf), and if it happens again run without -n to see the worker's own error"))

    def last_check(self) -> CheckRecord | None:
        """The last parity check's record, once (the item's JUnit properties come from it)."""
        record, self._last = self._last, None
        return record

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

    def rel(self, path: Path) -> str:
        try:
            return str(Path(path).resolve().relative_to(self.rootdir.resolve()))
        except ValueError:
            return str(path)

    # -- xdist ----------------------------------------------------------------------------
    def unsent(self) -> RunPayload | None:
        """What this xdist worker recorded since the last call: sent with each test report, so
        a worker killed later loses nothing it had finished."""
        from pytest_tf2cntk.history.records import RunPayload

        if self._run is None:
            return None
        run, (r, c, l) = self._run, self._sent
        self._sent = (len(run.results), len(run.conversions), len(run.layers))
        payload = RunPayload(run.results[r:], run.conversions[c:], run.layers[l:])
        return payload if payload.results or payload.conversions or payload.layers else None

    def merge(self, payload: RunPayload) -> None:
        self.run.results.extend(payload.results)
        self.run.layers.extend(payload.layers)
        failed = {c.model for c in payload.conversions if not c.ok}  # CNTK refused what converted
        self.run.conversions[:] = [c for c in self.run.conversions if not c.ok or c.model not in failed]
        seen = {(c.model, c.ok) for c in self.run.conversions}
        for c in payload.conversions:
            if (c.model, c.ok) not in seen:
                self.run.conversions.append(c)
                seen.add((c.model, c.ok))

    # -- the end --------------------------------------------------------------------------
    def finish(self, exitstatus: int) -> None:
        """The JSON report, the history, the GitHub step summary (controller only)."""
        if not self.used:
            return
        from pytest_tf2cntk.plugin import summary

        self._record_history(exitstatus)  # first: a report that cannot be written must not lose the row
        if self.settings.report:
            try:
                summary.write_report(Path(self.settings.report), summary.report(
                    self.run, started=self.started, exitstatus=exitstatus, settings=self.settings_json(),
                    models=[self.rel(m) for m in self.settings.models]))
                self.notes.append(f"tf2cntk: JSON report written to {self.settings.report}")
            except OSError as exc:
                self.notes.append(f"tf2cntk: JSON report not written to {self.settings.report}: "
                                  f"{exc.strerror or exc}; give --tf2cntk-report a file path you can write")
        step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if step_summary:
            with open(step_summary, "a", encoding="utf-8") as fh:
                fh.write(summary.markdown(self.run))

    def settings_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.settings.__dict__.items()
                if k != "models"}

    def _record_history(self, exitstatus: int) -> None:
        if self.settings.no_history or not self.used or not self.run.results:
            return
        from pytest_tf2cntk.errors import HistoryError
        from pytest_tf2cntk.history import store

        try:
            info = store.run_info(self.rootdir, options=self.settings_json(), results=self.run.results,
                                  exitstatus=exitstatus, duration=time.time() - self.started, started=self.started)
            run_id = store.record_run(self.settings.history, info, self.run.results, layerwise=self.run.layers)
            self.notes.append(f"tf2cntk: run {run_id} recorded in {self.settings.history}")
        except HistoryError as exc:
            self.notes.append(f"tf2cntk: history not recorded: {exc}")
