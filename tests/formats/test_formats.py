"""Converters of the paper's six datasets: rows, metric fields and every layout error."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from commit_mllm.data import load_llava, write_wav
from commit_mllm.evaluation.generate import normalize_answer
from commit_mllm.formats import FORMATS, FormatError, convert, format_modality, load_format
from commit_mllm.formats.clothoaqa import majority

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "paper"


def _image(path: Path, colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def _tone(seconds: float = 0.2, rate: int = 16_000) -> np.ndarray:
    return (0.1 * np.sin(np.arange(int(seconds * rate)) * 0.3)).astype(np.float32)


def _wav(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_wav(path, _tone())


@pytest.fixture
def paper(tmp_path):
    """The fixture annotations in their published layouts, with KB-sized media generated."""
    root = tmp_path / "paper"
    shutil.copytree(FIXTURES, root)
    for image_id in ("img0", "img1"):
        _image(root / "textvqa" / "train_images" / f"{image_id}.jpg")
    for task, pid in (("choose_txt", "101"), ("fill_in_blank", "102"), ("choose_img", "103")):
        _image(root / "iconqa" / "iconqa_data" / "iconqa" / "test" / task / pid / "image.png")
    coco = tmp_path / "coco"
    for image_id in (1, 2):
        _image(coco / "val2017" / f"{image_id:012d}.jpg")
    for name in ("rain.wav", "street.wav"):
        _wav(root / "clothoaqa" / "audio_files" / name)
    for name in ("airport-lisbon-1000-40000-a.wav", "park-helsinki-241-7242-a.wav"):
        _wav(root / "macs" / "tau" / "audio" / name)
    for rel in ("00/1000.2min.mp3", "01/2301.2min.mp3"):
        path = root / "sdd" / "audio" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, _tone(0.5), 16_000, format="MP3")
    return {"root": root, "coco": coco}


def _turns(row):
    return row["conversations"][0]["value"], row["conversations"][1]["value"]


# ---------------------------------------------------------------------------------- rows
def test_textvqa_rows(paper):
    rows = load_format("textvqa", paper["root"] / "textvqa", "val")
    assert [r["id"] for r in rows] == ["100", "101", "102"]
    prompt, answer = _turns(rows[0])
    assert prompt == (
        "<image>\nwhat brand is the phone?\nAnswer the question using a single word or phrase."
    )
    assert answer == "nokia"  # 6 exact "nokia" of 10
    assert _turns(rows[1])[1] == "22"
    assert len(rows[0]["meta"]["answers"]) == 10
    assert rows[0]["meta"]["answers"][4] == "samsung"
    assert rows[0]["image"].endswith("train_images/img0.jpg") and Path(rows[0]["image"]).is_file()
    assert rows[0]["question_type"] == "textvqa"


def test_textvqa_accepts_the_annotation_file(paper):
    src = paper["root"] / "textvqa" / "TextVQA_0.5.1_val.json"
    assert len(load_format("textvqa", src, "val")) == 3


@pytest.mark.parametrize("mode", ["problems_json", "data_json"])
def test_iconqa_rows(paper, mode):
    data = paper["root"] / "iconqa" / "iconqa_data"
    if mode == "data_json":
        (data / "problems.json").unlink()
        (data / "pid_splits.json").unlink()
    rows = load_format("iconqa", paper["root"] / "iconqa", "test")
    assert [(r["id"], r["question_type"]) for r in rows] == [
        ("101", "choose_txt"),
        ("102", "fill_in_blank"),
    ]
    prompt, answer = _turns(rows[0])
    assert prompt == (
        "<image>\nWhich shape is blue?\nA. circle\nB. square\nC. triangle\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert answer == "B"
    assert rows[0]["meta"] == {
        "format": "iconqa",
        "pid": "101",
        "sub_task": "choose_txt",
        "choices": ["circle", "square", "triangle"],
        "answer_idx": 1,
        "answer": "square",
    }
    assert _turns(rows[1])[1] == "7" and rows[1]["meta"]["answer"] == "7"
    assert rows[1]["image"].endswith("iconqa/test/fill_in_blank/102/image.png")
    only = load_format("iconqa", data, "test/fill_in_blank")
    assert [r["id"] for r in only] == ["102"]


def test_aokvqa_rows_mc_and_direct_answer(paper):
    src = paper["root"] / "aokvqa"
    mc = load_format("aokvqa", src, "val", media_root=paper["coco"])
    prompt, answer = _turns(mc[0])
    assert prompt.startswith("<image>\nWhat is the man holding?\nA. umbrella\nB. bat\n")
    assert answer == "A" and mc[1]["conversations"][1]["value"] == "B"
    meta = mc[0]["meta"]
    assert meta["choices"] == ["umbrella", "bat", "kite", "phone"]
    assert meta["correct_choice_idx"] == 0 and len(meta["direct_answers"]) == 10
    assert mc[1]["meta"]["difficult_direct_answer"] is True
    assert mc[0]["image"].endswith("val2017/000000000001.jpg")
    da = load_format("aokvqa-da", src, "val", media_root=paper["coco"])
    assert _turns(da[0])[1] == "umbrella" and _turns(da[1])[1] == "raining"
    assert da[0]["question_type"] == "direct_answer" and da[0]["meta"]["format"] == "aokvqa-da"


def _published_aokvqa(paper, tmp_path) -> Path:
    """The A-OKVQA README's layout: datasets/aokvqa/*.json beside datasets/coco/val2017/."""
    datasets = tmp_path / "datasets"
    (datasets / "aokvqa").mkdir(parents=True)
    shutil.copy(paper["root"] / "aokvqa" / "aokvqa_v1p0_val.json", datasets / "aokvqa")
    (datasets / "aokvqa" / "aokvqa_v1p0_test.json").write_text("[]")
    shutil.copytree(paper["coco"], datasets / "coco")
    return datasets


