"""Tests of commit_mllm.data: tokenizer, media, LLaVA JSON loading and the collator."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from commit_mllm.data import (
    AUDIO_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN,
    Collator,
    DataFormatError,
    MediaError,
    add_placeholder_tokens,
    collate_for_generation,
    load_audio,
    load_image,
    load_llava,
    load_tokenizer,
    resample,
    train_tiny_tokenizer,
)
from commit_mllm.tasks import task_texts

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def tok():
    return train_tiny_tokenizer(task_texts("all"))


@pytest.fixture(scope="module")
def image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})


@pytest.fixture(scope="module")
def feature_extractor():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=80)


def image_sample(sid, answer="red", image=None, turns=None, qtype="colour"):
    convs = turns or [
        {"from": "human", "value": "<image>\nWhat colour is the shape?"},
        {"from": "gpt", "value": answer},
    ]
    return {
        "id": sid,
        "image": image or str(FIXTURES / "red.png"),
        "audio": None,
        "sampling_rate": None,
        "conversations": convs,
        "question_type": qtype,
    }


def audio_sample(sid, clip, rate=16000, answer="two"):
    return {
        "id": sid,
        "image": None,
        "audio": clip,
        "sampling_rate": rate,
        "conversations": [
            {"from": "human", "value": "<audio>\nhow many tones are there?"},
            {"from": "gpt", "value": answer},
        ],
        "question_type": "count",
    }


MULTI_TURN = [
    {"from": "human", "value": "<image>\nIs there a circle?"},
    {"from": "gpt", "value": "yes"},
    {"from": "human", "value": "What colour is it?"},
    {"from": "gpt", "value": "teal"},
]


# --------------------------------------------------------------------------- tokenizer
def test_tokenizer_special_ids_roundtrip_and_determinism(tok):
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert tok.convert_tokens_to_ids([IMAGE_TOKEN, AUDIO_TOKEN]) == [4, 5]
    assert 300 < len(tok) <= 2048
    text = "Is there NOT a red shape in the image?"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text.lower()
    assert tok.unk_token_id not in tok("any text: ünïcode", add_special_tokens=False)["input_ids"]
    again = train_tiny_tokenizer(task_texts("all"))
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_tokenizer_save_load_with_autotokenizer(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    for loaded in (AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(str(tmp_path))):
        text = "USER: <image>\nwhat shape is present? ASSISTANT: circle</s>"
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
        assert loaded.pad_token_id == 0 and loaded.convert_tokens_to_ids(IMAGE_TOKEN) == 4
        assert add_placeholder_tokens(loaded).num_added == 0


def test_add_placeholder_tokens_to_foreign_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|eot|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(["hello world <image> is here"] * 3, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|eot|>")
    size = len(hf)
    info = add_placeholder_tokens(hf)
    assert info.needs_resize and info.num_added == 2 and info.vocab_size == size + 2
    assert hf.pad_token == "<|eot|>"
    ids = hf("hi <image>\nworld", add_special_tokens=False)["input_ids"]
    assert ids.count(info.image_token_id) == 1
    assert add_placeholder_tokens(hf).num_added == 0  # idempotent


# --------------------------------------------------------------------------- media
def test_load_image_ok_missing_and_corrupt(tmp_path):
    img = load_image(FIXTURES / "red.png")
    assert img.mode == "RGB" and img.size == (8, 8) and img.getpixel((0, 0)) == (255, 0, 0)
    gray = Image.new("L", (4, 4), 7)
    assert load_image(gray).mode == "RGB"
    with pytest.raises(MediaError, match=r"image file not found: '.*nope\.png'"):
        load_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(MediaError, match=r"cannot read image '.*bad\.png': corrupt"):
        load_image(bad)
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes((FIXTURES / "blue.png").read_bytes()[:60])
    with pytest.raises(MediaError, match=r"trunc\.png"):
        load_image(truncated)


def test_load_audio_resamples_and_mixes_down(tmp_path):
    clip = load_audio(FIXTURES / "beep_8k.wav")  # 0.1 s of 440 Hz at 8 kHz
    assert clip.dtype == np.float32 and clip.shape == (1600,)
    spectrum = np.abs(np.fft.rfft(clip))
    assert abs(np.argmax(spectrum) * 16000 / 1600 - 440) <= 10
    stereo = np.stack([np.ones(100), np.zeros(100)], axis=1)
    assert np.allclose(load_audio(stereo, 16000), 0.5)
    down = resample(np.sin(np.arange(44100) * 0.01).astype(np.float32), 44100, 16000)
    assert down.shape == (16000,)
    with pytest.raises(MediaError, match=r"audio file not found: '.*x\.wav'"):
        load_audio(tmp_path / "x.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(MediaError, match=r"cannot read audio '.*bad\.wav'"):
        load_audio(bad)


# --------------------------------------------------------------------------- llava json
def test_load_llava_json_and_jsonl_fixtures():
    ds = load_llava(FIXTURES / "images.json")
    assert len(ds) == 2
    first = ds[0]
    assert first["id"] == "r0" and Path(first["image"]) == FIXTURES / "red.png"
    assert first["audio"] is None and first["question_type"] == "colour"
    assert len(ds[1]["conversations"]) == 4 and ds[1]["question_type"] is None
    audio = load_llava(FIXTURES / "audio.jsonl", load_media=True)
    sample = audio[0]
    assert sample["audio"].shape == (1600,) and sample["sampling_rate"] == 16000


def test_load_llava_media_root_and_hf_dataset(tmp_path):
    from datasets import Dataset

    rows = json.loads((FIXTURES / "images.json").read_text())
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    ds = load_llava(data, image_folder=FIXTURES, load_media=True)
    assert isinstance(ds[0]["image"], Image.Image)
    for key in ("question_type",):  # Arrow needs one type per column
        for r in rows:
            r.setdefault(key, None)
    hf = Dataset.from_list(rows)
    loaded = load_llava(hf, media_root=FIXTURES)
    assert [s["id"] for s in loaded] == ["r0", "r1"]
    assert Path(loaded[1]["image"]) == FIXTURES / "blue.png"


def _row(**over):
    row = {
        "id": "x",
        "image": "red.png",
        "conversations": [
            {"from": "human", "value": "<image>\nq?"},
            {"from": "gpt", "value": "a"},
        ],
    }
    row.update(over)
    return {k: v for k, v in row.items() if v is not None}


def _jsonl(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ({"id": "x", "image": "red.png"}, r"^data\.jsonl line 2: missing field 'conversations'$"),
        (
            _row(
                conversations=[{"from": "robot", "value": "<image>"}, {"from": "gpt", "value": "a"}]
            ),
            r"^data\.jsonl line 2: turn 0 has unknown role 'robot'",
        ),
        (
            _row(conversations=[{"from": "human", "value": "q?"}, {"from": "gpt", "value": "a"}]),
            r"^data\.jsonl line 2: has 'image' but the first human turn lacks '<image>'",
        ),
        (_row(image="missing.png"), r"^data\.jsonl line 2: image file 'missing\.png' not found"),
        (_row(image=None), r"^data\.jsonl line 2: has placeholder '<image>' but no 'image' field"),
        (
            _row(conversations=[{"from": "human", "value": "<image>\nq?"}]),
            r"^data\.jsonl line 2: the last turn must be a 'gpt' answer",
        ),
        ([1, 2], r"^data\.jsonl line 2: expected a JSON object, got list"),
    ],
)
def test_llava_row_errors_name_file_and_line(tmp_path, bad_row, message):
    (tmp_path / "red.png").write_bytes((FIXTURES / "red.png").read_bytes())
    path = _jsonl(tmp_path, [_row(), bad_row])
    with pytest.raises(DataFormatError, match=message):
        load_llava(path)


def test_llava_json_syntax_errors_have_line_and_column(tmp_path):
    bad = tmp_path / "data.json"
    bad.write_text('[\n {"id": "a",\n  "conversations": [}\n]')
    with pytest.raises(DataFormatError, match=r"^data\.json: invalid JSON at line 3, column 21: "):
        load_llava(bad)
    lines = tmp_path / "data.jsonl"
    text_only = _row(
        image=None, conversations=[{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    )
    lines.write_text(json.dumps(text_only) + "\n\n{'id': 1}\n")
    with pytest.raises(DataFormatError, match=r"^data\.jsonl line 3: invalid JSON at column 2: "):
        load_llava(lines, check_files=False)
    (tmp_path / "obj.json").write_text('{"a": 1}')
    with pytest.raises(DataFormatError, match=r"^obj\.json: top level must be a JSON list"):
        load_llava(tmp_path / "obj.json")
    bad.write_text(json.dumps([text_only, {"id": 3}]))
    with pytest.raises(DataFormatError, match=r"^data\.json row 1: missing field"):
        load_llava(bad)
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_llava(tmp_path / "none.json")


# --------------------------------------------------------------------------- collator
def _supervised_text(tok, labels_row):
    return tok.decode([t for t in labels_row.tolist() if t != IGNORE_INDEX])


def test_collator_supervises_exactly_the_answers(tok, image_processor):
    collator = Collator(tok, image_processor=image_processor, max_length=128)
    samples = [
        image_sample("a", "red"),
        image_sample("b", image=str(FIXTURES / "blue.png"), turns=MULTI_TURN, qtype=None),
        image_sample("c", "triangle", qtype="shape"),
    ]
    batch = collator(samples)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.dtype == mask.dtype == labels.dtype == torch.long
    assert ids.shape == mask.shape == labels.shape and ids.shape[0] == 3
    assert _supervised_text(tok, labels[0]) == " red</s>"
    assert _supervised_text(tok, labels[1]) == " yes</s> teal</s>"
    assert _supervised_text(tok, labels[2]) == " triangle</s>"
    # Supervised tokens are copies of the input ids at the same positions.
    sup = labels != IGNORE_INDEX
    assert torch.equal(labels[sup], ids[sup])
    assert ((ids == collator.image_token_id).sum(dim=1) == 1).all()
    assert ((ids == collator.audio_token_id).sum(dim=1) == 0).all()
    lengths = mask.sum(dim=1)
    assert lengths.max() == ids.shape[1]
    for row, n in enumerate(lengths.tolist()):  # right padding
        assert mask[row, :n].all() and not mask[row, n:].any()
        assert (ids[row, n:] == tok.pad_token_id).all()
        assert (labels[row, n:] == IGNORE_INDEX).all()
        assert ids[row, 0] == tok.bos_token_id and ids[row, n - 1] == tok.eos_token_id
    decoded = tok.decode(ids[0, : lengths[0]])
    assert decoded == "<s>user: <image>\nwhat colour is the shape? assistant: red</s>"
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["question_type"] == ["colour", "", "shape"]


def test_generation_batch_is_left_padded_prompt(tok, image_processor):
    samples = [image_sample("a", "red"), image_sample("b", turns=MULTI_TURN, qtype="colour")]
    batch = collate_for_generation(samples, tok, image_processor=image_processor)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert batch["answers"] == ["red", "teal"] and batch["ids"] == ["a", "b"]
    assert mask[:, -1].all() and not mask[0, 0]  # left padding: prompts end together
    assert (ids[~mask.bool()] == tok.pad_token_id).all()
    assert tok.decode(ids[0][mask[0].bool()]).endswith("what colour is the shape? assistant:")
    long_prompt = tok.decode(ids[1][mask[1].bool()])
    assert long_prompt.endswith("assistant: yes</s>user: what colour is it? assistant:")
    assert "labels" not in batch and batch["pixel_values"].shape[0] == 2


def test_collator_chat_template_masks_answers(tok, image_processor):
    chat_tok = train_tiny_tokenizer(task_texts("easy-vqa"))
    chat_tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    collator = Collator(chat_tok, image_processor=image_processor)
    assert collator.use_chat_template
    batch = collator([image_sample("b", turns=MULTI_TURN)])
    assert _supervised_text(chat_tok, batch["labels"][0]) == "yes</s>teal</s>"
    gen = collator.generation_batch([image_sample("b", turns=MULTI_TURN)])
    assert chat_tok.decode(gen["input_ids"][0]).endswith("it?<|assistant|>")


def test_collator_audio_features_padded_to_batch_max(tok, feature_extractor):
    rng = np.random.default_rng(0)
    clips = [
        rng.standard_normal(8000).astype(np.float32) * 0.1,  # 0.5 s -> 50 frames
        rng.standard_normal(19_713).astype(np.float32) * 0.1,  # 1.23 s -> 124 frames
        rng.standard_normal(4000).astype(np.float32) * 0.1,  # 0.5 s at 8 kHz -> 50 frames
    ]
    samples = [
        audio_sample("0", clips[0]),
        audio_sample("1", clips[1]),
        audio_sample("2", clips[2], 8000),
    ]
    batch = Collator(tok, feature_extractor=feature_extractor)(samples)
    feats, fmask = batch["input_features"], batch["feature_attention_mask"]
    assert feats.dtype == torch.float32 and fmask.dtype == torch.long
    assert feats.shape == (3, 80, 124) and fmask.shape == (3, 124)  # not 3000 (30 s)
    assert fmask.sum(dim=1).tolist() == [50, 124, 50]
    assert (fmask[:, :50] == 1).all() and (fmask[0, 50:] == 0).all()
    assert ((batch["input_ids"] == tok.convert_tokens_to_ids(AUDIO_TOKEN)).sum(1) == 1).all()
    assert "pixel_values" not in batch
    odd = Collator(tok, feature_extractor=feature_extractor)([audio_sample("0", clips[1][:8100])])
    assert odd["input_features"].shape[-1] == 52  # 51 frames rounded up to even


def test_collator_errors(tok, image_processor, feature_extractor):
    collator = Collator(tok, image_processor=image_processor, feature_extractor=feature_extractor)
    no_image = image_sample("t")
    no_image["image"] = None
    with pytest.raises(ValueError, match="batch mixes samples with and without 'image'"):
        collator(
            [
                image_sample("a"),
                {
                    **no_image,
                    "conversations": [
                        {"from": "human", "value": "hi"},
                        {"from": "gpt", "value": "yes"},
                    ],
                },
            ]
        )
    with pytest.raises(ValueError, match=r"sample t: expected 0 '<image>' placeholder"):
        collator([no_image])
    missing = image_sample(
        "m", turns=[{"from": "human", "value": "q?"}, {"from": "gpt", "value": "a"}]
    )
    with pytest.raises(
        ValueError, match=r"sample m: expected 1 '<image>' placeholder token\(s\), found 0"
    ):
        collator([missing])
    with pytest.raises(ValueError, match=r"image samples need Collator\(image_processor"):
        Collator(tok)([image_sample("a")])
    with pytest.raises(ValueError, match="max_length=6 cuts every answer"):
        Collator(tok, image_processor=image_processor, max_length=6)([image_sample("a")])


def test_collator_with_llava_dataset_and_dataloader(tok, image_processor, feature_extractor):
    from torch.utils.data import DataLoader

    collator = Collator(tok, image_processor=image_processor, feature_extractor=feature_extractor)
    ds = load_llava(FIXTURES / "images.json")
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=collator)))
    assert _supervised_text(tok, batch["labels"][1]) == " yes</s> blue</s>"
    audio = load_llava(FIXTURES / "audio.jsonl")
    batch = collator([audio[0], audio[1]])
    assert batch["input_features"].shape == (2, 80, 10)  # 0.1 s -> 10 frames
    assert sf.info(str(FIXTURES / "beep_8k.wav")).samplerate == 8000


def test_make_sample_puts_one_placeholder_per_medium_first_and_the_answer_as_the_gpt_turn():
    from commit_mllm.data import make_sample

    wave = np.zeros(160, dtype=np.float32)
    both = make_sample(
        "s1", "what?", "red", "colour", image="a.png", audio=wave, sampling_rate=16000
    )
    assert both["conversations"] == [
        {"from": "human", "value": f"{IMAGE_TOKEN}\n{AUDIO_TOKEN}\nwhat?"},
        {"from": "gpt", "value": "red"},
    ]
    assert (both["id"], both["image"], both["sampling_rate"], both["question_type"]) == (
        "s1",
        "a.png",
        16000,
        "colour",
    )
    assert both["audio"] is wave
    audio_only = make_sample("s2", "how high?", "low", None, audio=wave, sampling_rate=16000)
    assert audio_only["conversations"][0]["value"] == f"{AUDIO_TOKEN}\nhow high?"
    assert audio_only["image"] is None
    image_only = make_sample("s3", "which shape?", "circle", "shape", image="b.png")
    assert image_only["conversations"][0]["value"] == f"{IMAGE_TOKEN}\nwhich shape?"
    assert (image_only["audio"], image_only["sampling_rate"]) == (None, None)
    text_only = make_sample("s4", "hi?", "yes", None)
    assert text_only["conversations"][0]["value"] == "hi?"
