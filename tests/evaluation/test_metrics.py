"""Metrics of the paper's datasets: normalization, VQA soft accuracy, MC mapping, captions."""

import math

import pytest

from commit_mllm.evaluation.metrics import (
    aokvqa_da_accuracy,
    caption_metrics,
    caption_tokenize,
    map_to_choice,
    normalize_vqa_answer,
    score,
    score_details,
    vqa_soft_accuracy,
)


# ----------------------------------------------------------------------------- normalization
@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("The Dog", "dog"),  # case, article
        ("a cat", "cat"),
        ("an apple", "apple"),
        ("Yes.", "yes"),  # trailing period
        ("two", "2"),  # number words
        ("none", "0"),
        ("Ten dogs", "10 dogs"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("1,000", "1000"),  # digit commas go
        ("black-white", "black white"),  # inner punctuation -> space
        ("black - white", "black white"),  # punctuation next to a space -> removed
        ("(left)", "left"),
        ("dont", "don't"),  # contractions restored
        ("isnt it", "isn't it"),
        ("what's", "what 's"),  # 's split off
        ("Where?", "where"),
        ("  new\tyork \n", "new york"),
    ],
)
def test_normalize_vqa_answer(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


# ----------------------------------------------------------------------------- VQA accuracy
@pytest.mark.parametrize(
    ("matching", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]
)
def test_vqa_soft_accuracy_by_matching_annotators(matching, expected):
    # Leave-one-out over 10: k matches -> (k * min(1,(k-1)/3) + (10-k) * min(1,k/3)) / 10.
    answers = ["nokia"] * matching + ["samsung"] * (10 - matching)
    assert vqa_soft_accuracy("Nokia.", answers) == pytest.approx(expected)


def test_vqa_soft_accuracy_normalizes_both_sides():
    answers = ["two", "2", "Two."] + ["22"] * 7
    assert vqa_soft_accuracy("2", answers) == pytest.approx(0.9)
    assert vqa_soft_accuracy("the 22", answers) == pytest.approx(1.0)
    assert vqa_soft_accuracy("x", ["x"]) == 1.0 and vqa_soft_accuracy("x", []) == 0.0


def test_aokvqa_script_accuracy():
    answers = ["rain"] * 2 + ["raining"] * 8
    assert aokvqa_da_accuracy("Rain", answers) == pytest.approx(2 / 3)
    assert aokvqa_da_accuracy("raining", answers) == 1.0
    assert aokvqa_da_accuracy("snow", answers) == 0.0


# ----------------------------------------------------------------------------- multiple choice
@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("B", 1),
        ("b", 1),
        ("(C)", 2),
        ("A.", 0),
        ("B) bat", 1),
        ("C. kite", 2),
        ("The answer is D", 3),
        ("umbrella", 0),  # exact text
        ("The Kite.", 2),  # normalized text
        ("he holds a phone", 3),  # one choice inside the answer
        ("the answer is a bat", 1),  # lower-case "a" is an article, not option A
        ("bat or kite", None),  # two choices inside: ambiguous
        ("E", None),  # a letter past the choices
        ("nothing", None),
    ],
)
def test_map_to_choice(prediction, expected):
    assert map_to_choice(prediction, ["umbrella", "bat", "kite", "phone"]) == expected


def test_map_to_choice_numbers():
    assert map_to_choice("three", ["2", "3", "4"]) == 1


# ------------------------------------------------------------------------------- captions
def test_caption_tokenize():
    assert caption_tokenize("A dog doesn't bark, the man's car.") == (
        "a dog does n't bark the man 's car"
    )
    assert caption_tokenize("Birds -- singing!!") == "birds singing"


def test_caption_metrics_hand_checked():
    out = caption_metrics(["the cat the cat"], [["The cat sat on mat."]])
    # BLEU-1: clipped unigrams the:1 + cat:1 of 4 = 0.5; brevity penalty exp(1 - 5/4).
    assert out["bleu_1"] == pytest.approx(0.5 * math.exp(1 - 5 / 4), rel=1e-6)
    # ROUGE-L: LCS("the cat sat", "the cat was sat") = 3 -> P = 1, R = 3/4, F = 6/7.
    out = caption_metrics(["the cat sat"], [["the cat was sat", "dogs run"]])
    assert out["rouge_l"] == pytest.approx(6 / 7)
    # METEOR, all 3 words matched in one chunk: penalty 0.5 * (1/3)^3.
    out = caption_metrics(["a cat sits"], [["a cat sits"]])
    assert out["meteor"] == pytest.approx(1 - 0.5 / 27, rel=1e-3)
    assert out["bleu_1"] == pytest.approx(1.0, rel=1e-6)


def test_caption_metrics_match_the_packages():
    import sacrebleu
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    preds = ["a dog barks loudly", "birds sing in a park", "rain falls"]
    refs = [
        ["A dog is barking.", "Loud barking of a dog."],
        ["Birds sing in a park.", "Birds chirp.", "A park with birds singing."],
        ["Heavy rain falls on a roof."],
    ]
    out = caption_metrics(preds, refs)
    gts = {str(i): [caption_tokenize(r) for r in rs] for i, rs in enumerate(refs)}
    res = {str(i): [caption_tokenize(p)] for i, p in enumerate(preds)}
    assert out["cider"] == pytest.approx(Cider().compute_score(gts, res)[0])
    assert out["bleu_4"] == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0][3])
    streams = [[rs[k] if k < len(rs) else None for rs in refs] for k in range(3)]
    expected = sacrebleu.corpus_bleu(preds, streams, lowercase=True).score / 100
    assert out["sacrebleu"] == pytest.approx(expected)
    assert out["n"] == 3 and out["cider"] > 0 and 0 < out["rouge_l"] < 1
    assert 0 < out["meteor"] < 1