@pytest.mark.parametrize("src", ["datasets", "datasets/aokvqa", "datasets/aokvqa/file"])
def test_aokvqa_reads_the_published_datasets_layout(paper, tmp_path, src):
    datasets = _published_aokvqa(paper, tmp_path)
    path = {
        "datasets": datasets,
        "datasets/aokvqa": datasets / "aokvqa",
        "datasets/aokvqa/file": datasets / "aokvqa" / "aokvqa_v1p0_val.json",
    }[src]
    rows = load_format("aokvqa", path, "val")  # no media_root: COCO is found beside it
    assert [r["id"] for r in rows] == ["q1", "q2"]
    assert rows[0]["image"] == str(datasets / "coco" / "val2017" / "000000000001.jpg")


def test_aokvqa_coco_dir_option_and_images_in_one_folder(paper, tmp_path, capsys):
    from commit_mllm.cli import main

    datasets = _published_aokvqa(paper, tmp_path)
    elsewhere = tmp_path / "mscoco"
    shutil.move(datasets / "coco", elsewhere)
    out = tmp_path / "a.jsonl"
    with pytest.raises(FormatError, match=r"COCO val2017 image \(pass --coco-dir\) folder not"):
        load_format("aokvqa", datasets, "val")
    args = ["convert", "--format", "aokvqa", str(datasets), str(out), "--split", "val"]
    assert main([*args, "--coco-dir", str(elsewhere)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[1]["image"] == str(elsewhere / "val2017" / "000000000002.jpg")
    # --coco-dir may also be the image folder itself.
    assert main([*args, "--coco-dir", str(elsewhere / "val2017")]) == 0
    assert main([*args, "--coco-dir", str(elsewhere), "--media-root", str(tmp_path)]) == 2
    assert "give --coco-dir or --media-root, not both" in capsys.readouterr().err
    with pytest.raises(FormatError, match=r"the test split has no answers"):
        load_format("aokvqa", datasets, "test", media_root=elsewhere)


def test_clothoaqa_rows(paper):
    rows = load_format("clothoaqa", paper["root"] / "clothoaqa", "test")
    assert [r["id"] for r in rows] == ["rain.wav#0", "rain.wav#1", "street.wav#0"]
    assert [_turns(r)[1] for r in rows] == ["yes", "dog", "two"]
    assert [r["question_type"] for r in rows] == ["yes_no", "single_word", "single_word"]
    assert rows[1]["meta"]["answers"] == ["bird", "dog", "cat"]
    assert rows[1]["meta"]["confidences"] == ["no", "yes", "maybe"]
    assert _turns(rows[0])[0].startswith("<audio>\nIs it raining?\n")
    assert rows[0]["audio"].endswith("audio_files/rain.wav")


def test_clothoaqa_majority_tie_breaks():
    assert majority(["a", "b", "b"], ["yes", "no", "no"]) == "b"  # count first
    assert majority(["a", "b"], ["maybe", "yes"]) == "b"  # then confidence
    assert majority(["a", "b"], ["yes", "yes"]) == "a"  # then the first given


def test_macs_rows_use_the_tau_fold(paper):
    src, tau = paper["root"] / "macs", paper["root"] / "macs" / "tau"
    test = load_format("macs", src, "test", media_root=tau)
    assert [r["id"] for r in test] == ["park-helsinki-241-7242-a.wav"]  # fold1_evaluate
    assert test[0]["meta"]["references"] == [
        "Birds sing and children play in a park.",
        "Birds are singing.",
        "A quiet park with birds.",
    ]
    assert test[0]["meta"]["annotator_ids"] == [3, 1, 4]
    assert _turns(test[0]) == (
        "<audio>\nDescribe the audio in one sentence.",
        test[0]["meta"]["references"][0],
    )
    train = load_format("macs", src / "MACS.yaml", "train", media_root=tau)
    assert [r["id"] for r in train] == [
        "airport-lisbon-1000-40000-a.wav#0",
        "airport-lisbon-1000-40000-a.wav#1",
    ]
    assert _turns(train[1])[1] == "People are talking and walking in an airport."
    assert len(load_format("macs", src, "all", media_root=tau)) == 2


def test_macs_hash_split_without_the_tau_fold(paper):
    tau = paper["root"] / "macs" / "tau"
    (tau / "evaluation_setup" / "fold1_evaluate.csv").unlink()
    train = {r["id"].split("#")[0] for r in load_format("macs", tau.parent, "train", tau)}
    test = {r["id"] for r in load_format("macs", tau.parent, "test", tau)}
    assert train.isdisjoint(test) and len(train | test) == 2


def test_sdd_rows_from_mp3(paper):
    src = paper["root"] / "sdd"
    rows = load_format("sdd", src, "all")
    assert [r["id"] for r in rows] == ["1000", "2301"]
    assert rows[0]["meta"]["references"] == [
        "A calm piano piece with soft strings.",
        "Gentle piano and violin.",
    ]
    assert rows[0]["meta"]["caption_ids"] == ["1", "2"]
    assert rows[0]["audio"].endswith("audio/00/1000.2min.mp3")
    valid = load_format("sdd", src, "all/valid")
    assert valid[0]["meta"]["references"] == ["A calm piano piece with soft strings."]
    train = {r["id"].split("#")[0] for r in load_format("sdd", src, "train")}
    test = {r["id"] for r in load_format("sdd", src, "test")}
    assert train.isdisjoint(test) and train | test == {"1000", "2301"}
    from commit_mllm.data import load_audio

    audio = load_audio(rows[0]["audio"])
    assert audio.dtype == np.float32 and 0.4 * 16_000 < len(audio) < 0.7 * 16_000


def test_sdd_path_column_as_published_finds_the_2min_excerpts(paper):
    # The CSV says MTG-Jamendo's 00/1000.mp3; the archive holds audio/00/1000.2min.mp3.
    csv = (paper["root"] / "sdd" / "song_describer.csv").read_text()
    assert ",00/1000.mp3," in csv
    rows = load_format("sdd", paper["root"] / "sdd", "all")
    assert [Path(r["audio"]).name for r in rows] == ["1000.2min.mp3", "2301.2min.mp3"]


def test_sdd_audio_unzipped_into_audio_audio_and_exact_path_names(paper):
    sdd = paper["root"] / "sdd"
    shutil.move(sdd / "audio", sdd / "tmp")
    (sdd / "audio").mkdir()
    shutil.move(sdd / "tmp", sdd / "audio" / "audio")
    rows = load_format("sdd", sdd, "all")
    assert rows[0]["audio"].endswith("audio/audio/00/1000.2min.mp3")
    # A CSV whose path column already names the excerpt is read as written.
    csv = sdd / "song_describer.csv"
    csv.write_text(csv.read_text().replace("00/1000.mp3", "00/1000.2min.mp3"))
    assert load_format("sdd", sdd, "all")[0]["audio"].endswith("00/1000.2min.mp3")


def test_sdd_without_path_column_uses_the_published_folders(paper):
    csv = paper["root"] / "sdd" / "song_describer.csv"
    lines = [",".join(line.split(",")[:4]) for line in csv.read_text().splitlines()]
    csv.write_text("\n".join(lines) + "\n")
    rows = load_format("sdd", csv.parent, "all")
    assert rows[1]["audio"].endswith("audio/01/2301.2min.mp3")


# ---------------------------------------------------------------------- convert / load_llava
@pytest.mark.parametrize(
    ("fmt", "sub", "split", "media", "n"),
    [
        ("textvqa", "textvqa", "val", None, 3),
        ("iconqa", "iconqa", "test", None, 2),
        ("aokvqa", "aokvqa", "val", "coco", 2),
        ("aokvqa-da", "aokvqa", "val", "coco", 2),
        ("clothoaqa", "clothoaqa", "test", None, 3),
        ("macs", "macs", "train", "macs/tau", 2),
        ("sdd", "sdd", "all", None, 2),
    ],
)
def test_convert_writes_llava_jsonl(paper, tmp_path, fmt, sub, split, media, n):
    media_root = None
    if media == "coco":
        media_root = paper["coco"]
    elif media:
        media_root = paper["root"] / media
    out = tmp_path / "out" / f"{fmt}.jsonl"
    assert convert(fmt, paper["root"] / sub, out, split=split, media_root=media_root) == n
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["meta"]["format"] == fmt for r in rows)
    assert all(Path(r[format_modality(fmt)]).is_absolute() for r in rows)
    dataset = load_llava(out)  # a converted file trains like any LLaVA JSONL
    assert len(dataset) == n
    assert dataset[0][format_modality(fmt)] is not None


def test_convert_relative_paths(paper, tmp_path):
    src = paper["root"] / "textvqa"
    out = tmp_path / "tv.jsonl"
    convert("textvqa", src, out, split="val", relative_to=src)
    row = json.loads(out.read_text().splitlines()[0])
    assert row["image"] == "train_images/img0.jpg"
    assert len(load_llava(out, media_root=src)) == 3


def test_registry_and_modality():
    assert set(FORMATS) == {"textvqa", "iconqa", "aokvqa", "aokvqa-da", "clothoaqa", "macs", "sdd"}
    assert format_modality("aokvqa") == "image" and format_modality("sdd") == "audio"
    with pytest.raises(ValueError, match="unknown dataset format 'vqav2'"):
        load_format("vqav2", ".", "val")
    with pytest.raises(ValueError, match="unknown dataset format"):
        format_modality("vqav2")


# ------------------------------------------------------------------------------ layout errors
def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(fn(data)))


