"""A seeded visual question answering set of simple shapes, for measuring VLM token cuts on answers.

A scene is a ``size`` x ``size`` RGB canvas (dark background) cut into a 3 x 3 grid of cells; 1 to
:data:`MAX_OBJECTS` objects take distinct cells, each a shape of :data:`SHAPES` in a colour of
:data:`COLOURS`, ``big`` (about a quarter of the canvas side) or ``small`` (about a tenth: one or two
14-pixel patches), placed at a random offset inside its cell. Each object keeps its cell's name
(:data:`POSITIONS`) so that a question can name where it is.

Question kinds (:data:`KINDS`), every answer one word:

- ``where``: what colour / shape is the object in a named cell (the answer sits in one cell);
- ``count``: how many objects, or how many of one colour or shape (``zero`` .. ``six``);
- ``colour``: what colour is the object of a shape that occurs once;
- ``shape``: what shape is the object of a colour that occurs once;
- ``exists``: is there a COLOUR SHAPE (``yes`` / ``no``, half each; small objects count too);
- ``size``: is the COLOUR SHAPE big or small.

Kinds are balanced (question ``j`` of a split has kind ``KINDS[j % len(KINDS)]``) and answers are
drawn so that no single answer dominates a kind (:func:`majority_rates` measures it).

On disk (:func:`write_vqa`): ``images/{split}/NNNNN.png`` and one ``{split}.jsonl`` per split, a line
per question: ``{"image": "images/train/00000.png", "question": ..., "answer": ..., "kind": ...}``
(paths relative to the folder), which ``tokenbudget eval-vlm --data FILE.jsonl`` reads. Train and
test scenes come from different seeds, so the splits share no scene.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "white": (240, 240, 240),
}
POSITIONS = (
    "top left",
    "top middle",
    "top right",
    "middle left",
    "center",
    "middle right",
    "bottom left",
    "bottom middle",
    "bottom right",
)
KINDS = ("where", "count", "colour", "shape", "exists", "size")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
MAX_OBJECTS = 6
BACKGROUND = (28, 28, 32)
_GRID = 3
# Object sides as fractions of the cell side: big fills most of a cell, small covers one or two
# 14-px patches at 224 px, so that a question about it depends on a small region of the image.
_BIG = (0.6, 0.85)
_SMALL = (0.2, 0.3)
# Seeds of the test split are offset from the train split's, so the splits never share a scene.
_SPLIT_SEED = {"train": 0, "test": 1}


@dataclass(frozen=True)
class VQAObject:
    """One object: its shape, colour, ``big`` flag and cell index (into :data:`POSITIONS`)."""

    shape: str
    colour: str
    big: bool
    cell: int


@dataclass(frozen=True)
class VQAItem:
    """One question about one scene (``scene`` indexes the split's images)."""

    scene: int
    question: str
    answer: str
    kind: str


def _draw(objects: list[VQAObject], size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [size, size, 3]: the objects drawn on the background."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = size / _GRID
    for obj in objects:
        low, high = _BIG if obj.big else _SMALL
        side = max(4, round(cell * rng.uniform(low, high)))
        row, col = divmod(obj.cell, _GRID)
        top = round(row * cell + rng.uniform(0, cell - side))
        left = round(col * cell + rng.uniform(0, cell - side))
        box = (left, top, left + side - 1, top + side - 1)
        colour = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif obj.shape == "square":
            draw.rectangle(box, fill=colour)
        elif obj.shape == "triangle":
            draw.polygon(
                [(left + side / 2, top), (left, top + side - 1), (left + side - 1, top + side - 1)],
                fill=colour,
            )
        else:  # cross: two bars of a third of the side
            bar = max(2, side // 3)
            mid = (side - bar) // 2
            draw.rectangle((left + mid, top, left + mid + bar - 1, top + side - 1), fill=colour)
            draw.rectangle((left, top + mid, left + side - 1, top + mid + bar - 1), fill=colour)
    return np.asarray(image, dtype=np.uint8)


def _scene(rng: np.random.Generator) -> list[VQAObject]:
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = rng.choice(_GRID * _GRID, size=count, replace=False)
    colours = list(COLOURS)
    return [
        VQAObject(
            shape=SHAPES[int(rng.integers(len(SHAPES)))],
            colour=colours[int(rng.integers(len(colours)))],
            big=bool(rng.integers(2)),
            cell=int(c),
        )
        for c in cells
    ]


def _unique(objects: list[VQAObject], key: Callable[[VQAObject], object]) -> list[VQAObject]:
    counts = Counter(key(o) for o in objects)
    return [o for o in objects if counts[key(o)] == 1]


def _question(kind: str, objects: list[VQAObject], rng: np.random.Generator) -> tuple[str, str] | None:
    """A (question, answer) of ``kind`` about ``objects``, or None when the scene cannot pose one."""
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731 - one seeded choice
    if kind == "where":
        obj = pick(objects)
        if rng.integers(2):
            return f"what colour is the object in the {POSITIONS[obj.cell]}?", obj.colour
        return f"what shape is the object in the {POSITIONS[obj.cell]}?", obj.shape
    if kind == "count":
        mode = int(rng.integers(3))
        if mode == 0:
            return "how many objects are there?", NUMBERS[len(objects)]
        # Draw the count first (uniform over the counts this scene offers, zero included), then a value
        # with that count: drawing the value first makes "one" the answer of most questions.
        values, attr, noun = (
            (list(COLOURS), "colour", "{} objects") if mode == 1 else (list(SHAPES), "shape", "{}s")
        )
        by_count: dict[int, list[str]] = {}
        for value in values:
            by_count.setdefault(sum(getattr(o, attr) == value for o in objects), []).append(value)
        number = pick(sorted(by_count))
        value = pick(by_count[number])
        return f"how many {noun.format(value)} are there?", NUMBERS[number]
    if kind == "colour":
        candidates = _unique(objects, lambda o: o.shape)
        return (f"what colour is the {(o := pick(candidates)).shape}?", o.colour) if candidates else None
    if kind == "shape":
        candidates = _unique(objects, lambda o: o.colour)
        return (
            (f"what shape is the {(o := pick(candidates)).colour} object?", o.shape) if candidates else None
        )
    if kind == "exists":
        present = {(o.colour, o.shape) for o in objects}
        if rng.integers(2):
            colour, shape = pick(sorted(present))
            return f"is there a {colour} {shape}?", "yes"
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        colour, shape = pick(absent)
        return f"is there a {colour} {shape}?", "no"
    if kind == "size":
        candidates = _unique(objects, lambda o: (o.colour, o.shape))
        if not candidates:
            return None
        obj = pick(candidates)
        return f"is the {obj.colour} {obj.shape} big or small?", "big" if obj.big else "small"
    raise ValueError(f"unknown question kind {kind!r}; choose from {', '.join(KINDS)}")


def generate_vqa(
    num_scenes: int,
    questions_per_scene: int = 3,
    *,
    split: str = "train",
    size: int = 224,
    seed: int = 0,
) -> tuple[np.ndarray, list[VQAItem]]:
    """``num_scenes`` scenes (uint8 [S, size, size, 3]) and ``questions_per_scene`` questions each.

    Seeded and sequential: the same arguments give the same scenes and questions, and any
    ``questions_per_scene >= len(KINDS)`` gives the same scenes. Question ``j`` has
    kind ``KINDS[j % len(KINDS)]``; when a scene cannot pose that kind (e.g. no shape occurs once),
    it is redrawn until one can, so every kind keeps its share.
    """
    if split not in _SPLIT_SEED:
        raise ValueError(f"split must be one of {sorted(_SPLIT_SEED)}, got {split!r}")
    for name, value, low in (("num_scenes", num_scenes, 1), ("questions_per_scene", questions_per_scene, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 8 * _GRID:
        raise ValueError(f"size must be an int >= {8 * _GRID} (a 3 x 3 grid of cells), got {size!r}")
    rng = np.random.default_rng([seed, _SPLIT_SEED[split]])
    images = np.zeros((num_scenes, size, size, 3), np.uint8)
    items: list[VQAItem] = []
    first = min(questions_per_scene, len(KINDS))
    for s in range(num_scenes):
        kinds = [KINDS[(s * questions_per_scene + q) % len(KINDS)] for q in range(questions_per_scene)]
        while True:  # redraw the scene until it can pose every kind it must
            objects = _scene(rng)
            posed = [_question(kind, objects, rng) for kind in kinds[:first]]
            if all(p is not None for p in posed):
                break
        images[s] = _draw(objects, size, rng)
        # Questions past one of each kind come from the scene's own generator, so asking more of them
        # keeps the scenes (and any features cached from them) the same; they avoid repeating a
        # question already asked about the scene where a few redraws allow.
        extra = np.random.default_rng([seed, _SPLIT_SEED[split], s])
        for kind in kinds[first:]:
            for _ in range(10):
                question = _question(kind, objects, extra)
                if question[0] not in {q for q, _ in posed}:
                    break
            posed.append(question)
        items.extend(VQAItem(s, q, a, k) for (q, a), k in zip(posed, kinds, strict=True))
    return images, items


def majority_rates(items: Iterable[VQAItem | dict]) -> dict[str, tuple[str, float]]:
    """Per kind: its most frequent answer and that answer's share (the accuracy of always saying it)."""
    by_kind: dict[str, Counter] = {}
    for item in items:
        kind, answer = (item["kind"], item["answer"]) if isinstance(item, dict) else (item.kind, item.answer)
        by_kind.setdefault(kind, Counter())[answer] += 1
    out = {}
    for kind in sorted(by_kind):
        answer, n = by_kind[kind].most_common(1)[0]
        out[kind] = (answer, n / sum(by_kind[kind].values()))
    return out


def vocabulary() -> list[str]:
    """Every word a question or answer of this generator can use (lower case, punctuation apart)."""
    words = {"what", "colour", "shape", "is", "the", "object", "in", "how", "many", "objects", "are", "there"}
    words |= {"a", "big", "or", "small", "?", "yes", "no"}
    words |= set(COLOURS) | set(SHAPES) | {f"{s}s" for s in SHAPES} | set(NUMBERS)
    words |= {w for p in POSITIONS for w in p.split()}
    return sorted(words)


def write_vqa(
    out: str | os.PathLike[str],
    n_train: int,
    n_test: int,
    *,
    questions_per_scene: int = 18,
    test_questions_per_scene: int = 3,
    size: int = 224,
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``n_train`` / ``n_test`` questions (scenes of ``questions_per_scene`` /
    ``test_questions_per_scene`` questions each, the last scene possibly with fewer; six per train scene
    lets training share one image among many questions, fewer per test scene spreads the test over more
    scenes) as PNG images plus ``train.jsonl`` / ``test.jsonl`` under ``out``.

    Returns ``{"train": path, "test": path}`` of the JSONL files.
    """
    from PIL import Image

    root = Path(out).expanduser()
    paths = {}
    for split, n, per in (
        ("train", n_train, questions_per_scene),
        ("test", n_test, test_questions_per_scene),
    ):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n_{split} must be an int >= 1 (questions), got {n!r}")
        if isinstance(per, bool) or not isinstance(per, int) or per < 1:
            raise ValueError(f"questions per {split} scene must be an int >= 1, got {per!r}")
        scenes = -(-n // per)
        images, items = generate_vqa(scenes, per, split=split, size=size, seed=seed)
        folder = root / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        for s, image in enumerate(images):
            Image.fromarray(image).save(folder / f"{s:05d}.png")
        path = root / f"{split}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        with tmp.open("w") as f:
            for item in items[:n]:
                record = {
                    "image": f"images/{split}/{item.scene:05d}.png",
                    "question": item.question,
                    "answer": item.answer,
                    "kind": item.kind,
                }
                f.write(json.dumps(record) + "\n")
        os.replace(tmp, path)
        paths[split] = path
    return paths


def read_vqa(path: str | os.PathLike[str]) -> list[dict]:
    """The records of a VQA JSONL file, each with ``image`` made absolute (relative to the file's folder)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no VQA file at {path}; write one with `tokenbudget make-vqa --out DIR`")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        missing = {"image", "question", "answer", "kind"} - set(record)
        if missing:
            raise ValueError(
                f"{path}:{number}: missing keys {sorted(missing)} (need image, question, answer, kind)"
            )
        record["image"] = str(path.parent / record["image"])
        records.append(record)
    return records


__all__ = [
    "COLOURS",
    "KINDS",
    "MAX_OBJECTS",
    "NUMBERS",
    "POSITIONS",
    "SHAPES",
    "VQAItem",
    "VQAObject",
    "generate_vqa",
    "majority_rates",
    "read_vqa",
    "vocabulary",
    "write_vqa",
]
