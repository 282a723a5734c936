"""A conversion error read back from the cache names the file asked for, not the one that wrote it."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pytest_tf2cntk.convert.pipeline import CacheMeta, convert
from pytest_tf2cntk.errors import ValidationError

from tests.support.paths import FIXTURES


def test_stored_error_is_raised_naming_the_path_asked_for() -> None:
    first, other = "/one/model.keras", "/two/model.keras"
    meta = CacheMeta(first, {}, error={
        "type": "ValidationError", "message": f"{first}: 1 node(s) CNTK 2.7 cannot import",
        "hint": f"see {first}", "problems": [{"node": "n", "op_type": "Loop", "tf_op": "", "reason":
                                              f"in {first}", "hint": f"edit {first}"}]})
    with pytest.raises(ValidationError) as caught:
        meta.raise_error(other)
    exc = caught.value
    assert first not in str(exc) and exc.message.startswith(other) and exc.hint == f"see {other}"
    assert (exc.problems[0].reason, exc.problems[0].hint) == (f"in {other}", f"edit {other}")


def test_same_content_in_two_files_each_error_names_its_own_file(tmp_path: Path) -> None:
    """gru.keras without repairs fails validation (an ONNX Loop); its copy hits the cached error."""
    paths = [tmp_path / d / "gru.keras" for d in ("a", "b")]
    for path in paths:
        path.parent.mkdir()
        shutil.copy(FIXTURES / "gru.keras", path)
    for path, other in zip(paths, reversed(paths)):
        with pytest.raises(ValidationError) as caught:
            convert(path, cache_dir=tmp_path / "cache", repairs="off")
        assert str(path) in str(caught.value) and str(other) not in str(caught.value)
