"""The option table: pytest options, ini twins, [tool.tf2cntk] and the tf2cntk command's arguments."""
from __future__ import annotations

from pathlib import Path

import pytest

from pytest_tf2cntk import options


def test_options_cli_overrides_ini_and_validates(tmp_path: Path) -> None:
    cli = {"tf2cntk_max_examples": "7", "tf2cntk_devices": None, "tf2cntk_models": None}
    ini = {"tf2cntk_max_examples": "3", "tf2cntk_devices": "cpu, gpu:1", "tf2cntk_models": ["m.keras"]}
    s = options.resolve(lambda k: cli.get(k), lambda k: ini.get(k), tmp_path,
                        {"tool": {"tf2cntk": {"inputs": {"x": [0, 255]}, "budgets": {"Conv": 3}}}})
    assert s.max_examples == 7 and s.devices == ("cpu", "gpu:1")
    assert s.models == (tmp_path / "m.keras",)  # ini paths are relative to the rootdir
    assert s.inputs == {"x": (0.0, 255.0)} and s.budgets == {"Conv": 3}
    with pytest.raises(ValueError, match="--tf2cntk-devices"):
        options.resolve(lambda k: "tpu" if k == "tf2cntk_devices" else None, lambda k: None, tmp_path)
    with pytest.raises(ValueError, match="--tf2cntk-max-examples"):
        options.resolve(lambda k: "0" if k == "tf2cntk_max_examples" else None, lambda k: None, tmp_path)


def test_every_option_is_prefixed_and_has_an_ini_twin() -> None:
    for o in options.PYTEST_OPTIONS:
        assert o.ini == "tf2cntk_" + o.key
        assert o.flag.startswith("--tf2cntk-")


# --tf2cntk-input-shape / [tool.tf2cntk.input_shapes]: one parser for every source

def test_input_shapes_parse_texts_tables_and_pairs_to_one_sorted_form() -> None:
    parse = options.parse_input_shapes
    assert parse(["mask:8x8", " image : 64X64x3 "]) == (("image", (64, 64, 3)), ("mask", (8, 8)))
    assert parse("image:64x64x3") == (("image", (64, 64, 3)),)
    assert parse({"image": [64, 64, 3], "mask": "8x8"}) == (("image", (64, 64, 3)), ("mask", (8, 8)))
    assert parse((("image", (64, 64, 3)),)) == (("image", (64, 64, 3)),)  # as ConversionOptions stores it
    assert parse(["a:2x2", "a:2x2"]) == (("a", (2, 2)),)  # the same twice is no conflict
    assert parse(["scope/in:0:4"]) == (("scope/in:0", (4,)),)  # the shape is after the last colon
    assert parse(None) == parse([]) == parse({}) == ()


@pytest.mark.parametrize("raw, says", [
    ("image=64x64x3", "'image=64x64x3' is not NAME:SHAPE"),
    (":64x64", "':64x64' is not NAME:SHAPE"),
    ("image:", "image:': '' is not a whole number"),
    ("image:64x64xthree", "'three' is not a whole number"),
    ("image:64x0x3", "dimension 0 must be >= 1"),
    ("image:64x-1x3", "dimension -1 must be >= 1"),
    (["image:8x8x3", "image:9x9x3"], "input 'image' is given two shapes, 8x8x3 and 9x9x3"),
    ({"image": [64, 2.5, 3]}, "2.5 is not a whole number"),
    ({"image": [64, True, 3]}, "True is not a whole number"),
    ({"image": 64}, "image = 64: expected NAME:SHAPE"),
    ({"image": []}, "image = []: expected NAME:SHAPE"),
])
def test_input_shapes_reject_bad_syntax_naming_the_entry_and_the_syntax(raw, says: str) -> None:
    with pytest.raises(ValueError) as err:
        options.parse_input_shapes(raw)
    assert says in str(err.value)
    assert "\n" not in str(err.value)


def test_input_shapes_is_one_option_for_pytest_ini_pyproject_and_the_command(tmp_path: Path) -> None:
    o = options.BY_NAME["input_shapes"]
    assert (o.flag, o.cli_flag, o.ini, o.group) == ("--tf2cntk-input-shape", "--input-shape",
                                                    "tf2cntk_input_shapes", options.CONVERSION)
    table = {"tool": {"tf2cntk": {"input_shapes": {"image": [32, 32, 3]}}}}
    none = options.resolve(lambda k: None, lambda k: None, tmp_path, table)
    assert none.input_shapes == (("image", (32, 32, 3)),)
    assert none.pick(options.group(options.CONVERSION))["input_shapes"] == (("image", (32, 32, 3)),)
    cli = {"tf2cntk_input_shapes": ["image:64x64x3"]}
    assert options.resolve(cli.get, lambda k: None, tmp_path, table).input_shapes == (("image", (64, 64, 3)),)
    ini = {"tf2cntk_input_shapes": ["image:16x16x3", "mask:4x4"]}
    assert options.resolve(lambda k: None, ini.get, tmp_path).input_shapes == (("image", (16, 16, 3)),
                                                                                ("mask", (4, 4)))
    with pytest.raises(ValueError, match=r"^--tf2cntk-input-shape: 'image' is not NAME:SHAPE"):
        options.resolve({"tf2cntk_input_shapes": ["image"]}.get, lambda k: None, tmp_path)
    bad_table = {"tool": {"tf2cntk": {"input_shapes": {"image": "64x64xrgb"}}}}
    with pytest.raises(ValueError, match=r"^\[tool\.tf2cntk\.input_shapes\]: image = '64x64xrgb': 'rgb'"):
        options.resolve(lambda k: None, lambda k: None, tmp_path, bad_table)