def _set(obj, key, value):
    obj[key] = value
    return obj


def _textvqa_errors(root: Path):
    ann = root / "textvqa" / "TextVQA_0.5.1_val.json"
    return [
        ("split", lambda: None, "test", r"unknown split 'test' \(use train, val\)"),
        ("missing", ann.unlink, "val", r"annotation file .*TextVQA_0.5.1_val.json' not found"),
        (
            "not json",
            lambda: ann.write_text("{"),
            "val",
            r"'.*TextVQA_0.5.1_val.json' is not valid JSON",
        ),
        (
            "no data",
            lambda: ann.write_text("[]"),
            "val",
            r"'TextVQA_0.5.1_val.json' must be a JSON object with a 'data' list",
        ),
        (
            "no answers",
            lambda: _edit_json(ann, lambda d: (d["data"][1].pop("answers"), d)[1]),
            "val",
            r"TextVQA_0.5.1_val.json data\[1\]: missing field 'answers'",
        ),
        (
            "bad answers",
            lambda: _edit_json(ann, lambda d: (_set(d["data"][0], "answers", "x"), d)[1]),
            "val",
            r"data\[0\]: 'answers' must be a non-empty list",
        ),
        (
            "no image",
            (root / "textvqa" / "train_images" / "img1.jpg").unlink,
            "val",
            r"data\[1\]: TextVQA media file '.*img1.jpg' not found \(expected train_images/",
        ),
    ]


