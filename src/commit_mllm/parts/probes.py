"""Linear probes: how much of a task a frozen encoder's features already carry.

A probe fits a multinomial logistic regression on frozen features of the task's *training*
media (3/4 fit, 1/4 evaluation) for each fact behind the answers (easy-vqa: colour and shape;
tones-aqa: count, pitch, loudness, duration), and the same architecture with random weights
gives the baseline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from commit_mllm.parts.settings import PretrainSettings

__all__ = ["audio_probe", "linear_probe", "probe_all", "vision_probe"]


def linear_probe(
    x_fit: torch.Tensor,
    y_fit: torch.Tensor,
    x_eval: torch.Tensor,
    y_eval: torch.Tensor,
    steps: int = 300,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> float:
    """Accuracy of a multinomial logistic regression trained on frozen features.

    A tiny torch replacement for scikit-learn's ``LogisticRegression``: features are
    standardised with the fit set's statistics, then full-batch AdamW fits W, b.

    Args:
        x_fit: [N, F] fit features.
        y_fit: [N] long labels.
        x_eval: [M, F] evaluation features.
        y_eval: [M] long labels.
        steps: Full-batch optimisation steps.
        weight_decay: L2 strength (decoupled).
        seed: Initialisation seed.

    Returns:
        Evaluation accuracy in [0, 1].
    """
    mean, std = x_fit.mean(0), x_fit.std(0) + 1e-6
    xf, xe = (x_fit - mean) / std, (x_eval - mean) / std
    n_cls = int(max(y_fit.max(), y_eval.max())) + 1
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(xf.shape[1], n_cls)
    with torch.no_grad():
        lin.weight.normal_(0, 0.01, generator=gen)
        lin.bias.zero_()
    opt = torch.optim.AdamW(lin.parameters(), lr=0.05, weight_decay=weight_decay)
    xf, xe = xf.detach(), xe.detach()
    with torch.enable_grad():  # callers may hold no_grad while extracting features
        for _ in range(steps):
            loss = nn.functional.cross_entropy(lin(xf), y_fit)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        return float((lin(xe).argmax(-1) == y_eval).float().mean())


def probe_all(feats: torch.Tensor, labels: dict[str, torch.Tensor], seed: int) -> dict[str, float]:
    """Linear-probe accuracy per label on a 3/4 fit, 1/4 eval split of ``feats`` [N, F]."""
    out = {}
    for name, y in labels.items():
        keep = (y >= 0).nonzero(as_tuple=True)[0]
        n_fit = (3 * len(keep)) // 4
        fit, ev = keep[:n_fit], keep[n_fit:]
        out[name] = round(linear_probe(feats[fit], y[fit], feats[ev], y[ev], seed=seed), 4)
    return out


def _easy_vqa_probe_set(n: int, seed: int) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Paths of ``n`` easy-vqa *train* images with their colour and shape labels (-1 unknown)."""
    from commit_mllm.tasks import easy_vqa

    qs, ans, ids, paths = easy_vqa._raw("train")
    colour: dict[int, int] = {}
    shape: dict[int, int] = {}
    for q, a, i in zip(qs, ans, ids):
        t = easy_vqa.question_type(q)
        if t == easy_vqa.COLOUR:
            colour[i] = easy_vqa.COLOURS.index(a)
        elif t == easy_vqa.SHAPE and a in easy_vqa.SHAPES:
            shape[i] = easy_vqa.SHAPES.index(a)
    pool = sorted(set(colour) | set(shape))
    rng = np.random.default_rng([seed, 31])
    chosen = [pool[i] for i in rng.permutation(len(pool))[:n]]
    labels = {
        "colour": torch.tensor([colour.get(i, -1) for i in chosen]),
        "shape": torch.tensor([shape.get(i, -1) for i in chosen]),
    }
    return [paths[i] for i in chosen], labels


@torch.no_grad()
def vision_probe(model: nn.Module, processor: Any, s: PretrainSettings) -> dict[str, float]:
    """Linear probes (colour, shape) on frozen last-layer patch features, mean and flat."""
    from commit_mllm.data import image_features

    paths, labels = _easy_vqa_probe_set(s.scaled(s.probe_samples, 64), s.seed)
    model.eval()
    feats = []
    for i in range(0, len(paths), 256):
        px = image_features(paths[i : i + 256], processor)
        feats.append(model(pixel_values=px).last_hidden_state[:, 1:])
    tokens = torch.cat(feats)  # [N, n_patches, d]
    out = {f"{k}_meanpool": v for k, v in probe_all(tokens.mean(1), labels, s.seed).items()}
    out.update({f"{k}_patches": v for k, v in probe_all(tokens.flatten(1), labels, s.seed).items()})
    return out


def _tones_labels(sample: dict[str, Any]) -> dict[str, int]:
    """Probe labels of a tones-aqa sample: the fact behind its answer, per question type."""
    from commit_mllm.tasks import tones_aqa

    qtype, q = sample["question_type"], sample["conversations"][0]["value"]
    a = sample["conversations"][1]["value"]
    out = {"count": -1, "pitch": -1, "loudness": -1, "duration": -1}
    if qtype in (tones_aqa.COUNT, tones_aqa.PITCH):
        out[qtype] = tones_aqa.ANSWERS[qtype].index(a)
    else:  # "first > second" is true iff the answer and the wording agree
        wording0 = q.endswith(tones_aqa.QUESTIONS[qtype][0])
        out[qtype] = int((a == "yes") == wording0)
    return out


@torch.no_grad()
def audio_probe(enc: nn.Module, fe: Any, s: PretrainSettings) -> dict[str, float]:
    """Linear probes on frozen features of tones-aqa *train* clips (4 time-segment means)."""
    from commit_mllm.data import audio_features
    from commit_mllm.tasks import load_task

    data = load_task("tones-aqa", "train", seed=s.seed, max_samples=s.scaled(s.probe_samples, 64))
    samples = [data[i] for i in range(len(data))]
    labels = {
        k: torch.tensor([_tones_labels(x)[k] for x in samples]) for k in _tones_labels(samples[0])
    }
    enc.eval()
    pooled = []
    for i in range(0, len(samples), 128):
        feats, mask = audio_features([x["audio"] for x in samples[i : i + 128]], fe)
        tokens, lengths = enc(feats, mask)
        for row, n in zip(tokens, lengths.tolist()):
            # Means over 4 equal time segments keep "first vs second" linearly readable.
            segs = np.array_split(np.arange(n), 4)
            pooled.append(torch.cat([row[seg].mean(0) for seg in segs]))
    return probe_all(torch.stack(pooled), labels, s.seed)
