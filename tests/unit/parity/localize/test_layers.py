"""Which Keras layer a node belongs to: taken from the layer calls while tracing, never from the
TF scope names, which Keras' build-then-call makes TF uniquify ("dense" runs in ".../dense_1")."""
from __future__ import annotations

from pathlib import Path

import pytest

from pytest_tf2cntk.convert.pipeline import convert
from pytest_tf2cntk.parity.localize.graph import GraphFacts, tf_layer_of
from tests.support.faults import feeds_for
from tests.support.small_models import dense_stack

# (layer names given, the layers the Sigmoid and Tanh nodes belong to). Explicit names that look
# like TF's suffixes ("dense_1" first, "dense" second) trap any guess by name.
CASES = {"default names": ((None, None), ("dense", "dense_1")),
         "explicit names": (("encoder", "head"), ("encoder", "head")),
         "suffix-like names": (("dense_1", "dense"), ("dense_1", "dense"))}


def _layers(conv) -> dict[str, str]:
    facts = GraphFacts.of(conv.onnx_model)
    return {n.name: tf_layer_of(n, conv.layer_scopes, facts.consts) for n in facts.order}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_node_is_attributed_to_the_layer_that_ran_it(tmp_path: Path, case: str) -> None:
    names, (first, second) = CASES[case]
    conv = convert(dense_stack(tmp_path / "m.keras", names), batch=2, cache_dir=tmp_path / "c")
    layers = _layers(conv)
    sig = next(n for n in conv.onnx_model.graph.node if n.op_type == "Sigmoid")
    tanh = next(n for n in conv.onnx_model.graph.node if n.op_type == "Tanh")
    assert (layers[sig.name], layers[tanh.name]) == (first, second), layers
    order = [layers[n.name] for n in conv.onnx_model.graph.node]  # tf2onnx keeps TF's order
    k = order.index(second)
    assert set(order[:k]) == {first} and set(order[k:]) == {second}, layers
    if case == "default names":
        assert "sequential_1/dense_1/Sigmoid" == sig.name  # the trap of the issue is really there
    hit = convert(tmp_path / "m.keras", batch=2, cache_dir=tmp_path / "c")  # layer scopes travel in the cache
    assert hit.from_cache and _layers(hit) == layers


@pytest.mark.needs_cntk
def test_the_localization_report_names_the_keras_layers(tmp_path: Path) -> None:
    from pytest_tf2cntk.parity.localize.scan import localize

    path = dense_stack(tmp_path / "m.keras")
    convert(path, batch=2, cache_dir=tmp_path / "c")
    conv = convert(path, batch=2, cache_dir=tmp_path / "c")
    assert conv.from_cache
    loc = localize(conv, feeds_for(conv), confirm=False)
    by_op = {n.op_type: n.tf_layer for n in loc.nodes}
    assert by_op["Sigmoid"] == "dense" and by_op["Tanh"] == "dense_1", loc.table(20)
    assert "dense_1" in loc.table(20) and loc.culprit is None