def test_caption_metrics_needs_matching_lengths():
    with pytest.raises(ValueError, match="one list of references per prediction"):
        caption_metrics(["a"], [])


# ------------------------------------------------------------------------------- dispatcher
def _row(rid, answer, meta, qtype=""):
    return {
        "id": rid,
        "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": answer}],
        "question_type": qtype,
        "meta": meta,
    }


def _preds(**by_id):
    return [{"id": k, "prediction": v} for k, v in by_id.items()]


def test_score_textvqa():
    refs = [
        _row("1", "nokia", {"format": "textvqa", "answers": ["nokia"] * 9 + ["samsung"]}),
        _row("2", "22", {"format": "textvqa", "answers": ["two", "two", "2"] + ["22"] * 7}),
    ]
    out = score("textvqa", _preds(**{"1": "Nokia", "2": "two"}), refs)
    assert out == {"accuracy": pytest.approx((1.0 + 0.9) / 2), "n": 2}


def test_score_iconqa():
    mc = {"format": "iconqa", "choices": ["circle", "square"], "answer_idx": 1, "answer": "square"}
    refs = [
        _row("1", "B", mc, "choose_txt"),
        _row("2", "7", {"format": "iconqa", "answer": "7"}, "fill_in_blank"),
        _row("3", "7", {"format": "iconqa", "answer": "7"}, "fill_in_blank"),
    ]
    summary, items = score_details(
        "iconqa", _preds(**{"1": "square", "2": "seven", "3": "8"}), refs
    )
    assert summary["accuracy"] == pytest.approx(2 / 3)
    assert summary["accuracy/choose_txt"] == 1.0
    assert summary["accuracy/fill_in_blank"] == 0.5
    assert [i["score"] for i in items] == [1.0, 1.0, 0.0]


def test_score_aokvqa_mc_and_da():
    meta = {
        "format": "aokvqa",
        "choices": ["umbrella", "bat", "kite", "phone"],
        "correct_choice_idx": 0,
        "direct_answers": ["umbrella"] * 2 + ["parasol"] * 8,
        "difficult_direct_answer": False,
    }
    hard = {**meta, "correct_choice_idx": 1, "difficult_direct_answer": True}
    refs = [_row("q1", "A", meta), _row("q2", "B", hard)]
    out = score("aokvqa", _preds(q1="A", q2="kite"), refs)
    assert out["mc_accuracy"] == 0.5
    # "A" reads as "umbrella": 2 of 10 annotators -> VQA 0.6, A-OKVQA script 2/3.
    assert out["da_accuracy"] == pytest.approx(0.6)
    assert out["da_accuracy_aokvqa_script"] == pytest.approx(2 / 3)
    assert out["n_da"] == 1 and out["n"] == 2  # difficult questions skip DA
    assert score("aokvqa", _preds(q1="A) umbrella"), refs[:1])["da_accuracy"] == pytest.approx(0.6)
    da_refs = [_row("q1", "parasol", {**meta, "format": "aokvqa-da"})]
    summary, items = score_details("aokvqa-da", _preds(q1="parasol"), da_refs)
    assert summary["da_accuracy"] == 1.0 and summary["mc_accuracy"] == 0.0
    assert items[0]["score"] == 1.0


def test_score_clothoaqa():
    refs = [
        _row("a", "yes", {"format": "clothoaqa", "answers": ["yes", "yes", "no"]}, "yes_no"),
        _row("b", "dog", {"format": "clothoaqa", "answers": ["bird", "dog", "cat"]}, "single_word"),
        _row("c", "two", {"format": "clothoaqa", "answers": ["two", "two", "3"]}, "single_word"),
    ]
    preds = _preds(a="Yes, it is raining.", b="a bird", c="2")
    summary, items = score_details("clothoaqa", preds, refs)
    assert [i["score"] for i in items] == [1.0, 0.0, 1.0]
    assert summary["accuracy"] == pytest.approx(2 / 3)
    assert summary["accuracy/yes_no"] == 1.0 and summary["accuracy/single_word"] == 0.5
    assert summary["accuracy_annotators"] == pytest.approx((2 / 3 + 1 / 3 + 2 / 3) / 3)


@pytest.mark.parametrize("fmt", ["macs", "sdd"])
def test_score_captions(fmt):
    refs = [
        _row("x", "Birds sing.", {"format": fmt, "references": ["Birds sing.", "Birds chirp."]}),
        _row("y", "Rain falls.", {"format": fmt, "references": ["Rain falls on a roof."]}),
    ]
    summary, items = score_details(fmt, _preds(x="birds sing", y="rain falls"), refs)
    assert set(summary) == {
        "bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider", "sacrebleu", "meteor", "rouge_l", "n",
    }  # fmt: skip
    assert summary["n"] == 2 and summary["rouge_l"] > 0.5
    assert items[1]["references"] == ["Rain falls on a roof."]


def test_score_errors():
    refs = [_row("1", "x", {"format": "textvqa", "answers": ["x"]})]
    with pytest.raises(ValueError, match="unknown dataset format 'gqa'"):
        score("gqa", _preds(**{"1": "x"}), refs)
    with pytest.raises(ValueError, match=r"1 prediction id\(s\) have no reference, e.g. \['9'\]"):
        score("textvqa", _preds(**{"9": "x"}), refs)
    with pytest.raises(ValueError, match="no predictions"):
        score("textvqa", [], refs)
    with pytest.raises(ValueError, match="has no 'meta'"):
        score("textvqa", _preds(**{"1": "x"}), [{"id": "1", "conversations": []}])