@pytest.mark.parametrize("case", range(7))
def test_textvqa_layout_errors(paper, case):
    _name, break_it, split, message = _textvqa_errors(paper["root"])[case]
    break_it()
    with pytest.raises(FormatError, match=message):
        load_format("textvqa", paper["root"] / "textvqa", split)


def _iconqa_errors(root: Path):
    data = root / "iconqa" / "iconqa_data"
    probs = data / "problems.json"
    return [
        ("not iconqa", lambda: shutil.rmtree(data), "test", r"is not an IconQA folder"),
        ("split", lambda: None, "dev", r"IconQA: unknown split 'dev'"),
        ("choose_img", lambda: None, "test/choose_img", r"image choices are not supported"),
        (
            "no key",
            lambda: _edit_json(data / "pid_splits.json", lambda d: {}),
            "test",
            r"'pid_splits.json' has no list 'choose_txt_test'",
        ),
        (
            "no pid",
            lambda: _edit_json(probs, lambda d: (d.pop("101"), d)[1]),
            "test",
            r"pid 101 of 'choose_txt_test' is missing from 'problems.json'",
        ),
        (
            "bad index",
            lambda: _edit_json(probs, lambda d: (_set(d["101"], "answer", 5), d)[1]),
            "test",
            r"problems.json\['101'\]: 'answer' must be the index of one of the 3 choices",
        ),
        (
            "wrong type",
            lambda: _edit_json(probs, lambda d: (_set(d["101"], "ques_type", "x"), d)[1]),
            "test",
            r"ques_type 'x' is not 'choose_txt'",
        ),
        (
            "no question",
            lambda: _edit_json(probs, lambda d: (d["102"].pop("question"), d)[1]),
            "test",
            r"problems.json\['102'\]: missing field 'question'",
        ),
        (
            "no image",
            (data / "iconqa" / "test" / "choose_txt" / "101" / "image.png").unlink,
            "test",
            r"IconQA media file '.*101/image.png' not found",
        ),
        (
            "empty",
            lambda: (probs.unlink(), shutil.rmtree(data / "iconqa" / "test")),
            "test",
            r"no test problems for choose_txt, fill_in_blank",
        ),
    ]


