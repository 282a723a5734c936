"""The recurrent repairs on hand-built ONNX graphs: each rewrite proved in ONNX Runtime before and
after (``apply_proved`` raises PassMismatch on any difference), and the graphs without the defect
left alone. The same graphs run in the real CNTK worker (needs_cntk) at the end."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pytest_tf2cntk.convert import onnxrt
from pytest_tf2cntk.convert.passes import apply_proved
from pytest_tf2cntk.convert.repairs import REPAIRS
from pytest_tf2cntk.convert.repairs.recurrent import REPAIR_GRU_LOOP, REPAIR_SPLIT, REPAIR_UNROLL_GRU
from pytest_tf2cntk.convert.validation import check_support, validate
from pytest_tf2cntk.errors import ValidationError

T, I, H = 5, 3, 4


def _rnn_model(op: str, batch: int, direction: str = "forward", initial: float = 0.0, outputs: tuple = ("Y",),
               seed: int = 0, **attrs) -> onnx.ModelProto:
    """x [B, T, I] -> Transpose -> one LSTM/GRU/RNN -> the outputs named (Y, Y_h, Y_c), all graph
    outputs. Weights, biases and (when ``initial``) the initial states are random constants."""
    rng = np.random.default_rng(seed)
    dirs, gates = 2 if direction == "bidirectional" else 1, {"LSTM": 4, "GRU": 3, "RNN": 1}[op]

    def const(name, *shape, scale=0.6):  # noqa: ANN001, ANN202
        return numpy_helper.from_array((rng.uniform(-1, 1, shape) * scale).astype(np.float32), name)

    inits = [const("W", dirs, gates * H, I), const("R", dirs, gates * H, H), const("B", dirs, 2 * gates * H)]
    inputs = ["xt", "W", "R", "B", ""]
    for state in ("h0", "c0")[:2 if op == "LSTM" else 1]:
        inits.append(const(state, dirs, batch, H, scale=initial))
        inputs.append(state if initial else "")
    names = {"Y": "y", "Y_h": "y_h", "Y_c": "y_c"}
    attrs.setdefault("activations", {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"],
                                     "RNN": ["Tanh"]}[op] * dirs)  # CNTK's importer needs them spelled out
    node = helper.make_node(op, inputs, [names[o] if o in outputs else "" for o in ("Y", "Y_h", "Y_c")][
        :3 if op == "LSTM" else 2], name=f"{op.lower()}_node", hidden_size=H, direction=direction, **attrs)
    shapes = {"Y": [T, dirs, batch, H], "Y_h": [dirs, batch, H], "Y_c": [dirs, batch, H]}
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2], name="to_time_major"), node], "rnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, T, I])],
        [helper.make_tensor_value_info(names[o], TensorProto.FLOAT, shapes[o]) for o in outputs],
        [t for t in inits if t.name in inputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    return model


def _repair(model: onnx.ModelProto, repairs=tuple(REPAIRS)):  # noqa: ANN001, ANN202
    return apply_proved(model, [(r.name, r.apply) for r in repairs], "CNTK repair", examples=3)


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_the_recurrent_repairs_are_registered_in_order() -> None:
    names = [r.name for r in REPAIRS]
    assert [names.index(r.name) for r in (REPAIR_GRU_LOOP, REPAIR_UNROLL_GRU, REPAIR_SPLIT)] == sorted(
        names.index(r.name) for r in (REPAIR_GRU_LOOP, REPAIR_UNROLL_GRU, REPAIR_SPLIT))
    assert all(r.defect and r.rewrite for r in (REPAIR_GRU_LOOP, REPAIR_UNROLL_GRU, REPAIR_SPLIT))


@pytest.mark.parametrize("op", ["LSTM", "RNN"])
def test_batch_three_rnn_with_initial_states_is_split_per_sample(op: str) -> None:
    model = _rnn_model(op, 3, initial=0.8, outputs=("Y", "Y_h"))
    with pytest.raises(ValidationError, match="assumes batch 1"):
        validate(model)
    repaired, records = _repair(model)
    assert [r.name for r in records] == ["split_recurrent_batch"] and records[0].proof.startswith("ORT")
    nodes = [n for n in repaired.graph.node if n.op_type == op]
    assert len(nodes) == 3 and all(len(n.output) == 1 for n in nodes)  # CNTK builds Y only
    assert validate(repaired) == []


def test_bidirectional_lstm_is_split_and_its_last_states_come_from_y() -> None:
    model = _rnn_model("LSTM", 2, "bidirectional", outputs=("Y", "Y_h"))
    repaired, records = _repair(model)
    assert [r.name for r in records] == ["split_recurrent_batch"]
    assert _ops(repaired).count("LSTM") == 2 and validate(repaired) == []


def test_rnn_graphs_without_the_defect_are_left_byte_for_byte() -> None:
    cases = [_rnn_model("LSTM", 1, initial=0.5),  # batch 1: CNTK is right
             _rnn_model("LSTM", 2, outputs=("Y", "Y_c")),  # Y_c: CNTK builds no cell state at all
             _rnn_model("LSTM", 2, "bidirectional", initial=0.5),  # CNTK's other defect: states mixed
             _rnn_model("LSTM", 2, activations=["Sigmoid", "Tanh", "Relu"])]  # not the cell CNTK builds
    for model in cases:
        before = model.SerializeToString()
        repaired, records = _repair(model)
        assert records == [] and repaired.SerializeToString() == before


def test_gru_with_linear_before_reset_is_unrolled_at_any_batch() -> None:
    for batch, direction in ((1, "forward"), (2, "bidirectional"), (3, "reverse")):
        model = _rnn_model("GRU", batch, direction, initial=0.7, outputs=("Y", "Y_h"), linear_before_reset=1)
        reasons = [p.reason for p in check_support(model)]
        assert reasons and (batch > 1 or "ignores linear_before_reset" in reasons[0])
        repaired, records = _repair(model)
        assert [r.name for r in records] == ["unroll_gru"], (batch, direction)
        assert "GRU" not in _ops(repaired) and validate(repaired) == []


def test_gru_without_linear_before_reset_at_batch_two_is_split_not_unrolled() -> None:
    repaired, records = _repair(_rnn_model("GRU", 2, outputs=("Y",)))
    assert [r.name for r in records] == ["split_recurrent_batch"] and _ops(repaired).count("GRU") == 2


def test_a_wrong_rewrite_is_caught_by_the_ort_proof(monkeypatch: pytest.MonkeyPatch) -> None:
    """The proof can fail: a split that joins the samples in the wrong order is refused."""
    from pytest_tf2cntk.convert.repairs import recurrent
    from pytest_tf2cntk.errors import PassMismatch

    real = recurrent._split_one

    def reversed_samples(em, node, x_shape, consts, used):  # noqa: ANN001, ANN202
        real(em, node, x_shape, consts, used)
        concat = em.nodes[-1] if em.nodes[-1].op_type == "Concat" else None
        concat.input[:] = list(reversed(concat.input))

    monkeypatch.setattr(recurrent, "_split_one", reversed_samples)
    with pytest.raises(PassMismatch, match="split_recurrent_batch"):
        _repair(_rnn_model("LSTM", 2))


# ---------------------------------------------------------------------------------------------
# The same graphs in CNTK 2.7: wrong without the repair, right with it.


def _cntk_error(path: Path, model: onnx.ModelProto) -> float:
    from pytest_tf2cntk.cntk.client import get_worker

    onnx.save(model, str(path))
    x = np.random.default_rng(1).uniform(-1, 1, [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim])
    feeds = {"x": x.astype(np.float32)}
    reference = onnxrt.run(model, feeds)
    worker = get_worker()
    loaded = worker.load(str(path))
    try:
        out = worker.eval(loaded, feeds)
    finally:
        worker.unload(loaded)
    # at batch B > 1 CNTK's raw Y comes out [T*B, dirs, 1, H] (UnwrapRNNOps): wrong by its shape
    return max(float(np.max(np.abs(out[k] - v))) if out[k].shape == v.shape else np.inf
               for k, v in reference.items())


@pytest.mark.needs_cntk
@pytest.mark.parametrize("case", ["lstm_b3_states", "bilstm_b2", "gru_lbr_b1", "gru_lbr_bidir_b2", "rnn_b3"])
def test_repaired_graphs_compute_in_cntk_what_ort_does(case: str, tmp_path: Path) -> None:
    model = {"lstm_b3_states": lambda: _rnn_model("LSTM", 3, initial=0.8),
             "bilstm_b2": lambda: _rnn_model("LSTM", 2, "bidirectional"),
             "gru_lbr_b1": lambda: _rnn_model("GRU", 1, initial=0.7, linear_before_reset=1),
             "gru_lbr_bidir_b2": lambda: _rnn_model("GRU", 2, "bidirectional", linear_before_reset=1),
             "rnn_b3": lambda: _rnn_model("RNN", 3, initial=0.8)}[case]()
    repaired, records = _repair(model)
    assert records
    assert _cntk_error(tmp_path / "raw.onnx", model) > 1e-2  # the defect, as CNTK shows it
    assert _cntk_error(tmp_path / "repaired.onnx", repaired) < 1e-5
