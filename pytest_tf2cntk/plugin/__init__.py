"""The pytest shell: options, model collectors and items, fixtures, the marker, reports.

Loading this module imports nothing heavy; TensorFlow, ONNX and the worker are imported when the
first item runs. State lives in ``config.stash``; under xdist each worker sends its results
through ``workeroutput`` and the controller merges them into one summary and one JSON report.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pytest_tf2cntk import options as opts
from pytest_tf2cntk.errors import ParityFailure
from pytest_tf2cntk.plugin.items import SESSION_KEY, ModelCollector, session_of
from pytest_tf2cntk.plugin.session import Tf2CntkSession

MARKER = "tf2cntk"


def pytest_addoption(parser: pytest.Parser) -> None:
    opts.register(parser)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}(model=None, budgets=None, inputs=None): "
                                       "configure pytest-tf2cntk for this test")
    rootdir = Path(str(config.rootpath))
    for path in opts.ignored_pyprojects(config.invocation_params.dir, rootdir):
        note = f"pytest-tf2cntk: {opts.ignored_note(path, rootdir)}"
        config.issue_config_time_warning(pytest.PytestConfigWarning(note), stacklevel=2)
    try:
        settings = opts.resolve(config.getoption, config.getini, rootdir, opts.read_pyproject(rootdir))
    except ValueError as exc:
        raise pytest.UsageError(f"pytest-tf2cntk: {exc}") from None
    for model in settings.models:
        if not model.exists():
            raise pytest.UsageError(f"pytest-tf2cntk: model path {model} does not exist "
                                    "(--tf2cntk-model / tf2cntk_models)")
    session = Tf2CntkSession(settings, rootdir, worker_id=_worker_id(config))
    from pytest_tf2cntk.errors import HistoryError

    if settings.models:  # a bad history file stops the run at once; otherwise opened on first use
        try:
            session.open_history()
        except HistoryError as exc:
            raise pytest.UsageError(f"pytest-tf2cntk: {exc}") from None
    config.stash[SESSION_KEY] = session
    config.pluginmanager.register(_Reporting(session, config), "tf2cntk-reporting")
    # model paths are collected like test files: add those not already under an argument
    if settings.models:
        args = [Path(a.split("::")[0]).resolve() for a in config.args]
        for model in settings.models:
            resolved = model.resolve()
            if not any(resolved == a or a in resolved.parents for a in args):
                config.args.append(str(model))


def _worker_id(config: pytest.Config) -> str | None:
    return getattr(config, "workerinput", {}).get("workerid")


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if session_of(parent.config).is_model(file_path):
        return ModelCollector.from_path(parent, file_path)
    return None


def pytest_collect_directory(path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if session_of(parent.config).is_model(path):  # a SavedModel directory is one model
        return ModelCollector.from_path(parent, path)
    return None


# ---------------------------------------------------------------------------------------------
# fixtures and helpers for hand-written tests


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "tf2cntk_model" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker(MARKER)
    if marker and marker.kwargs.get("model"):
        return
    if any("tf2cntk_model" in (c.params or {}) for c in getattr(metafunc, "_calls", [])):
        return  # parametrized indirectly by the user
    models = session_of(metafunc.config).settings.models
    if models:
        metafunc.parametrize("tf2cntk_model", [str(m) for m in models], indirect=True,
                             ids=[m.name for m in models])


@pytest.fixture(scope="session")
def tf2cntk_session(request: pytest.FixtureRequest) -> Tf2CntkSession:
    """The plugin's session: settings, conversions and results of this run."""
    return session_of(request.config)