@pytest.mark.parametrize("case", range(10))
def test_iconqa_layout_errors(paper, case):
    _name, break_it, split, message = _iconqa_errors(paper["root"])[case]
    break_it()
    with pytest.raises(FormatError, match=message):
        load_format("iconqa", paper["root"] / "iconqa", split)


def _aokvqa_errors(root: Path, coco: Path):
    ann = root / "aokvqa" / "aokvqa_v1p0_val.json"
    return [
        ("split", lambda: None, "dev", r"A-OKVQA: unknown split 'dev' \(use train, val\)"),
        ("missing", ann.unlink, "val", r"annotation file '.*aokvqa_v1p0_val.json' not found"),
        ("not list", lambda: ann.write_text("{}"), "val", r"must be a JSON list of questions"),
        (
            "no choices",
            lambda: _edit_json(ann, lambda d: (d[0].pop("choices"), d)[1]),
            "val",
            r"aokvqa_v1p0_val.json\[0\]: missing field 'choices'",
        ),
        (
            "bad index",
            lambda: _edit_json(ann, lambda d: (_set(d[1], "correct_choice_idx", 9), d)[1]),
            "val",
            r"\[1\]: 'correct_choice_idx' must index one of the choices",
        ),
        (
            "no answers",
            lambda: _edit_json(ann, lambda d: (_set(d[0], "direct_answers", []), d)[1]),
            "val",
            r"\[0\]: 'direct_answers' must be a non-empty list",
        ),
        (
            "no image",
            (coco / "val2017" / "000000000002.jpg").unlink,
            "val",
            r"000000000002.jpg' not found .*pass the COCO folder as --coco-dir / media_root",
        ),
    ]


