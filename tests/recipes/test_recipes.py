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
        ({"stages": [{"method": "rtn", "bogus": 1}]}, "unknown key 'bogus' at stages.0"),
        ({"stages": [{"method": "rtn", "group_size": 0}]}, "stages.0.group_size"),
        ({"stages": [{"method": "nope"}]}, "stages.0"),
        ({"stages": []}, "stages"),
        ({"stages": [{"method": "rtn"}], "calibration": {"num_samples": 0}}, "calibration.num_samples"),
        ({"stages": [{"method": "rtn"}], "colour": "red"}, "unknown key 'colour' at the top level"),
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


# --- messages that name every problem (issue 9) ---------------------------------------------------------------


def test_a_typo_names_the_unknown_key_and_suggests_the_right_one():
    with pytest.raises(CompressError) as error:
        recipe_from_dict({"stges": [{"method": "rtn"}]})
    message = str(error.value)
    assert message == "recipe has an unknown key 'stges' at the top level (did you mean 'stages'?)"
    with pytest.raises(CompressError, match=r"unknown key 'bitz' at stages\.0 \(did you mean 'bits'\?\)"):
        recipe_from_dict({"stages": [{"method": "rtn", "bitz": 4}]})
    with pytest.raises(CompressError, match=r"unknown key 'sead' at calibration \(did you mean 'seed'\?\)"):
        recipe_from_dict({"stages": [{"method": "rtn"}], "calibration": {"sead": 1}})
    with pytest.raises(CompressError, match=r"unknown method 'gtpq' at stages\.0 \(did you mean 'gptq'\?\)"):
        recipe_from_dict({"stages": [{"method": "gtpq"}]})


def test_missing_required_fields_are_named():
    with pytest.raises(CompressError, match=r"missing the required field 'target' at stages\.0"):
        recipe_from_dict({"stages": [{"method": "structured", "ratio": 0.2}]})
    with pytest.raises(CompressError, match=r"missing the required field 'stages' at the top level"):
        recipe_from_dict({"model": None})
    with pytest.raises(CompressError, match=r"has no method at stages\.0"):
        recipe_from_dict({"stages": [{"bits": 4}]})


def test_every_problem_is_named_on_one_line():
    data = {"stages": [{"method": "rtn", "bitz": 4, "group_size": "x"}], "calibration": {"num_sample": 3}}
    with pytest.raises(CompressError) as error:
        recipe_from_dict(data)
    message = str(error.value)
    assert "\n" not in message and "more problem" not in message
    for part in ("'num_sample' at calibration", "stages.0.group_size", "'bitz' at stages.0"):
        assert part in message
    many = {"stages": [{"method": "rtn"}], **{f"k{i}": i for i in range(6)}}
    with pytest.raises(CompressError, match=r"\(and 2 more problems\)$"):
        recipe_from_dict(many)


# --- refused when the recipe is built, so --dry-run refuses them too (issue 9) --------------------------------


@pytest.mark.parametrize(
    "stage",
    [
        {"method": "rtn"},
        {"method": "gptq"},
        {"method": "sparsegpt"},
        {"method": "wanda"},
        {"method": "structured", "target": "channels", "ratio": 0.25},
    ],
)
def test_an_ignore_regex_that_does_not_compile_is_refused(stage):
    with pytest.raises(CompressError, match=r"pattern 're:\(\(' is not a valid regular expression"):
        recipe_from_dict({"stages": [{**stage, "ignore": ["lm_head", "re:(("]}]})


def test_ignore_and_per_layer_regexes_through_flags_name_the_flag():
    with pytest.raises(CompressError, match=r"^--ignore: pattern 're:\(\(' is not a valid regular expression"):
        recipe_from_flags(load_recipe_data("w4a16-gptq"), {"stages.*.ignore": ["re:(("]})
    with pytest.raises(CompressError, match=r"^--per-layer-sparsity: pattern 're:\[' is not a valid"):
        recipe_from_flags(load_recipe_data("sparse50-sparsegpt"), {"stages.*.per_layer": {"re:[": 0.3}})
    assert recipe_from_dict({"stages": [{"method": "rtn", "ignore": ["re:.*down_proj$", "[ab]*"]}]})


