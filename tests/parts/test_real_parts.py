"""Real parts from PyPI wheels (commit_mllm.parts), end to end on KB-sized stand-ins.

The stand-ins (tests/parts_fakes.py) have the real files' formats and layouts: a DINOv2
saliency ONNX export, a SmolLM2-like GGUF, a CTranslate2 Whisper model. Each goes through the
real converter, its runtime check (onnxruntime / CTranslate2), the atomic cache publish, and
is then loaded by a real-parts preset through the normal assembly path. The real preparation
(~1 min, ~250 MB of wheels) is the opt-in ``slow`` test at the end.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "real_parts"))

import make_digits

import parts_fakes as fakes
from commit_mllm.parts import whisper as ct2
from commit_mllm.parts.real import (
    PartMissingError,
    is_prepared,
    part_folder,
    prepare_part,
    preset_folders,
)
from commit_mllm.parts.tokenizer import rename_special_tokens
from commit_mllm.parts.wheels import WheelError, locate, record_hash

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("gguf")
pytest.importorskip("ctranslate2")


class Log:
    def __init__(self):
        self.lines = []

    def __call__(self, msg):
        self.lines.append(msg)


# ------------------------------------------------------------------ stand-in sources
@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Fake installed packages holding the three stand-ins, on sys.path."""
    root = tmp_path_factory.mktemp("site")
    out = {
        "dinov2": fakes.fake_package(root, "fake_focus", "models/vit.onnx", fakes.tiny_dinov2_onnx),
        "smollm2": fakes.fake_package(root, "fake_smollm", "tiny.gguf", fakes.tiny_smollm_gguf),
        "whisper": fakes.fake_package(
            root,
            "fake_noter",
            "model/model.bin",
            lambda p: fakes.fake_ct2_dir(p.parent),
            companions=("model/config.json", "model/vocabulary.txt"),
        ),
    }
    sys.path.insert(0, str(root))
    yield out
    sys.path.remove(str(root))


@pytest.fixture
def stand_ins(sources, monkeypatch):
    """The converters read the stand-ins instead of the real wheels."""
    from commit_mllm.parts import dinov2, smollm2, whisper

    for mod, name in ((dinov2, "dinov2"), (smollm2, "smollm2"), (whisper, "whisper")):
        monkeypatch.setattr(mod, "SOURCE", sources[name])
    return sources


@pytest.fixture(scope="module")
def prepared(sources, tmp_path_factory):
    """The three stand-in parts prepared once into a fresh cache through prepare_part."""
    from commit_mllm.parts import dinov2, smollm2, whisper

    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    for mod, name in ((dinov2, "dinov2"), (smollm2, "smollm2"), (whisper, "whisper")):
        mp.setattr(mod, "SOURCE", sources[name])
    logs = {}
    try:
        for name in ("dinov2", "smollm2", "whisper"):
            logs[name] = Log()
            prepare_part(name, cache, say=logs[name])
    finally:
        mp.undo()
    return cache, logs


# ------------------------------------------------------------------ preparation
def test_each_part_is_converted_checked_and_published(prepared):
    cache, logs = prepared
    assert sorted(p.name for p in cache.iterdir()) == [
        "dinov2-vits14",
        "smollm2-135m",
        "whisper-tiny-en",
    ]  # nothing half-written, no temporary or download folder left
    for name in ("dinov2", "smollm2", "whisper"):
        folder = part_folder(name, cache)
        report = json.loads((folder / "report.json").read_text())
        assert report["part"] == name and report["format"] == 1
        assert report["files"] and all((folder / f).is_file() for f in report["files"])
        assert is_prepared(name, cache)
        assert "(usually" in logs[name].lines[0] and "ready in" in logs[name].lines[-1]
    dino = json.loads((part_folder("dinov2", cache) / "report.json").read_text())
    assert dino["check"]["against"] == "onnxruntime" and dino["check"]["image_px"] == 28
    assert dino["check"]["max_abs_diff"] < 1e-4  # also exercises the in-graph interpolation
    wh = json.loads((part_folder("whisper", cache) / "report.json").read_text())
    assert wh["check"]["against"] == "ctranslate2" and wh["check"]["max_abs_diff"] < 1e-4
    assert wh["check"]["frames"] == 2 * fakes.POS
    llm = json.loads((part_folder("smollm2", cache) / "report.json").read_text())
    assert llm["check"]["placeholder_ids"] == {"image": 3, "audio": 4}
    assert not llm["check"]["needs_resize"] and llm["vocab_size"] == 263