@pytest.mark.parametrize("case", range(7))
def test_aokvqa_layout_errors(paper, case):
    _name, break_it, split, message = _aokvqa_errors(paper["root"], paper["coco"])[case]
    break_it()
    with pytest.raises(FormatError, match=message):
        load_format("aokvqa", paper["root"] / "aokvqa", split, media_root=paper["coco"])


def _clotho_errors(root: Path):
    csv = root / "clothoaqa" / "clotho_aqa_test.csv"
    return [
        ("split", lambda: None, "dev", r"ClothoAQA: unknown split 'dev'"),
        ("missing", csv.unlink, "test", r"annotation file '.*clotho_aqa_test.csv' not found"),
        (
            "columns",
            lambda: csv.write_text("file,question,answer\na.wav,q,yes\n"),
            "test",
            r"'clotho_aqa_test.csv' lacks column\(s\) file_name, QuestionText",
        ),
        (
            "empty",
            lambda: csv.write_text("file_name,QuestionText,answer,confidence\n,q,yes,yes\n"),
            "test",
            r"clotho_aqa_test.csv line 2: empty file_name or QuestionText",
        ),
        (
            "no audio",
            (root / "clothoaqa" / "audio_files" / "street.wav").unlink,
            "test",
            r"ClothoAQA media file '.*street.wav' not found \(expected audio_files/<file_name>\)",
        ),
    ]


@pytest.mark.parametrize("case", range(5))
def test_clothoaqa_layout_errors(paper, case):
    _name, break_it, split, message = _clotho_errors(paper["root"])[case]
    break_it()
    with pytest.raises(FormatError, match=message):
        load_format("clothoaqa", paper["root"] / "clothoaqa", split)


def _macs_errors(root: Path):
    yml = root / "macs" / "MACS.yaml"
    return [
        ("split", lambda: None, "val", r"MACS: unknown split 'val'"),
        ("missing", yml.unlink, "all", r"annotation file '.*MACS.yaml' not found"),
        ("yaml", lambda: yml.write_text("files: [\n"), "all", r"'MACS.yaml' is not valid YAML"),
        ("no files", lambda: yml.write_text("a: 1\n"), "all", r"'MACS.yaml' must be MACS.yaml"),
        (
            "no filename",
            lambda: yml.write_text("files:\n- annotations: []\n"),
            "all",
            r"MACS.yaml files\[0\]: missing field 'filename'",
        ),
        (
            "no sentence",
            lambda: yml.write_text("files:\n- filename: a.wav\n  annotations:\n  - tags: []\n"),
            "all",
            r"files\[0\] annotations\[0\]: missing field 'sentence'",
        ),
        (
            "no annotations",
            lambda: yml.write_text("files:\n- filename: a.wav\n  annotations: []\n"),
            "all",
            r"files\[0\]: no annotations with a 'sentence'",
        ),
        (
            "no audio",
            (root / "macs" / "tau" / "audio" / "park-helsinki-241-7242-a.wav").unlink,
            "all",
            r"MACS media file '.*park-helsinki-241-7242-a.wav' not found",
        ),
    ]


@pytest.mark.parametrize("case", range(8))
def test_macs_layout_errors(paper, case):
    _name, break_it, split, message = _macs_errors(paper["root"])[case]
    break_it()
    tau = paper["root"] / "macs" / "tau"
    with pytest.raises(FormatError, match=message):
        load_format("macs", paper["root"] / "macs", split, media_root=tau)


