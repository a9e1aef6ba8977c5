"""Config-key aliases: big-framework names resolve to the canonical keys."""

import pytest

from commit_mllm.training.aliases import ALIASES, resolve_aliases


def test_every_alias_resolves():
    for alias, canonical in ALIASES.items():
        assert resolve_aliases({alias: 1.5}, "train") == {canonical: 1.5}


def test_canonical_and_other_keys_pass_through_in_order():
    cfg = {"steps": 10, "mm_projector_lr": 1e-3, "llm_lr": 2e-5, "freeze_vit": True}
    out = resolve_aliases(cfg, "train")
    assert out == {"steps": 10, "projector_lr": 1e-3, "llm_lr": 2e-5, "freeze_encoder": True}
    assert list(out) == ["steps", "projector_lr", "llm_lr", "freeze_encoder"]
    assert cfg["mm_projector_lr"] == 1e-3  # the input is not modified


def test_same_value_duplicates_are_fine():
    out = resolve_aliases({"encoder_lr": 1e-4, "vit_lr": 1e-4, "mm_vision_tower_lr": 1e-4}, "t")
    assert out == {"encoder_lr": 1e-4}


@pytest.mark.parametrize(
    "cfg, keys",
    [
        ({"encoder_lr": 1e-4, "vit_lr": 2e-4}, ("encoder_lr", "vit_lr")),
        ({"aligner_lr": 1e-3, "mm_projector_lr": 2e-3}, ("aligner_lr", "mm_projector_lr")),
        ({"freeze_vision_tower": True, "freeze_vit": False}, ("freeze_vision_tower", "freeze_vit")),
        (
            {"freeze_language_model": True, "freeze_llm": False},
            ("freeze_language_model", "freeze_llm"),
        ),
    ],
)
def test_conflicts_name_both_keys(cfg, keys):
    with pytest.raises(ValueError) as err:
        resolve_aliases(cfg, "train")
    msg = str(err.value)
    assert msg.startswith("train:")
    assert all(f"'{k}'" in msg for k in keys)
