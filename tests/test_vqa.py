"""The shapes VQA generator (tokenbudget.data.vqa): seeded, kind-balanced, answers that match the
pixels, no dominant answer, the JSONL format ``eval-vlm --data`` reads, and ``make-vqa``."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tokenbudget.data.vqa import COLOURS, KINDS, POSITIONS, generate_vqa, majority_rates, read_vqa, write_vqa


def test_seeded_and_kind_balanced() -> None:
    images, items = generate_vqa(60, 6, seed=3)
    again_images, again = generate_vqa(60, 6, seed=3)
    other_images, _ = generate_vqa(60, 6, seed=4)
    assert np.array_equal(images, again_images) and items == again
    assert not np.array_equal(images, other_images)
    assert Counter(item.kind for item in items) == {kind: 60 for kind in KINDS}
    assert images.shape == (60, 224, 224, 3) and images.dtype == np.uint8


def test_more_questions_keep_the_scenes() -> None:
    """Questions past one per kind come from each scene's own generator: the scenes stay the same."""
    images, items = generate_vqa(20, 6)
    more_images, more = generate_vqa(20, 18)
    assert np.array_equal(images, more_images)
    assert [i.question for i in more if i.scene == 0][:6] == [i.question for i in items if i.scene == 0]
    assert Counter(item.kind for item in more) == {kind: 60 for kind in KINDS}


def test_no_answer_dominates_a_kind() -> None:
    """The accuracy of always giving a kind's most frequent answer stays low. Binary kinds (exists, size)
    are drawn half and half: 0.6 is 3.5 standard errors above 0.5 at 300 questions. The rest have 4 to
    10 answers; count is the least even (``one`` and ``zero`` about a third each, measured), so 0.45."""
    _, items = generate_vqa(300, 6, seed=0)
    rates = majority_rates(items)
    assert set(rates) == set(KINDS)
    for kind, (answer, rate) in rates.items():
        bound = 0.6 if kind in ("exists", "size") else 0.45
        assert rate < bound, f"{kind}: {answer!r} answers {rate:.2f} of the questions"
    assert {a for a, _ in rates.values()} - {"yes", "no", "big", "small"}  # not only binary answers


def test_where_answers_match_the_pixels() -> None:
    """A 'what colour is the object in the CELL' answer is a colour drawn inside that cell."""
    images, items = generate_vqa(40, 6, seed=1)
    checked = 0
    for item in items:
        if item.kind != "where" or not item.question.startswith("what colour"):
            continue
        cell = POSITIONS.index(item.question.split(" in the ")[1].rstrip("?"))
        row, col = divmod(cell, 3)
        side = images.shape[1] / 3
        block = images[
            item.scene,
            round(row * side) : round((row + 1) * side),
            round(col * side) : round((col + 1) * side),
        ]
        present = {name for name, rgb in COLOURS.items() if (block == np.array(rgb)).all(-1).any()}
        assert item.answer in present, (item, present)
        checked += 1
    assert checked >= 10


def test_test_split_shares_no_scene_with_train() -> None:
    train, _ = generate_vqa(30, 3, split="train")
    test, _ = generate_vqa(30, 3, split="test")
    train_hashes = {image.tobytes() for image in train}
    assert not any(image.tobytes() in train_hashes for image in test)


def test_jsonl_format(tmp_path: Path) -> None:
    paths = write_vqa(tmp_path, 20, 7, questions_per_scene=6, test_questions_per_scene=3, size=56)
    lines = paths["train"].read_text().splitlines()
    assert len(lines) == 20 and len(paths["test"].read_text().splitlines()) == 7
    for line in lines:
        record = json.loads(line)
        assert set(record) == {"image", "question", "answer", "kind"}
        assert not Path(record["image"]).is_absolute() and (tmp_path / record["image"]).is_file()
        assert record["kind"] in KINDS and len(record["answer"].split()) == 1
    records = read_vqa(paths["test"])
    assert all(Path(r["image"]).is_absolute() and Path(r["image"]).is_file() for r in records)
    from PIL import Image

    assert Image.open(records[0]["image"]).size == (56, 56)


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split"):
        generate_vqa(3, split="val")
    with pytest.raises(ValueError, match="num_scenes"):
        generate_vqa(0)
    with pytest.raises(ValueError, match="n_train"):
        write_vqa(tmp_path, 0, 3)
    with pytest.raises(FileNotFoundError, match="make-vqa"):
        read_vqa(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "question": "q?"}\n')
    with pytest.raises(ValueError, match="answer"):
        read_vqa(tmp_path / "bad.jsonl")


def test_make_vqa_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tokenbudget.cli import main

    assert main(["make-vqa", "--out", str(tmp_path), "--n-train", "18", "--n-test", "6", "--size", "56"]) == 0
    assert len(read_vqa(tmp_path / "train.jsonl")) == 18 and len(read_vqa(tmp_path / "test.jsonl")) == 6
    assert "majority answer per kind" in capsys.readouterr().out