def _sdd_errors(root: Path):
    csv = root / "sdd" / "song_describer.csv"
    return [
        ("split", lambda: None, "val", r"SongDescriber: unknown split 'val'"),
        ("subset", lambda: None, "all/x", r"unknown subset 'x'"),
        ("missing", csv.unlink, "all", r"annotation file '.*song_describer.csv' not found"),
        (
            "columns",
            lambda: csv.write_text("id,caption\n1,x\n"),
            "all",
            r"lacks column\(s\) caption_id, track_id",
        ),
        (
            "track id",
            lambda: csv.write_text("caption_id,track_id,caption\n1,abc,x\n"),
            "all",
            r"song_describer.csv line 2: needs a numeric track_id and a caption",
        ),
        (
            "no audio",
            (root / "sdd" / "audio" / "01" / "2301.2min.mp3").unlink,
            "all",
            r"song_describer.csv track 2301: SongDescriber media file not found \(looked at "
            r"'.*01/2301.mp3', '.*01/2301.2min.mp3'; expected audio/<NN>/<track_id>.2min.mp3",
        ),
    ]


@pytest.mark.parametrize("case", range(6))
def test_sdd_layout_errors(paper, case):
    _name, break_it, split, message = _sdd_errors(paper["root"])[case]
    break_it()
    with pytest.raises(FormatError, match=message):
        load_format("sdd", paper["root"] / "sdd", split)


def test_missing_dataset_path(tmp_path):
    with pytest.raises(FormatError, match=r"textvqa: dataset path '.*nowhere' does not exist"):
        load_format("textvqa", tmp_path / "nowhere", "val")


def test_missing_media_folder(paper, tmp_path):
    with pytest.raises(FormatError, match=r"COCO val2017 image folder not found \(looked at"):
        load_format("aokvqa", paper["root"] / "aokvqa", "val", media_root=tmp_path / "no-coco")


# ------------------------------------------------------------------------ convert + evaluate
def _tiny_config(tmp_path: Path, train_file: Path) -> Path:
    cfg = f"""
run: {{output_dir: {tmp_path / "run"}, seed: 0, tensorboard: false, progress: false}}
data: {{task: null, train_file: {train_file}, eval_file: {train_file}, max_length: 64}}
model: {{preset: tiny-random, image_size: 32, mllm: {{vision_projector: {{type: mlp}}}}}}
train: {{steps: 1, batch_size: 2, eval_batch_size: 2, max_new_tokens: 3, cpu: true}}
commit: {{strategy: constant}}
"""
    path = tmp_path / "tiny_textvqa.yaml"
    path.write_text(cfg)
    return path


