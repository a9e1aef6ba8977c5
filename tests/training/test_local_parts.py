"""Local encoder folders saved with save_pretrained (no processor config): vision and audio."""

import json
from pathlib import Path

import pytest
from PIL import Image

from commit_mllm.cli import main
from commit_mllm.data import train_tiny_tokenizer, write_wav
from commit_mllm.models.encoders import build_hf_config
from commit_mllm.training.assembly import assemble
from commit_mllm.training.config import load_config
from commit_mllm.training.model_spec import TINY_LLM
from commit_mllm.training.processors import processor_from_config

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["what colour is the shape ? red blue green how many tones one two is it loud"] * 4


def _llm(root: Path) -> Path:
    from transformers import LlamaForCausalLM

    tok = train_tiny_tokenizer(WORDS)
    folder = root / "llm"
    LlamaForCausalLM(build_hf_config({**TINY_LLM, "vocab_size": len(tok)})).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _clip(root: Path, side: int = 32) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    folder = root / "clip"
    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=side,
        patch_size=8,
    )
    CLIPVisionModel(cfg).save_pretrained(folder)  # config.json + weights, no processor
    return folder


def _whisper(root: Path) -> Path:
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    folder = root / "whisper"
    cfg = WhisperConfig(
        d_model=32,
        encoder_layers=1,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=64,
        num_mel_bins=40,
        max_source_positions=50,
    )
    WhisperEncoder(cfg).save_pretrained(folder)
    return folder


def _config(root: Path, modality: str, encoder: Path, llm: Path) -> Path:
    data = root / "data"
    data.mkdir()
    rows = []
    for i, colour in enumerate(["red", "blue", "green", "red"]):
        if modality == "vision":
            Image.new("RGB", (40, 40), colour).save(data / f"{i}.png")
            media, token, q = {"image": f"{i}.png"}, "<image>", "what colour is the shape?"
        else:
            import numpy as np

            write_wav(data / f"{i}.wav", (0.1 * np.sin(np.arange(4000) * 0.2)).astype("float32"))
            media, token, q = {"audio": f"{i}.wav"}, "<audio>", "how many tones?"
        turns = [{"from": "human", "value": f"{token}\n{q}"}, {"from": "gpt", "value": colour}]
        rows.append({"id": str(i), **media, "conversations": turns})
    (data / "train.json").write_text(json.dumps(rows))
    path = root / "run.yaml"
    path.write_text(
        f"""
run: {{output_dir: {root / "run"}, tensorboard: false, progress: false}}
data: {{task: null, train_file: {data / "train.json"}, eval_file: {data / "train.json"}}}
model:
  mllm:
    {modality}: {{name_or_path: {encoder}}}
    llm: {{name_or_path: {llm}}}
train: {{steps: 2, batch_size: 2, eval_batch_size: 4, max_new_tokens: 2, save_every: 0}}
commit: {{strategy: commit}}
"""
    )
    return path


@pytest.mark.parametrize("modality", ["vision", "audio"])
def test_encoder_folder_without_processor_config_trains(tmp_path, capfd, modality):
    llm = _llm(tmp_path)
    encoder = _clip(tmp_path) if modality == "vision" else _whisper(tmp_path)
    config = _config(tmp_path, modality, encoder, llm)
    assert main(["validate-config", str(config)]) == 0
    assert "a processor will be built from its config.json" in capfd.readouterr().out

    lines = []
    built = assemble(load_config(config), log=lines.append)
    built_lines = [x for x in lines if x.startswith("processor:")]
    assert len(built_lines) == 1 and str(encoder) in built_lines[0]
    assert "has no preprocessor_config.json" in built_lines[0]
    if modality == "vision":
        proc = built.collator.image_processor
        assert type(proc).__name__.startswith("CLIPImageProcessor")
        assert proc.crop_size == {"height": 32, "width": 32}  # the model config's image_size
        # feature_layer -2 of 3 layers builds 2: the third's weights are skipped, one line.
        (note,) = [x for x in lines if x.startswith("vision encoder:")]
        assert "layers 2..2" in note and "skipped on purpose" in note
    else:
        assert built.collator.feature_extractor.feature_size == 40  # num_mel_bins
    err = capfd.readouterr().err
    assert "UNEXPECTED" not in err and "LOAD REPORT" not in err

    assert main(["train", "--config", str(config)]) == 0
    out, err = capfd.readouterr()
    assert "UNEXPECTED" not in out + err and "Traceback" not in err
    assert (tmp_path / "run" / "summary.json").is_file()


def test_other_unused_weights_are_still_reported(tmp_path, caplog):
    """Only the pruned layers are silenced: a weight the model lacks is still named."""
    import torch
    from safetensors.torch import load_file, save_file

    from commit_mllm.models.encoders import VisionEncoder

    clip = _clip(tmp_path)
    weights = load_file(clip / "model.safetensors")
    weights["vision_model.stray.weight"] = torch.zeros(2)
    save_file(weights, clip / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level("WARNING"):
        enc = VisionEncoder(str(clip))
    assert "layers 2..2" in enc.load_note
    assert "1 checkpoint weight(s) unused or missing besides the pruned layers" in caplog.text
    assert "stray.weight" in caplog.text


def test_model_processor_pointing_at_a_folder_without_one_fails_in_one_line(tmp_path, capsys):
    llm, clip = _llm(tmp_path), _clip(tmp_path)
    config = _config(tmp_path, "vision", clip, llm)
    capsys.readouterr()  # the folders' save progress bars
    for command in (["validate-config", str(config)], ["train", "--config", str(config)]):
        assert main([*command, f"model.processor={clip}"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert "model.processor = " in err and "no preprocessor_config.json" in err


@pytest.mark.parametrize(
    ("config", "cls", "size"),
    [
        ({"model_type": "clip_vision_model", "image_size": 336}, "CLIPImageProcessor", 336),
        ({"model_type": "clip", "vision_config": {"image_size": 224}}, "CLIPImageProcessor", 224),
        ({"model_type": "siglip_vision_model", "image_size": 384}, "SiglipImageProcessor", 384),
        ({"model_type": "vit", "image_size": 96}, "ViTImageProcessor", 96),
    ],
)
def test_processor_built_from_each_family_config(config, cls, size):
    proc, what = processor_from_config("image", config, None)
    assert type(proc).__name__.startswith(cls) and f"{size} px" in what
    image = Image.new("RGB", (size * 2, size), "red")
    pixels = proc(images=[image], return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, size, size)


def test_model_image_size_overrides_the_built_processor():
    proc, what = processor_from_config("image", {"model_type": "vit", "image_size": 96}, 112)
    assert "112 px" in what and proc.size == {"height": 112, "width": 112}
    assert "64 px" in processor_from_config("image", {"model_type": "vit"}, None)[1]