@pytest.fixture
def tf2cntk_model(request: pytest.FixtureRequest, tf2cntk_session: Tf2CntkSession) -> Any:
    """A converted model: ``.tf`` (TFModel), ``.onnx`` (ModelProto), ``.run_cntk(feeds)``,
    ``.inputs_strategy()``, ``.check(device)``. The path comes from ``@pytest.mark.tf2cntk(model=)``,
    indirect parametrization, or ``--tf2cntk-model``. Conversions are shared by the whole session."""
    marker = request.node.get_closest_marker(MARKER)
    path = (marker.kwargs.get("model") if marker else None) or getattr(request, "param", None)
    if path is None:
        pytest.fail("tf2cntk_model needs a model: @pytest.mark.tf2cntk(model=...), indirect "
                    "parametrization, or --tf2cntk-model", pytrace=False)
    path = Path(path)
    if not path.is_absolute():
        path = Path(str(request.config.rootpath)) / path
    kwargs = dict(marker.kwargs) if marker else {}
    from pytest_tf2cntk.errors import ConfigError

    try:
        return tf2cntk_session.handle(path, budgets=kwargs.get("budgets"), inputs=kwargs.get("inputs"))
    except ConfigError as exc:  # the marker's own values: the test errors at setup, in one paragraph
        pytest.fail(f"pytest-tf2cntk: {exc}", pytrace=False)


@pytest.fixture
def tf2cntk_inputs(tf2cntk_model: Any) -> Any:
    """Hypothesis strategy of input dicts (name -> array) for the model under test."""
    return tf2cntk_model.inputs_strategy()


def assert_parity(target: Any, device: str = "cpu", **kwargs: Any) -> Any:
    """Assert that a model (path or tf2cntk_model handle) or a ParityResult passes.

    Returns the ParityResult; a failure shows the same diagnostic table as the plugin's items.
    """
    __tracebackhide__ = True
    from pytest_tf2cntk.parity.engine import check_parity
    from pytest_tf2cntk.parity.result import ParityResult

    if isinstance(target, ParityResult):
        result = target
    elif hasattr(target, "check"):
        result = target.check(device, **kwargs)
    else:
        result = check_parity(target, device, **kwargs)
    if not result.passed:
        raise ParityFailure(str(result))
    return result


# ---------------------------------------------------------------------------------------------
# reporting


def _has_record(report: pytest.TestReport) -> bool:
    return any(key == "tf2cntk_outcome" for key, _ in report.user_properties)


class _Reporting:
    def __init__(self, session: Tf2CntkSession, config: pytest.Config) -> None:
        self.session = session
        self.config = config

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: Any) -> Any:
        outcome = yield
        if self.session.worker_id is not None and call.when != "setup":  # xdist: records ride the report
            payload = self.session.unsent()
            if payload is not None:
                outcome.get_result().tf2cntk_payload = json.dumps(payload.to_json())

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.session.worker_id is not None:
            return
        payload = getattr(report, "tf2cntk_payload", None)
        if payload:  # from an xdist worker
            from pytest_tf2cntk.history.records import RunPayload

            self.session.merge(RunPayload.from_json(json.loads(payload)))
        elif getattr(report, "node", None) is not None and report.failed and not _has_record(report):
            # from xdist (it sets report.node) with no record: the worker died mid-check
            self.session.record_lost(report.nodeid, report.longreprtext)

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.session.worker_id is not None:  # xdist worker: hand what is left to the controller
            payload = self.session.unsent()
            if payload is not None:
                self.config.workeroutput["tf2cntk"] = json.dumps(payload.to_json())  # type: ignore[attr-defined]
            return
        self.session.finish(exitstatus)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        payload = getattr(node, "workeroutput", {}).get("tf2cntk")
        if payload:
            from pytest_tf2cntk.history.records import RunPayload

            self.session.merge(RunPayload.from_json(json.loads(payload)))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.session.worker_id is None:
            if self.session.used:
                from pytest_tf2cntk.plugin import summary

                lines = summary.summary_lines(self.session.run)
            else:
                lines = []
            if lines:
                terminalreporter.write_sep("=", "tf2cntk parity summary")
                for line in lines:
                    terminalreporter.write_line(line)
            for note in self.session.notes:
                terminalreporter.write_line(note)
