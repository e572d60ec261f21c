"""Stage flags pass transform stages by (``Pass.takes_stage_flags``), wherever those stand in the recipe."""

from __future__ import annotations

from compress.recipes.flags import apply_flags, recipe_from_flags


def test_stage_flags_leave_a_rotation_alone_anywhere_in_the_recipe() -> None:
    base = {"stages": [{"method": "rotate", "kind": "hadamard", "seed": 3},
                       {"method": "gptq", "bits": 4},
                       {"method": "rotate", "kind": "hadamard"}]}
    flags = {"stages.*.method": "rtn", "stages.*.bits": 3, "stages.*.ignore": ["lm_head", "re:.*gate.*"]}
    data = apply_flags(base, flags)
    assert data["stages"][0] == {"method": "rotate", "kind": "hadamard", "seed": 3}
    assert data["stages"][2] == {"method": "rotate", "kind": "hadamard"}
    assert data["stages"][1] == {"method": "rtn", "bits": 3, "ignore": ["lm_head", "re:.*gate.*"]}
    recipe = recipe_from_flags({"stages": base["stages"][:2]}, flags)
    assert [s.method for s in recipe.stages] == ["rotate", "rtn"]