def test_input_shape_on_the_command_line_repeats_and_is_checked(capsys: pytest.CaptureFixture) -> None:
    import argparse

    from pytest_tf2cntk.convert.options import ConversionOptions

    parser = argparse.ArgumentParser(prog="tf2cntk check")
    options.add_arguments(parser, options.CONVERSION)
    args = parser.parse_args(["--input-shape", "mask:4x4", "--input-shape=image:64x64x3"])
    conv = ConversionOptions(**options.from_args(args, options.CONVERSION))
    assert conv.input_shapes == (("image", (64, 64, 3)), ("mask", (4, 4)))
    assert ConversionOptions.from_json(conv.to_json()) == conv  # reproducers store it
    table = {"input_shapes": {"image": [8, 8, 3]}}
    assert options.from_args(parser.parse_args([]), options.CONVERSION, tool=table)["input_shapes"] == \
        (("image", (8, 8, 3)),)
    twice = parser.parse_args(["--input-shape", "image:8x8x3", "--input-shape", "image:9x9x3"])
    with pytest.raises(ValueError, match="^--input-shape: input 'image' is given two shapes"):
        options.from_args(twice, options.CONVERSION)
    with pytest.raises(SystemExit):
        parser.parse_args(["--input-shape", "image=64x64x3"])
    assert "argument --input-shape: 'image=64x64x3' is not NAME:SHAPE" in capsys.readouterr().err


def test_budgets_for_puts_a_models_own_table_over_the_projects() -> None:
    from pytest_tf2cntk.project_tables import budgets_for, parse_budget_table

    table = parse_budget_table({"Conv": 4, "outputs": {"probs": 1e-3, "aux": 2e-3},
                                "models": {"./nets/a.keras": {"MatMul": 6, "outputs": {"probs": 1e-5}}}})
    assert budgets_for(table, "nets/a.keras") == {"Conv": 4.0, "MatMul": 6.0,
                                                  "outputs": {"probs": 1e-5, "aux": 2e-3}}
    assert budgets_for(table, "nets/b.keras") == {"Conv": 4.0, "outputs": {"probs": 1e-3, "aux": 2e-3}}
    with pytest.raises(ValueError, match=r'budgets.models."nets/a.keras".outputs\] probs'):
        parse_budget_table({"models": {"nets/a.keras": {"outputs": {"probs": "tight"}}}})
    with pytest.raises(ValueError, match="one table per model path"):
        parse_budget_table({"models": {"nets/a.keras": 3}})


def test_import_is_one_option_for_pytest_ini_pyproject_and_the_command(tmp_path: Path) -> None:
    """``import`` is a keyword, so the option's name is imports and its key spells import."""
    import argparse

    o = options.BY_NAME["imports"]
    assert (o.flag, o.cli_flag, o.ini, o.group) == ("--tf2cntk-import", "--import", "tf2cntk_import",
                                                    options.CONVERSION)
    table = {"tool": {"tf2cntk": {"import": ["pkg.layers", "more"]}}}
    assert options.resolve(lambda k: None, lambda k: None, tmp_path, table).imports == ("pkg.layers", "more")
    cli = {"tf2cntk_imports": ["a.b", "a.b", "c"]}  # repeated: each once, in order
    assert options.resolve(cli.get, lambda k: None, tmp_path, table).imports == ("a.b", "c")
    assert options.resolve(lambda k: None, {"tf2cntk_import": ["x"]}.get, tmp_path).imports == ("x",)
    with pytest.raises(ValueError, match=r"^--tf2cntk-import: 'pkg/layers.py' is not a module name"):
        options.resolve({"tf2cntk_imports": ["pkg/layers.py"]}.get, lambda k: None, tmp_path)
    with pytest.raises(ValueError, match="unknown key"):
        options.tool_table({"tool": {"tf2cntk": {"imports": ["x"]}}})  # the key is import
    parser = argparse.ArgumentParser(prog="tf2cntk check")
    options.add_arguments(parser, options.CONVERSION)
    args = parser.parse_args(["--import", "pkg.layers", "--import=other"])
    assert options.from_args(args, options.CONVERSION)["imports"] == ("pkg.layers", "other")
    assert options.from_args(parser.parse_args([]), options.CONVERSION, tool={"import": "one"})["imports"] == ("one",)
