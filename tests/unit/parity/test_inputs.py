"""Hypothesis input recipes and the deterministic special patterns."""
from __future__ import annotations

import numpy as np

from pytest_tf2cntk.convert.domains import derive_domains
from pytest_tf2cntk.parity.inputs import (EDGE_PATTERNS, NONFINITE_PATTERNS, InputRecipe, inputs_strategy,
                                          materialize, special_examples)
from tests.support.graphs import embedding_model


def test_float_recipe_respects_sub_range_and_specials() -> None:
    doms = derive_domains(embedding_model(), {"x": (-2.0, 2.0)})
    arr = InputRecipe("uniform", 1, 0.5, 0.75, "none", 0.0).fill(doms["x"])
    assert arr.dtype == np.float32 and ((arr >= 0.0) & (arr <= 1.0)).all()
    with_nan = InputRecipe("uniform", 1, 0.0, 1.0, "nan", 0.3).fill(doms["x"])
    assert np.isnan(with_nan).any() and not np.isinf(with_nan).any()
    assert (InputRecipe("uniform", 1, 0.0, 1.0, "-inf", 0.3).fill(doms["x"]) == -np.inf).any()
    sub = InputRecipe("constant", 0, 0.0, 1.0, "subnormal", 0.5).fill(doms["x"])
    tiny = np.abs(sub[sub != -2.0])
    assert tiny.size and (tiny < np.finfo(np.float32).tiny).all()


def test_recipe_is_reproducible_and_describes_itself() -> None:
    doms = derive_domains(embedding_model(), {"x": (-1.0, 1.0)})
    r = InputRecipe("normal", 42, 0.0, 1.0, "zeros", 0.1)
    assert np.array_equal(r.fill(doms["x"]), r.fill(doms["x"]))
    assert "seed=42" in r.describe(doms["x"]) and "zeros" in r.describe(doms["x"])
    assert InputRecipe("constant", 0, 0.25, 1.0, "none", 0).describe(doms["x"]) == "constant -0.5"


def test_strategy_draws_valid_inputs() -> None:
    from hypothesis import given, settings

    doms = derive_domains(embedding_model(11))
    seen = []

    @settings(max_examples=25, derandomize=True, database=None)
    @given(inputs_strategy(doms, edge_values=True))
    def check(recipes: dict) -> None:
        arrays = materialize(recipes, doms)
        assert set(arrays) == {"ids", "x"}
        assert arrays["ids"].max() < 11 and arrays["x"].shape == (2, 3)
        seen.append(recipes["x"].distribution)

    check()
    assert len(set(seen)) > 1


def test_special_examples_cover_every_pattern_on_every_float_input() -> None:
    doms = derive_domains(embedding_model(11))  # ids (an index) and x (a float)
    assert special_examples(doms) == []  # nothing asked for: Hypothesis alone
    examples = special_examples(doms, edge_values=True, allow_nonfinite=True)
    assert [e["x"].special for e in examples] == list(EDGE_PATTERNS + NONFINITE_PATTERNS)
    assert all(e["ids"].special == "none" for e in examples)  # integer ids get no special values
    values = {e["x"].special: materialize(e, doms)["x"] for e in examples}
    assert (values["zeros"] == 0).all()
    assert np.isnan(values["nan"]).any() and (values["+inf"] == np.inf).any() and (values["-inf"] == -np.inf).any()
    assert np.isin(values["extremes"], [doms["x"].low, doms["x"].high]).any()
    assert np.isfinite(values["subnormal"]).all() and (np.abs(values["subnormal"]) < np.finfo(np.float32).tiny).any()