def test_run_convert_and_run_eval(paper, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    from commit_mllm.training.assembly import assemble
    from commit_mllm.training.checkpoint import save_checkpoint
    from commit_mllm.training.config import load_config
    from commit_mllm.training.paper_eval import (
        load_trainable,
        read_converted,
        run_convert,
        run_eval,
    )

    converted = tmp_path / "textvqa_val.jsonl"
    assert run_convert("textvqa", paper["root"] / "textvqa", converted, split="val") == 3
    config = _tiny_config(tmp_path, converted)
    built = assemble(load_config(config), log=lambda _: None)
    with torch.no_grad():
        next(p for p in built.model.parameters() if p.requires_grad).fill_(0.125)
    opt = torch.optim.AdamW([p for p in built.model.parameters() if p.requires_grad])
    ckpt = save_checkpoint(tmp_path / "run", 1, built.model, opt, {})

    summary = run_eval(config, tmp_path / "run", out_dir=tmp_path / "eval")
    assert summary["n"] == 3 and 0.0 <= summary["accuracy"] <= 1.0
    items = [json.loads(x) for x in (tmp_path / "eval" / "predictions_textvqa.jsonl").open()]
    exact = [normalize_answer(i["prediction"]) == normalize_answer(i["answer"]) for i in items]
    assert summary["exact_match"] == sum(exact) / 3
    lines = (tmp_path / "eval" / "predictions_textvqa.jsonl").read_text().splitlines()
    items = [json.loads(line) for line in lines]
    assert [i["id"] for i in items] == ["100", "101", "102"]
    assert {"prediction", "answer", "score"} <= set(items[0])
    record = json.loads((tmp_path / "eval" / "eval_textvqa.json").read_text())
    assert record["checkpoint"] == str(ckpt) and record["metrics"]["n"] == 3
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "textvqa: textvqa_val.jsonl (3 questions)" in printed

    fresh = assemble(load_config(config), log=lambda _: None).model
    load_trainable(fresh, ckpt)
    first = next(p for p in fresh.parameters() if p.requires_grad)
    assert torch.all(first == 0.125)
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({"nope": torch.zeros(1)}, str(bad / "trainable.safetensors"))
    with pytest.raises(ValueError, match="checkpoint does not match the model"):
        load_trainable(fresh, bad)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_trainable(fresh, tmp_path / "eval")
    assert read_converted(converted)[0] == "textvqa"


def test_run_eval_reads_a_dataset_folder_with_data_format(paper, tmp_path):
    from commit_mllm.training.paper_eval import run_eval

    converted = tmp_path / "tv.jsonl"
    convert("textvqa", paper["root"] / "textvqa", converted, split="val")
    config = _tiny_config(tmp_path, converted)
    src = paper["root"] / "textvqa"
    over = ["data.format=textvqa", f"data.train_file={src}", "data.eval_file=null"]
    over += ["data.eval_split=val"]
    summary = run_eval(config, overrides=over, out_dir=tmp_path / "e", log=lambda _: None)
    assert summary["n"] == 3 and 0.0 <= summary["exact_match"] <= 1.0 and "accuracy" in summary
    assert json.loads((tmp_path / "e" / "eval_textvqa.json").read_text())["metric"] == "textvqa"


def test_read_converted_errors(tmp_path):
    from commit_mllm.data import DataFormatError
    from commit_mllm.training.paper_eval import read_converted

    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"id": 1, "conversations": []}) + "\n")
    with pytest.raises(DataFormatError, match=r"plain.jsonl line 1: no .meta.format."):
        read_converted(plain)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"meta": {"format": "sdd"}}\n{"meta": {"format": "macs"}}\n')
    with pytest.raises(DataFormatError, match="rows of several formats"):
        read_converted(mixed)
    with pytest.raises(FileNotFoundError):
        read_converted(tmp_path / "none.jsonl")


def test_cli_convert_eval_and_training_by_format_name(paper, tmp_path, capsys):
    from commit_mllm.cli import main
    from commit_mllm.training.config import load_config
    from commit_mllm.training.trainer import train

    out = tmp_path / "tv.jsonl"
    src = paper["root"] / "textvqa"
    assert main(["convert", "--format", "textvqa", str(src), str(out), "--split", "val"]) == 0
    assert len(out.read_text().splitlines()) == 3
    assert main(["convert", "--format", "textvqa", str(tmp_path / "nowhere"), str(out)]) == 2
    assert "error:" in capsys.readouterr().err
    tiny = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    run = tmp_path / "run"
    cfg = load_config(
        tiny,
        [
            f"run.output_dir={run}",
            "run.progress=false",
            "run.tensorboard=false",
            "data.task=null",
            "data.format=textvqa",
            f"data.train_file={src}",
            "data.train_split=val",
            "data.eval_split=val",
            "train.steps=2",
            "data.max_length=256",
            "train.batch_size=2",
            "train.save_every=0",
        ],
    )
    assert train(cfg, log=lambda _: None)["n"] == 3
    assert (
        main(
            [
                "eval",
                "--config",
                str(tiny),
                "--checkpoint",
                str(run),
                "--eval-file",
                str(out),
                "--output-dir",
                str(tmp_path / "ev"),
                "data.task=null",
                f"data.train_file={out}",
                "data.max_length=256",
                "run.progress=false",
            ]
        )
        == 0
    )
    assert (tmp_path / "ev" / "eval_textvqa.json").exists()
