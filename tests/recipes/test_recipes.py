"""Recipes: presets validate, bad input names the field, overrides and flags build the same Recipe."""

from __future__ import annotations

import pytest

from compress.core.errors import CompressError
from compress.recipes.flags import recipe_from_flags
from compress.recipes.loader import (
    apply_overrides,
    dump_recipe,
    load_recipe,
    load_recipe_data,
    preset_names,
    recipe_from_dict,
)
from compress.recipes.schema import parse_size


def test_builtin_presets_exist_and_validate():
    names = preset_names()
    assert {"w4a16-rtn", "w8a16-rtn"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        assert recipe.stages


def test_w4_preset_resolves_defaults():
    recipe = load_recipe("w4a16-rtn")
    stage = recipe.stages[0]
    assert (stage.method, stage.bits, stage.group_size, stage.symmetric) == ("rtn", 4, 128, True)
    assert recipe.calibration.dataset == "demo-calib"
    assert recipe.model is None


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"stages": [{"method": "rtn", "bits": 5}]}, "stages.0.bits"),
        ({"stages": [{"method": "rtn", "bogus": 1}]}, "stages.0.bogus: unknown key"),
        ({"stages": [{"method": "rtn", "group_size": 0}]}, "stages.0.group_size"),
        ({"stages": [{"method": "nope"}]}, "stages.0"),
        ({"stages": []}, "stages"),
        ({"stages": [{"method": "rtn"}], "calibration": {"num_samples": 0}}, "calibration.num_samples"),
        ({"stages": [{"method": "rtn"}], "colour": "red"}, "colour: unknown key"),
    ],
)
def test_bad_recipes_name_the_field(data, expected):
    with pytest.raises(CompressError, match=expected.replace(".", r"\.")):
        recipe_from_dict(data)


def test_yaml_cannot_construct_python_objects(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("stages: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(CompressError, match="not valid YAML"):
        load_recipe(str(path))


def test_missing_and_non_mapping_recipe_files(tmp_path):
    with pytest.raises(CompressError, match="does not exist"):
        load_recipe(str(tmp_path / "absent.yaml"))
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(CompressError, match="mapping"):
        load_recipe(str(path))
    with pytest.raises(CompressError, match="no built-in recipe"):
        load_recipe("w5-nothing")


def test_set_overrides_reach_nested_fields():
    recipe = load_recipe("w4a16-rtn", ["stages.0.bits=3", "calibration.seed=7", "stages.0.ignore=[lm_head, '*.o_proj']"])
    assert recipe.stages[0].bits == 3
    assert recipe.calibration.seed == 7
    assert recipe.stages[0].ignore == ["lm_head", "*.o_proj"]
    with pytest.raises(CompressError, match="not an index"):
        apply_overrides(load_recipe_data("w4a16-rtn"), ["stages.3.bits=3"])
    with pytest.raises(CompressError, match="key.path=value"):
        apply_overrides({}, ["nonsense"])


def test_flags_build_the_same_recipe_as_yaml():
    base = load_recipe_data("w4a16-rtn")
    from_flags = recipe_from_flags(base, {"stages.*.bits": 8, "stages.*.group_size": -1, "calibration.seed": 3})
    from_yaml = load_recipe("w8a16-rtn", ["calibration.seed=3"])
    assert from_flags == from_yaml


def test_bad_flag_values_name_the_flag():
    base = load_recipe_data("w4a16-rtn")
    with pytest.raises(CompressError, match="^--bits: "):
        recipe_from_flags(base, {"stages.*.bits": 5})
    with pytest.raises(CompressError, match="^--num-samples: "):
        recipe_from_flags(base, {"calibration.num_samples": -1})


def test_dump_round_trips():
    recipe = load_recipe("w4a16-rtn", ["stages.0.symmetric=false"])
    import yaml

    assert recipe_from_dict(yaml.safe_load(dump_recipe(recipe))) == recipe


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1024") == 1024
    with pytest.raises(ValueError):
        parse_size("lots")