@pytest.mark.parametrize("gate", [{"max_ppl_increase": 0.05}, {"min_cosine": 0.99}])
def test_a_gate_with_eval_disabled_is_refused(gate):
    field = next(iter(gate))
    with pytest.raises(CompressError, match=rf"gate eval\.{field} .* eval is disabled"):
        recipe_from_dict({"stages": [{"method": "rtn"}], "eval": {"enabled": False, **gate}})
    with pytest.raises(CompressError, match="eval is disabled"):
        recipe_from_flags(load_recipe_data("w4a16-rtn"), {"eval.enabled": False, f"eval.{field}": gate[field]})
    # the compression ratio is measured without eval, so its gate stands alone
    assert recipe_from_dict({"stages": [{"method": "rtn"}], "eval": {"enabled": False, "min_compression_ratio": 2}})


def test_pattern_and_a_different_sparsity_conflict():
    with pytest.raises(CompressError, match=r"sparsity 0\.7 \(--sparsity\) conflicts with pattern 2:4"):
        recipe_from_dict({"stages": [{"method": "sparsegpt", "pattern": "2:4", "sparsity": 0.7}]})
    base = load_recipe_data("sparse50-sparsegpt")
    with pytest.raises(CompressError, match=r"--sparsity\) conflicts with pattern 2:4 \(--pattern\)"):
        recipe_from_flags(base, {"stages.*.pattern": "2:4", "stages.*.sparsity": 0.7})
    with pytest.raises(CompressError, match=r"per_layer sparsities .* do not combine with pattern 2:4"):
        recipe_from_dict({"stages": [{"method": "wanda", "pattern": "2:4", "per_layer": {"mlp.*": 0.6}}]})


def test_a_pattern_records_the_sparsity_it_gives():
    import yaml

    base = load_recipe_data("sparse50-sparsegpt")  # sparsity: 0.5 in the preset
    one_of_four = recipe_from_flags(base, {"stages.*.pattern": "1:4"})
    assert (one_of_four.stages[0].pattern, one_of_four.stages[0].sparsity) == ("1:4", 0.75)
    assert recipe_from_dict(yaml.safe_load(dump_recipe(one_of_four))) == one_of_four
    same = recipe_from_dict({"stages": [{"method": "magnitude", "pattern": "2:4", "sparsity": 0.5}]})
    assert same.stages[0].sparsity == 0.5
    unstructured = recipe_from_flags(load_recipe_data("2of4-w4a16"), {"stages.*.sparsity": 0.6,
                                                                      "stages.*.method": "sparsegpt"})
    assert (unstructured.stages[0].pattern, unstructured.stages[0].sparsity) == (None, 0.6)


def test_quantization_options_without_bits_are_refused():
    with pytest.raises(CompressError, match=r"group_size \(--group-size\) applies only when bits"):
        recipe_from_dict({"stages": [{"method": "sparsegpt", "group_size": 64}]})
    with pytest.raises(CompressError, match=r"symmetric \(--sym/--asym\) applies only when bits"):
        recipe_from_flags(load_recipe_data("sparse50-sparsegpt"), {"stages.*.symmetric": False})
    assert recipe_from_dict({"stages": [{"method": "sparsegpt", "bits": 4, "group_size": 64}]})


def test_presets_and_their_dumps_still_validate():
    import yaml

    for name in preset_names():
        recipe = load_recipe(name)
        assert recipe_from_dict(yaml.safe_load(dump_recipe(recipe))) == recipe


def test_doc_separator_fields():
    recipe = load_recipe("w4a16-rtn")
    assert recipe.calibration.doc_separator is None and recipe.eval.doc_separator is None
    split = recipe_from_dict({"stages": [{"method": "rtn"}], "calibration": {"doc_separator": "\n\n"},
                              "eval": {"doc_separator": "\n\n"}})
    assert split.calibration.doc_separator == split.eval.doc_separator == "\n\n"
    with pytest.raises(CompressError, match="calibration.doc_separator"):
        recipe_from_dict({"stages": [{"method": "rtn"}], "calibration": {"doc_separator": ""}})


def test_activation_quantization_with_the_weight_only_gptq_layout_is_refused_from_the_recipe():
    """W8A8 written as GPTQ would lose the activation scheme; refused before any model loads (it used to
    surface at export, after the whole sweep)."""
    stage = {"method": "gptq", "bits": 8, "group_size": -1, "activations": "int8-dynamic"}
    with pytest.raises(CompressError, match="GPTQ layout, which is weight-only"):
        recipe_from_dict({"stages": [stage], "export": {"format": "gptq"}})
    assert recipe_from_dict({"stages": [stage]}).export.format == "compressed-tensors"
