"""docs/integrations.md stays true: its settings table is the dataclass's, its quick start runs.

The quick-start block is executed as a new user would run it, with a local tiny LLaVA folder
(model + processor saved with ``save_pretrained``) in place of the hub id and a few PNG files
as the user's data.
"""

from __future__ import annotations

import glob
import math
import re
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from commit_mllm.hf.settings_doc import BEGIN, END, config_table, render_doc  # noqa: E402

DOC = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"
HUB_LINE = 'path = "llava-hf/llava-1.5-7b-hf"'


def test_settings_table_is_in_sync_with_the_dataclass():
    text = DOC.read_text(encoding="utf-8")
    assert render_doc(text, config_table()) == text, (
        "docs/integrations.md's CoMMITConfig table is stale: run "
        "`python -m commit_mllm.hf.settings_doc docs/integrations.md`"
    )


def test_settings_table_lists_every_field_with_its_default():
    import dataclasses

    from commit_mllm import CoMMITConfig

    table = config_table()
    for field in dataclasses.fields(CoMMITConfig):
        row = next(r for r in table.splitlines() if r.startswith(f"| `{field.name}` |"))
        assert row.count("|") >= 5 and row.split("|")[4].strip(), field.name  # a meaning
    assert "| `window` | `int` | `20` |" in table
    assert "`commit`, `commit_clr`" in table  # :data:`STRATEGIES` spelled out
    with pytest.raises(ValueError, match=r"no .* block"):
        render_doc("no markers here", table)
    assert BEGIN in DOC.read_text(encoding="utf-8") and END in DOC.read_text(encoding="utf-8")


def quick_start_code() -> str:
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("## Quick start") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def tiny_llava_folder(folder: Path) -> Path:
    """A LLaVA model + processor folder, as from_pretrained expects it (no hub)."""
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    from test_hf import build

    words = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "USER:", "ASSISTANT:", "What"]
    words += ["colour", "shape", "is", "the", "red", "blue", "circle", "square", "?"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = T.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    images = T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = T.LlavaProcessor(
        image_processor=images,
        tokenizer=fast,
        patch_size=8,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,  # CLIP's CLS, dropped by the "default" strategy
    )
    model = build("llava")
    model.config.image_token_id = vocab["<image>"]
    model.config.vision_feature_select_strategy = "default"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_quick_start_runs_as_written(tmp_path, monkeypatch):
    from PIL import Image

    code = quick_start_code()
    assert HUB_LINE in code
    folder = tiny_llava_folder(tmp_path / "tiny-llava")
    code = code.replace(HUB_LINE, f"path = {str(folder)!r}")
    my_data = []
    # 128 rows = 16 steps of 8: kappa is estimated at the last step of every 16 (the default)
    for i, (colour, name) in enumerate([((220, 30, 30), "red"), ((30, 30, 220), "blue")] * 64):
        file = tmp_path / f"img{i}.png"
        Image.new("RGB", (40, 40), colour).save(file)
        my_data.append((str(file), "What colour is the shape?", name))
    monkeypatch.chdir(tmp_path)
    namespace = {"my_data": my_data}
    exec(compile(code, str(DOC), "exec"), namespace)

    trainer, callback, components = (namespace[k] for k in ("trainer", "callback", "components"))
    assert trainer.state.global_step == 16 == len(callback.history)
    assert components["encoder"].lr == 2e-5 and components["llm"].lr == 2e-4
    last = callback.history[-1]
    assert last["commit/D/encoder"] > 0 and last["commit/D/llm"] > 0
    assert math.isfinite(last["commit/kappa"])
    assert glob.glob(str(tmp_path / "out" / "runs" / "*" / "events.out.tfevents.*"))
