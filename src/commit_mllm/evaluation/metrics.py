"""The metric each paper dataset is known by, and a dispatcher :func:`score`.

- TextVQA: VQA soft accuracy with the official answer normalization (EvalAI / MMF answer
  processor: punctuation, number words to digits, articles, contractions), averaged over
  the ten leave-one-annotator-out subsets.
- A-OKVQA: multiple-choice accuracy, and direct-answer VQA soft accuracy (plus the
  A-OKVQA script's own ``min(1, matches / 3)``) on the non-difficult questions.
- IconQA: accuracy (multiple choice: the generated text is mapped to a choice by letter or
  by normalized text; fill in the blank: normalized exact match).
- ClothoAQA: accuracy against the majority answer, overall and for yes/no and
  single-word questions, plus the mean fraction of annotators matched.
- MACS, Song Describer: BLEU-1..4 and CIDEr-D (pycocoevalcap), sacreBLEU, METEOR (NLTK,
  exact + stem matches; no WordNet synonyms offline) and ROUGE-L (rouge-score). Captions
  are tokenized in pure Python (lower case, PTB-style contraction split, punctuation
  dropped) instead of the Java PTB tokenizer of coco-caption.

All values are fractions in [0, 1] (sacreBLEU is divided by 100) except CIDEr-D, which keeps
coco-caption's scale (x10).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from commit_mllm.data.collator import reference_answer

__all__ = [
    "aokvqa_da_accuracy",
    "caption_metrics",
    "caption_tokenize",
    "map_to_choice",
    "normalize_vqa_answer",
    "score",
    "score_details",
    "vqa_soft_accuracy",
]

# ---- the VQA answer normalization (EvalAI / MMF, used by TextVQA and VQAv2) ------------------
# Missing-apostrophe spellings -> the contraction (the official table, "somebody'd" quirk kept).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!")  # fmt: skip
# The official pattern means "a period not followed by a digit" ("(?!<=" is a lookahead for
# the literal "<=", not a lookbehind); kept as is so scores match the official evaluator.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")


def _process_punctuation(text: str) -> str:
    out = text
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        # A mark next to a space (or any text with 1,000-style numbers) is dropped; a mark
        # inside a word ("black-white") becomes a space.
        if p + " " in text or " " + p in text or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """Normalize an answer as the official VQA / TextVQA evaluation does.

    Lower-cases, drops ``,`` and ``?``, splits ``'s``, removes or spaces out punctuation,
    strips periods not followed by a digit, maps number words to digits, drops articles and
    restores contractions (``dont`` -> ``don't``).

    Args:
        text: A predicted or reference answer.

    Returns:
        The normalized answer.
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy: ``min(#annotators who gave the answer / 3, 1)``, leave-one-out averaged.

    For each of the ``n`` (10) annotators, the prediction is matched against the other
    ``n - 1`` answers; the ``n`` values are averaged. So 0, 1, 2, 3, 4+ matching annotators
    of 10 give 0, 0.3, 0.6, 0.9, 1.0.

    Args:
        prediction: The generated answer.
        answers: Every annotator's answer.

    Returns:
        The accuracy in [0, 1] (answers normalized with :func:`normalize_vqa_answer`).
    """
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    if len(gts) < 2:
        return float(bool(gts) and pred == gts[0])
    matches = sum(g == pred for g in gts)
    # Leaving out a matching annotator removes one match; leaving out another keeps them all.
    accs = [min(1.0, (matches - (g == pred)) / 3.0) for g in gts]
    return sum(accs) / len(accs)


def aokvqa_da_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The A-OKVQA evaluation script's direct-answer score: ``min(1, #matches / 3)``.

    Args:
        prediction: The generated answer.
        answers: The ten direct answers.

    Returns:
        The score in [0, 1] (both sides normalized with :func:`normalize_vqa_answer`).
    """
    pred = normalize_vqa_answer(prediction)
    return min(1.0, sum(normalize_vqa_answer(a) == pred for a in answers) / 3.0)


# ---- multiple choice -------------------------------------------------------------------------
_BARE_LETTER = re.compile(r"^\(?([A-Ja-j])[\).:]?$")
_LETTER_WITH_TEXT = re.compile(r"^\(?([A-J])[\).:]\s")
# Only the keyword ignores case: "the answer is a dog" must not read as option A.
_ANSWER_IS = re.compile(r"\b(?i:answer|option)\s*(?i:is|:)?\s*\(?([A-J])\b")


def map_to_choice(prediction: str, choices: Sequence[str]) -> int | None:
    """Map a generated answer to a choice index.

    In order: the normalized text equals one choice; a letter (``B``, ``(b)``, ``B.``,
    ``B. text``, ``the answer is B``); exactly one choice's text appears in the prediction
    as whole words.

    Args:
        prediction: The generated text.
        choices: The options, in order (``A`` is index 0).

    Returns:
        The choice index, or None when nothing maps (counted as wrong).
    """
    text = prediction.strip()
    norm = normalize_vqa_answer(text)
    normed = [normalize_vqa_answer(c) for c in choices]
    exact = [i for i, c in enumerate(normed) if c == norm]
    if len(exact) == 1:
        return exact[0]
    for pattern in (_BARE_LETTER, _LETTER_WITH_TEXT, _ANSWER_IS):
        m = pattern.search(text)
        if m:
            idx = ord(m.group(1).upper()) - ord("A")
            return idx if idx < len(choices) else None
    padded = f" {norm} "
    inside = [i for i, c in enumerate(normed) if c and f" {c} " in padded]
    return inside[0] if len(inside) == 1 else None


# ---- captioning --------------------------------------------------------------------------------
_CONTRACTION_SPLIT = re.compile(r"(?i)(n't|'s|'re|'ll|'ve|'m|'d)\b")
_NON_WORD = re.compile(r"[^\w' ]+")


def caption_tokenize(text: str) -> str:
    """Pure-Python stand-in for coco-caption's (Java) PTB tokenizer.

    Lower-cases, splits contractions as PTB does (``don't`` -> ``do n't``), drops
    punctuation and joins the tokens with single spaces.

    Args:
        text: A caption.

    Returns:
        Space-separated tokens.
    """
    text = _CONTRACTION_SPLIT.sub(r" \1", text.lower())
    text = _NON_WORD.sub(" ", text)
    tokens = [
        t.strip("'") if t not in ("'s", "'re", "'ll", "'ve", "'m", "'d") else t
        for t in text.split()
    ]
    return " ".join(t for t in tokens if t)


class _NoWordNet:
    """WordNet stand-in for NLTK's METEOR: no synonyms (the corpus cannot be fetched offline)."""

    def synsets(self, *args: Any, **kwargs: Any) -> list:
        """No synsets for any word."""
        return []


def _meteor(hyps: list[str], refs: list[list[str]]) -> float:
    from nltk.stem.porter import PorterStemmer
    from nltk.translate.meteor_score import meteor_score

    stemmer, wordnet = PorterStemmer(), _NoWordNet()
    values = [
        meteor_score([r.split() for r in rs], h.split(), stemmer=stemmer, wordnet=wordnet)
        for h, rs in zip(hyps, refs)
    ]
    return sum(values) / len(values)


def caption_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """Captioning metrics of generated captions against several references each.

    Args:
        predictions: One caption per clip.
        references: The reference captions of each clip (any number >= 1).

    Returns:
        ``bleu_1`` .. ``bleu_4`` and ``cider`` (pycocoevalcap, CIDEr-D), ``sacrebleu``
        (corpus BLEU, 13a tokenization, lower-cased, / 100), ``meteor`` (NLTK, no synonyms),
        ``rouge_l`` (rouge-score LCS F-measure, best reference, averaged), ``n``.
    """
    import sacrebleu
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from rouge_score import rouge_scorer

    if len(predictions) != len(references) or not predictions:
        raise ValueError("caption_metrics needs one list of references per prediction (n >= 1)")
    hyps = [caption_tokenize(p) for p in predictions]
    refs = [[caption_tokenize(r) for r in rs] for rs in references]
    gts = {str(i): rs for i, rs in enumerate(refs)}
    res = {str(i): [h] for i, h in enumerate(hyps)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    width = max(len(rs) for rs in references)
    # sacreBLEU takes reference *streams*; clips with fewer references pad with None.
    streams = [[rs[k] if k < len(rs) else None for rs in references] for k in range(width)]
    sbleu = sacrebleu.corpus_bleu(list(predictions), streams, lowercase=True).score / 100.0
    rouge = rouge_scorer.RougeScorer(["rougeL"])
    rouge_l = [
        rouge.score_multi(list(rs), p)["rougeL"].fmeasure for p, rs in zip(predictions, references)
    ]
    out = {f"bleu_{k + 1}": float(b) for k, b in enumerate(bleu)}
    out.update(
        cider=float(cider),
        sacrebleu=float(sbleu),
        meteor=_meteor(hyps, refs),
        rouge_l=sum(rouge_l) / len(rouge_l),
        n=len(predictions),
    )
    return out


# ---- per-dataset scoring -----------------------------------------------------------------------
def _accuracy_by_type(items: list[dict], key: str = "score") -> dict[str, float]:
    by_type: dict[str, list[float]] = defaultdict(list)
    for it in items:
        by_type[it["question_type"]].append(it[key])
    out = {"accuracy": sum(it[key] for it in items) / len(items)}
    if len(by_type) > 1:
        out.update({f"accuracy/{t}": sum(v) / len(v) for t, v in sorted(by_type.items())})
    return out


def _item(pred: dict, ref: dict, value: float, **extra: Any) -> dict[str, Any]:
    return {
        "id": ref["id"],
        "question_type": ref.get("question_type") or "",
        "prediction": pred["prediction"],
        "answer": reference_answer(ref),
        "score": value,
        **extra,
    }


def _score_textvqa(pairs: list[tuple[dict, dict]]) -> tuple[dict, list[dict]]:
    items = [
        _item(p, r, vqa_soft_accuracy(p["prediction"], r["meta"]["answers"])) for p, r in pairs
    ]
    return {"accuracy": sum(i["score"] for i in items) / len(items)}, items


def _score_iconqa(pairs: list[tuple[dict, dict]]) -> tuple[dict, list[dict]]:
    items = []
    for p, r in pairs:
        meta = r["meta"]
        if "choices" in meta:
            ok = map_to_choice(p["prediction"], meta["choices"]) == meta["answer_idx"]
        else:
            ok = normalize_vqa_answer(p["prediction"]) == normalize_vqa_answer(meta["answer"])
        items.append(_item(p, r, float(ok)))
    return _accuracy_by_type(items), items


def _score_aokvqa(pairs: list[tuple[dict, dict]]) -> tuple[dict, list[dict]]:
    direct = pairs[0][1]["meta"]["format"] == "aokvqa-da"
    items, da, da_script = [], [], []
    for p, r in pairs:
        meta, pred = r["meta"], p["prediction"]
        idx = map_to_choice(pred, meta["choices"])
        mc = float(idx == meta["correct_choice_idx"])
        # Multiple-choice answers are letters: their direct answer is the option's text.
        text = pred if direct or idx is None else meta["choices"][idx]
        item = _item(p, r, mc, mc=mc)
        if not meta.get("difficult_direct_answer", False):
            item["da"] = vqa_soft_accuracy(text, meta["direct_answers"])
            da.append(item["da"])
            da_script.append(aokvqa_da_accuracy(text, meta["direct_answers"]))
            if direct:
                item["score"] = item["da"]
        items.append(item)
    summary = {"mc_accuracy": sum(i["mc"] for i in items) / len(items)}
    summary["da_accuracy"] = sum(da) / len(da) if da else 0.0
    summary["da_accuracy_aokvqa_script"] = sum(da_script) / len(da_script) if da_script else 0.0
    summary["n_da"] = len(da)
    return summary, items


def _clotho_prediction(prediction: str, yes_no: bool) -> str:
    norm = normalize_vqa_answer(prediction)
    first = norm.split(" ", 1)[0]
    # "Yes, a dog barks" answers a yes/no question with yes.
    return first if yes_no and first in ("yes", "no") else norm


def _score_clothoaqa(pairs: list[tuple[dict, dict]]) -> tuple[dict, list[dict]]:
    items = []
    for p, r in pairs:
        answer = normalize_vqa_answer(reference_answer(r))
        annotators = [normalize_vqa_answer(a) for a in r["meta"]["answers"]]
        pred = _clotho_prediction(p["prediction"], answer in ("yes", "no"))
        agree = sum(a == pred for a in annotators) / max(len(annotators), 1)
        items.append(_item(p, r, float(pred == answer), annotator_agreement=agree))
    summary = _accuracy_by_type(items)
    summary["accuracy_annotators"] = sum(i["annotator_agreement"] for i in items) / len(items)
    return summary, items


def _score_captions(pairs: list[tuple[dict, dict]]) -> tuple[dict, list[dict]]:
    preds = [p["prediction"] for p, _ in pairs]
    refs = [r["meta"]["references"] for _, r in pairs]
    summary = caption_metrics(preds, refs)
    summary.pop("n")
    items = [
        {"id": r["id"], "prediction": p["prediction"], "references": r["meta"]["references"]}
        for p, r in pairs
    ]
    return summary, items


_SCORERS: dict[str, Callable[[list[tuple[dict, dict]]], tuple[dict, list[dict]]]] = {
    "textvqa": _score_textvqa,
    "iconqa": _score_iconqa,
    "aokvqa": _score_aokvqa,
    "aokvqa-da": _score_aokvqa,
    "clothoaqa": _score_clothoaqa,
    "macs": _score_captions,
    "sdd": _score_captions,
}


def score_details(
    format_name: str, predictions: Sequence[dict], references: Sequence[dict]
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Score predictions and return the summary and one record per question.

    Args:
        format_name: A dataset format (see :data:`commit_mllm.formats.FORMATS`).
        predictions: ``{"id", "prediction"}`` dicts (e.g. from
            :func:`commit_mllm.evaluation.generate.evaluate`); only these questions are scored.
        references: Converted rows (``id``, ``conversations``, ``question_type``, ``meta``).

    Returns:
        ``(summary, items)``: the metric values plus ``n``, and per-question records
        (``id``, ``prediction``, reference ``answer``, ``score`` ...).

    Raises:
        ValueError: Unknown format, no predictions, or a prediction id with no reference.
    """
    if format_name not in _SCORERS:
        raise ValueError(f"unknown dataset format {format_name!r} (use {', '.join(_SCORERS)})")
    by_id = {str(r["id"]): r for r in references}
    unknown = [str(p["id"]) for p in predictions if str(p["id"]) not in by_id]
    if unknown:
        raise ValueError(f"{len(unknown)} prediction id(s) have no reference, e.g. {unknown[:3]}")
    if not predictions:
        raise ValueError("no predictions to score")
    pairs = [(p, by_id[str(p["id"])]) for p in predictions]
    for _, r in pairs:
        if not isinstance(r.get("meta"), dict):
            raise ValueError(
                f"reference {r['id']!r} has no 'meta' (convert it with commit-mllm convert)"
            )
    summary, items = _SCORERS[format_name](pairs)
    summary["n"] = len(pairs)
    return summary, items


def score(
    format_name: str, predictions: Sequence[dict], references: Sequence[dict]
) -> dict[str, float]:
    """The dataset's metric(s) for predictions against converted reference rows.

    Args:
        format_name: ``textvqa``, ``iconqa``, ``aokvqa``, ``aokvqa-da``, ``clothoaqa``,
            ``macs`` or ``sdd``.
        predictions: ``{"id", "prediction"}`` dicts.
        references: Rows written by :func:`commit_mllm.formats.convert` (with ``meta``).

    Returns:
        Metric name -> value, plus ``n`` (see the module docstring for each dataset).
    """
    return score_details(format_name, predictions, references)[0]
