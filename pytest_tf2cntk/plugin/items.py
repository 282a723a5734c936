"""The plugin's collector and items: ``PATH::convert`` and ``PATH::parity[DEVICE]`` per model."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from pytest_tf2cntk.errors import ParityFailure
from pytest_tf2cntk.plugin.session import Tf2CntkSession

SESSION_KEY = pytest.StashKey[Tf2CntkSession]()


def session_of(config: pytest.Config) -> Tf2CntkSession:
    return config.stash[SESSION_KEY]


class ModelCollector(pytest.File):
    """One model: ``::convert`` then ``::parity[DEVICE]`` for each configured device."""

    @classmethod
    def from_path(cls, parent: pytest.Collector, path: Path) -> "ModelCollector":
        return cls.from_parent(parent, path=path, nodeid=model_nodeid(Path(str(parent.config.rootpath)), path))

    def collect(self) -> Iterator[pytest.Item]:
        session = session_of(self.config)
        yield ConvertItem.from_parent(self, name="convert")
        for device in sorted(session.settings.devices):
            yield ParityItem.from_parent(self, name=f"parity[{device}]", device=device,
                                         nodeid=_param_id(self, "parity", device))


def model_nodeid(rootdir: Path, path: Path) -> str | None:
    """A model outside the rootdir is identified by its absolute path: pytest would name it
    relative to the argument that holds it, "" for the model itself, so two such models would
    share "::convert" (--lf, JUnit and xdist tell items apart by id). pytest's rule inside (None):
    the path relative to the rootdir. An absolute id still maps back to the file for --lf."""
    try:
        path.relative_to(rootdir)  # as pytest tests it: --lf maps ids back to paths the same way
        return None
    except ValueError:
        return path.absolute().as_posix()


def _param_id(parent: pytest.Collector, base: str, param: str) -> Any:
    """pytest >= 9 keeps structured node ids and matches --lf on them: give "parity[cpu]" its
    params like a parametrized function's; older pytest derives the string id itself."""
    parent_id = getattr(parent, "id", None)
    if parent_id is None or not hasattr(parent_id, "with_params"):
        return None
    return parent_id.child(base).with_params(param)


class _ModelItem(pytest.Item):
    @property
    def model_path(self) -> Path:
        return Path(self.parent.path)  # type: ignore[union-attr]

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, None, self.name  # failure headline "parity[cpu]"; the message names the model

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        from pytest_tf2cntk.errors import Tf2CntkError

        if isinstance(excinfo.value, (Tf2CntkError, ParityFailure)):
            return str(excinfo.value)
        return super().repr_failure(excinfo)


class ConvertItem(_ModelItem):
    def runtest(self) -> None:
        session = session_of(self.config)
        conv = session.conversion(self.model_path, self._progress, check_cntk=True)
        for key, value in (("ops", sum(conv.ops.values())), ("passes", len(conv.passes)),
                           ("repairs", conv.repairs_text()), ("from_cache", conv.from_cache),
                           ("seconds", round(conv.seconds, 3))):
            self.user_properties.append((f"tf2cntk_convert_{key}", value))
        self.add_report_section("call", "tf2cntk conversion", conv.report())  # shown with -rP

    def _progress(self, msg: str) -> None:
        session_of(self.config).progress(self.config, msg)


class ParityItem(_ModelItem):
    def __init__(self, *, device: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.device = device

    def runtest(self) -> None:
        from pytest_tf2cntk.errors import DeviceUnavailable

        session = session_of(self.config)
        try:
            try:
                conv = session.conversion(self.model_path, lambda m: session.progress(self.config, m),
                                          check_cntk=True)
            except Exception as exc:  # the check cannot run: an error row, not a silent gap
                session.record_error(self.model_path, self.device, exc)
                raise
            result = session.parity(conv, self.device, config=self.config)  # raises on significant drift
            if not result.passed:
                raise ParityFailure(str(result))
        except DeviceUnavailable as exc:
            session.record_skip(self.model_path, self.device, exc.message)
            pytest.skip(f"{self.device}: {exc.message}")
        finally:
            from pytest_tf2cntk.plugin.summary import junit_properties

            self.user_properties.extend(junit_properties(session.last_check()))