def test_converted_folders_are_ordinary_hf_folders(prepared):
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForCausalLM,
        AutoTokenizer,
        WhisperFeatureExtractor,
    )

    cache, _ = prepared
    vision = part_folder("dinov2", cache)
    assert AutoConfig.from_pretrained(vision).model_type == "dinov2"
    proc = AutoImageProcessor.from_pretrained(vision, backend="pil")
    assert proc.size == {"height": 28, "width": 28} and not proc.do_center_crop
    assert list(proc.image_mean) == [0.485, 0.456, 0.406]
    llm = part_folder("smollm2", cache)
    model = AutoModelForCausalLM.from_pretrained(llm)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert "quantization_config" not in json.loads((llm / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(llm)
    assert tok.convert_ids_to_tokens([3, 4]) == ["<image>", "<audio>"]
    assert tok.encode("a <image>\nb", add_special_tokens=False).count(3) == 1
    # The default system prompt is gone; a given system message still renders.
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n"
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False).startswith("<|im_start|>system\ns")
    audio = part_folder("whisper", cache)
    assert AutoConfig.from_pretrained(audio).architectures == ["WhisperEncoder"]
    assert WhisperFeatureExtractor.from_pretrained(audio).feature_size == fakes.MELS


def test_prepare_is_a_no_op_when_prepared(prepared):
    cache, _ = prepared
    report = part_folder("dinov2", cache) / "report.json"
    before, mtime = report.read_bytes(), report.stat().st_mtime_ns
    log = Log()
    t0 = time.perf_counter()
    assert prepare_part("dinov2", cache, say=log) == part_folder("dinov2", cache)
    assert time.perf_counter() - t0 < 1.0
    assert log.lines == [f"[prepare] dinov2: already prepared in {part_folder('dinov2', cache)}"]
    assert report.read_bytes() == before and report.stat().st_mtime_ns == mtime


def test_a_damaged_or_older_folder_is_not_prepared(stand_ins, tmp_path):
    prepare_part("whisper", tmp_path, say=None)
    folder = part_folder("whisper", tmp_path)
    with open(folder / "model.safetensors", "ab") as f:
        f.write(b"x")  # size differs from the report: not trusted
    assert not is_prepared("whisper", tmp_path)
    prepare_part("whisper", tmp_path, say=None)  # rebuilt
    assert is_prepared("whisper", tmp_path)
    report = json.loads((folder / "report.json").read_text())
    (folder / "report.json").write_text(json.dumps({**report, "format": 0}))
    assert not is_prepared("whisper", tmp_path)


def test_a_failed_check_publishes_nothing(stand_ins, tmp_path, monkeypatch):
    from commit_mllm.parts import dinov2

    monkeypatch.setattr(dinov2, "TOLERANCE", 0.0)  # any difference at all is refused
    with pytest.raises(ValueError, match=r"differs from onnxruntime .* refused"):
        prepare_part("dinov2", tmp_path, say=None)
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_only_when_the_new_folder_is_complete(stand_ins, tmp_path, monkeypatch):
    from commit_mllm.parts import whisper

    prepare_part("whisper", tmp_path, say=None)
    report = (part_folder("whisper", tmp_path) / "report.json").read_text()

    def killed(*_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(whisper, "check_against_ctranslate2", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare_part("whisper", tmp_path, force=True, say=None)
    assert (part_folder("whisper", tmp_path) / "report.json").read_text() == report
    assert [p.name for p in tmp_path.iterdir()] == ["whisper-tiny-en"]


def test_missing_packages_and_parts_are_one_line_errors(tmp_path, monkeypatch):
    from commit_mllm.parts import real

    monkeypatch.setattr(real, "missing_modules", lambda _name: ["onnx"])
    with pytest.raises(ModuleNotFoundError, match=r"needs onnx: pip install 'commit-mllm\[real\]'"):
        prepare_part("dinov2", tmp_path, say=None)
    with pytest.raises(PartMissingError) as err:
        preset_folders("dinov2-smollm2", ("vision",), tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and f"`commit-mllm prepare dinov2 --cache-dir {tmp_path}`" in msg
    with pytest.raises(ValueError, match="has no audio encoder; presets: whisper-smollm2"):
        preset_folders("dinov2-smollm2", ("audio",), tmp_path)
    with pytest.raises(ValueError, match="unknown part 'nope'"):
        prepare_part("nope", tmp_path)


# ------------------------------------------------------------------ loading through presets
def _run_config(cache: Path, preset: str, task: str, *extra: str):
    from commit_mllm.training.config import load_config

    text = f"data: {{task: {task}}}\nmodel: {{preset: {preset}}}\n"
    path = cache / f"{preset}.yaml"
    path.write_text(text)
    over = [
        f"run.cache_dir={cache}",
        "data.max_train_samples=8",
        "data.max_eval_samples=4",
        "train.batch_size=4",
        *extra,
    ]
    return load_config(path, over)


def _one_step(a) -> None:
    batch = a.collator([a.train_set[i] for i in range(4)])
    batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    trainable = [p for p in a.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    loss = a.model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    torch.optim.SGD(trainable, lr=0.1).step()
    assert any(not torch.equal(b, p) for b, p in zip(before, trainable))


def test_dinov2_smollm2_preset_assembles_and_trains(prepared):
    from commit_mllm.training.assembly import assemble

    cache, _ = prepared
    cfg = _run_config(
        cache,
        "dinov2-smollm2",
        "easy-vqa",
        "model.mllm.vision.freeze=true",
        "model.mllm.llm.lora.r=4",
        "model.mllm.vision.feature_layer=-1",
    )
    a = assemble(cfg, log=lambda _m: None)
    enc = a.model.vision_encoder
    assert type(enc.hf_model).__name__ == "Dinov2Model"
    assert a.collator.image_token_id == 3 and not a.collator.placeholder_info.needs_resize
    assert a.model.hf_llm.get_input_embeddings().num_embeddings == 263
    assert not any(p.requires_grad for p in enc.parameters())  # frozen tower
    batch = a.collator([a.train_set[0]])
    assert batch["pixel_values"].shape[-2:] == (28, 28)  # the processor's own size
    assert a.model.encode(batch)["vision"].shape[1] == 4  # 2x2 patches, CLS dropped
    _one_step(a)
    cfg = _run_config(cache, "dinov2-smollm2", "easy-vqa", "model.image_size=56")
    a = assemble(cfg, log=lambda _m: None)
    assert a.collator([a.train_set[0]])["pixel_values"].shape[-2:] == (56, 56)
    with pytest.raises(ValueError, match=r"image_size 64 is not a multiple of .* 14-pixel patch"):
        assemble(_run_config(cache, "real", "easy-vqa", "model.image_size=64"))


def test_whisper_smollm2_preset_assembles_and_trains(prepared):
    from commit_mllm.training.assembly import assemble

    cache, _ = prepared
    cfg = _run_config(cache, "real", "tones-aqa", "model.mllm.audio.max_source_positions=6")
    a = assemble(cfg, log=lambda _m: None)
    assert a.model.audio_encoder.window_frames == 12
    assert a.collator.audio_token_id == 4
    _one_step(a)


def test_missing_part_in_a_run_is_a_one_line_cli_error(tmp_path, capsys):
    from commit_mllm.cli import main

    (tmp_path / "c.yaml").write_text("data: {task: tones-aqa}\nmodel: {preset: whisper-smollm2}\n")
    over = [f"run.cache_dir={tmp_path / 'empty'}", f"run.output_dir={tmp_path / 'run'}"]
    assert main(["train", "--config", str(tmp_path / "c.yaml"), *over]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "run `commit-mllm prepare whisper --cache-dir" in err


def test_cli_prepare_runs_and_is_idempotent(stand_ins, tmp_path, capsys):
    from commit_mllm.cli import main

    assert main(["prepare", "whisper", "--cache-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / "whisper-tiny-en")
    assert "[prepare] whisper: Whisper tiny.en" in err and "(usually" in err
    assert main(["prepare", "whisper", "--cache-dir", str(tmp_path)]) == 0
    assert "already prepared" in capsys.readouterr().err


# ------------------------------------------------------------------ wheels
def _wheel(folder: Path, dist: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel file for pip's --find-links."""
    name = dist.replace("-", "_")
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    meta = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: "
        b"py3-none-any\n",
    }
    with zipfile.ZipFile(path, "w") as z:
        for member, data in {**files, **meta}.items():
            z.writestr(member, data)
        z.writestr(f"{info}/RECORD", "")
    return path


def test_locate_downloads_the_wheel_with_pip_when_not_installed(tmp_path, monkeypatch):
    index = tmp_path / "index"
    index.mkdir()
    payload = os.urandom(2048)
    _wheel(index, "fake-weights", "0.3", {"fake_weights/data/w.bin": payload})
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    (tmp_path / "p.bin").write_bytes(payload)
    source = fakes.WheelFile(
        "fake-weights", "0.3", "fake_weights", "data/w.bin", record_hash(tmp_path / "p.bin")
    )
    log = Log()
    path = locate(source, tmp_path / "work", log)
    assert path.read_bytes() == payload
    assert "downloading fake-weights==0.3 with pip" in log.lines[0]
    bad = fakes.WheelFile("fake-weights", "0.3", "fake_weights", "data/w.bin", "AAAA")
    with pytest.raises(WheelError, match="refusing an unexpected file"):
        locate(bad, tmp_path / "work2")
    gone = fakes.WheelFile("fake-weights", "9.9", "fake_weights", "data/w.bin", "AAAA")
    with pytest.raises(WheelError, match=r"could not download fake-weights==9\.9 with pip"):
        locate(gone, tmp_path / "work3")


def test_locate_finds_an_installed_package_without_importing_it(sources):
    path = locate(sources["dinov2"], Path("/nonexistent"))
    assert path.name == "vit.onnx" and "fake_focus" not in sys.modules


# ------------------------------------------------------------------ converter units
def test_read_ct2_round_trip(tmp_path):
    v, _ = fakes.fake_whisper(np.random.default_rng(0))
    alias = {"decoder/projection/weight": "decoder/embeddings/weight"}
    fakes.write_ct2(tmp_path / "model.bin", v, alias)
    spec, got, aliases = ct2.read_ct2(tmp_path / "model.bin")
    assert spec == "WhisperSpec" and aliases == alias and got.keys() == v.keys()
    for k in v:
        assert got[k].dtype == v[k].dtype and np.array_equal(got[k], v[k]), k


def test_read_ct2_rejects_other_versions(tmp_path):
    (tmp_path / "model.bin").write_bytes(struct.pack("<I", 5) + fakes._string("WhisperSpec"))
    with pytest.raises(ValueError, match="version 5"):
        ct2.read_ct2(tmp_path / "model.bin")


def test_convert_encoder_names_split_and_norms():
    v, qkv = fakes.fake_whisper(np.random.default_rng(1), n_enc=3)
    cfg, sd = ct2.convert_encoder(v)
    assert cfg == {
        "num_mel_bins": fakes.MELS,
        "d_model": fakes.D,
        "encoder_layers": 3,
        "encoder_attention_heads": fakes.HEADS,
        "encoder_ffn_dim": fakes.FFN,
        "max_source_positions": fakes.POS,
        "activation_function": "gelu",
    }
    q, k, val = qkv[("encoder", 2)]
    assert np.array_equal(sd["layers.2.self_attn.q_proj.weight"], q.astype(np.float32))
    assert np.array_equal(sd["layers.2.self_attn.k_proj.weight"], k.astype(np.float32))
    assert np.array_equal(sd["layers.2.self_attn.v_proj.weight"], val.astype(np.float32))
    assert "layers.2.self_attn.k_proj.bias" not in sd  # HF Whisper's k_proj has no bias
    assert all(a.dtype == np.float32 for a in sd.values())


def test_convert_encoder_refuses_a_nonzero_k_bias():
    v, _ = fakes.fake_whisper(np.random.default_rng(2), k_bias=0.5)
    with pytest.raises(ValueError, match="k bias"):
        ct2.convert_encoder(v)


def test_decoder_state_dict_loads_strictly_into_transformers_whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    v, _ = fakes.fake_whisper(np.random.default_rng(3))
    enc_cfg, enc_sd = ct2.convert_encoder(v)
    dec_cfg, dec_sd = ct2.convert_decoder(v)
    ids = {"decoder_start_token_id": 1, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 0}
    full = WhisperForConditionalGeneration(WhisperConfig(**enc_cfg, **dec_cfg, **ids))
    sd = {f"model.encoder.{k}": torch.from_numpy(a) for k, a in enc_sd.items()}
    sd.update({f"model.decoder.{k}": torch.from_numpy(a) for k, a in dec_sd.items()})
    sd["proj_out.weight"] = sd["model.decoder.embed_tokens.weight"]
    full.load_state_dict(sd, strict=True)


def test_dinov2_mapping_reads_old_names_and_the_folded_position_table(tmp_path):
    from commit_mllm.parts.dinov2 import onnx_to_dinov2

    path = fakes.tiny_dinov2_onnx(tmp_path / "m.onnx")
    config, sd = onnx_to_dinov2(path)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (128, 2, 2)
    assert config.image_size == 42 and config.patch_size == 14
    assert sd["embeddings.position_embeddings"].shape == (1, 10, 128)
    assert "encoder.layer.1.attention.q_proj.weight" in sd  # renamed from ...query.weight
    assert not any(k.startswith("decoder") for k in sd)


def test_rename_special_tokens_refuses_real_tokens(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    added = [
        {"id": i, "content": c, "special": True}
        for i, c in enumerate(["<pad>", "<eos>", "<unused0>", "<unused1>"])
    ]
    vocab = [[c["content"], 0.0] for c in added] + [["a", -1.0]]
    (src / "tokenizer.json").write_text(
        json.dumps({"added_tokens": added, "model": {"type": "Unigram", "vocab": vocab}})
    )
    (src / "tokenizer_config.json").write_text(
        json.dumps({"added_tokens_decoder": {"2": {"content": "<unused0>"}}})
    )
    renames = {2: ("<unused0>", "<image>"), 3: ("<unused1>", "<audio>")}
    rename_special_tokens(src, tmp_path / "out", renames)
    data = json.loads((tmp_path / "out" / "tokenizer.json").read_text())
    assert [t["content"] for t in data["added_tokens"][2:4]] == ["<image>", "<audio>"]
    assert data["model"]["vocab"][2][0] == "<image>"
    cfg = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert cfg["added_tokens_decoder"]["2"]["content"] == "<image>"
    with pytest.raises(ValueError, match="token id 3 is '<unused1>', expected 'hello'"):
        rename_special_tokens(src, tmp_path / "out2", {3: ("hello", "<audio>")})


def test_make_sample_answers():
    rng = np.random.default_rng(0)
    for _ in range(50):
        text, ans = make_digits.make_sample("sum", rng)
        a, b = (make_digits.WORDS.index(w) for w in text.split(", "))
        assert ans == str(a + b)
        text, ans = make_digits.make_sample("parity", rng)
        assert ans == ("yes" if make_digits.WORDS.index(text) % 2 == 0 else "no")
        text, ans = make_digits.make_sample("number", rng)
        assert ans == str(make_digits.WORDS.index(text))


# ------------------------------------------------------------------ the real thing (opt-in)
@pytest.mark.slow
def test_prepare_real_parts_end_to_end(tmp_path):
    """~1 min and ~250 MB of wheels through pip: the real files, converted and checked."""
    for name in ("dinov2", "smollm2", "whisper"):
        prepare_part(name, tmp_path, say=None)
    dino = json.loads((part_folder("dinov2", tmp_path) / "report.json").read_text())
    assert dino["params"] == 22_056_576 and dino["check"]["max_abs_diff"] < 1e-3
    wh = json.loads((part_folder("whisper", tmp_path) / "report.json").read_text())
    assert wh["params"] == 8_208_384 and wh["check"]["max_abs_diff"] < 1e-3
    assert wh["position_table_vs_sinusoids_max_abs"] < 1e-2
    llm = json.loads((part_folder("smollm2", tmp_path) / "report.json").read_text())
    assert llm["params"] == 134_515_008 and llm["vocab_size"] == 49_152
    assert "Paris" in llm["check"]["greedy_sanity"]["answer"]


def test_converters_are_not_imported_with_the_package():
    import subprocess

    code = (
        "import sys, commit_mllm, commit_mllm.parts, commit_mllm.training.assembly\n"
        "import commit_mllm.cli\n"
        "heavy = ('onnx', 'onnxruntime', 'gguf', 'ctranslate2', 'commit_mllm.parts.dinov2')\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_salmonn_like_benchmark_config_uses_the_gemma_preset():
    from commit_mllm.training.config import load_config

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "benchmarks" / "real_parts" / "salmonn_like.yaml")
    assert cfg.model.preset == "whisper-gemma3"
    assert cfg.model.mllm.audio_projector.type == "qformer"
    assert cfg.model.mllm.audio.lora.target_modules == ["q_proj", "v_proj"]
