"""Answers of a vision-language model under visual-token cuts: the protocol behind ``tokenbudget eval-vlm``.

Every method runs on the same questions, batches and prompts as the unpatched model (``full``),
interleaved batch by batch: each batch runs unpatched first, then under each method's config
(``tb.apply`` before, ``tb.remove`` after), so that the time ratios compare runs made seconds apart.

* answers: greedy generation; the answer is the text of the new tokens up to the first
  end-of-sequence token or newline, scored by exact match after :func:`normalise_answer`;
* accuracy with its binomial standard error, overall and per question kind, and relative to full;
* visual tokens reaching the LLM per image: the image tokens of the prompt for full, the patch's own
  count (``tb.last_state(model).visual_tokens``) for a method;
* prefill time (one forward over the prompt batch) and generate time, each as the median over
  batches of the ratio to full on the same batch;
* KV-cache bytes per question at the end of generation (sum of keys and values over layers).

Data: :func:`load_vqa` reads JSONL question lines or LLaVA's conversation JSON.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import string
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import patch
from ..models import vlm as hf_vlm

__all__ = [
    "AnswerRow",
    "VQAItem",
    "evaluate_vlm",
    "first_line",
    "load_vqa",
    "normalise_answer",
    "prompts_for",
]

Budget = int | float


# -- data -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VQAItem:
    """One question about one image: the image file, the question text, the reference answer, an
    optional kind (for per-kind accuracy) and where it came from (``FILE:LINE``, for messages)."""

    image: Path
    question: str
    answer: str
    kind: str | None = None
    source: str = ""


_PLACEHOLDER = re.compile(r"\s*<image>\s*")


def load_vqa(path: str | Path) -> list[VQAItem]:
    """The questions of a JSONL or JSON file, with image paths resolved and checked.

    Accepted records (JSONL: one per line; ``.json``: a list of them):

    * ``{"image": ..., "question": ..., "answer": ..., "kind": optional}``;
    * LLaVA's conversations: ``{"image": ..., "conversations": [{"from": "human", "value":
      "<image>\\nQ"}, {"from": "gpt", "value": "A"}, ...]}``: each human/gpt pair is one question, its
      ``<image>`` placeholder stripped.

    Image paths are relative to the file's folder (absolute ones are kept). ``FileNotFoundError`` for
    a missing file or image, ``ValueError`` naming the line of a malformed record or an empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no question file at {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        located = [(f"{path} record {i + 1}", r) for i, r in enumerate(records)]
    else:
        located = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                located.append((f"{path} line {number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path} line {number}: not a JSON object ({err.msg}); each line holds one "
                    '{"image": ..., "question": ..., "answer": ...}'
                ) from None
    items = [item for where, record in located for item in _items(record, where, path.parent)]
    if not items:
        raise ValueError(
            f"{path} holds no questions; write one JSON object per line: "
            '{"image": "img/0.png", "question": "...", "answer": "..."}'
        )
    return items


def _items(record: Any, where: str, root: Path) -> list[VQAItem]:
    if not isinstance(record, dict):
        raise ValueError(
            f"{where}: expected a JSON object with image, question and answer, got {record!r:.80}"
        )
    if "image" not in record or not isinstance(record["image"], str):
        raise ValueError(f"{where}: needs an 'image' path (relative to the file's folder)")
    image = root / record["image"]
    if not image.is_file():
        raise FileNotFoundError(f"{where}: image {image} does not exist")
    kind = None if record.get("kind") is None else str(record["kind"])
    if "conversations" in record:
        return [
            VQAItem(image, question, answer, kind, where)
            for question, answer in _conversation_pairs(record["conversations"], where)
        ]
    missing = [key for key in ("question", "answer") if key not in record]
    if missing:
        raise ValueError(
            f"{where}: missing {' and '.join(repr(m) for m in missing)}; a line holds image, question and "
            "answer (and optionally kind), or LLaVA's conversations"
        )
    return [VQAItem(image, _strip_placeholder(str(record["question"])), str(record["answer"]), kind, where)]


def _conversation_pairs(turns: Any, where: str) -> list[tuple[str, str]]:
    if not isinstance(turns, list) or not all(isinstance(t, dict) and "value" in t for t in turns):
        raise ValueError(f"{where}: 'conversations' must be a list of {{'from': ..., 'value': ...}} turns")
    pairs = []
    question = None
    for turn in turns:
        speaker = turn.get("from")
        if speaker == "human":
            question = _strip_placeholder(str(turn["value"]))
        elif speaker == "gpt":
            if question is None:
                raise ValueError(f"{where}: a 'gpt' turn without the 'human' turn that asks it")
            pairs.append((question, str(turn["value"])))
            question = None
        else:
            raise ValueError(f"{where}: a turn is 'from' 'human' or 'gpt', got {speaker!r}")
    if not pairs:
        raise ValueError(f"{where}: the conversation has no human/gpt pair")
    return pairs


def _strip_placeholder(question: str) -> str:
    return _PLACEHOLDER.sub(" ", question).strip()


# -- answers ----------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise_answer(text: str) -> str:
    """Lower case, punctuation removed, the articles a/an/the dropped, white space collapsed:
    ``"The Red  cube."`` -> ``"red cube"``."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def first_line(text: str) -> str:
    """The generated text up to its first newline (leading white space skipped): the answer."""
    return text.strip().split("\n", 1)[0]


def prompts_for(processor: Any, questions: Sequence[str], template: str | None = None) -> list[str]:
    """The prompt of each question: ``template`` with ``{question}`` filled in, or (``None``) the
    processor's chat template for a user turn of one image and the question.

    A template must hold ``{question}`` and the processor's image token exactly once (one image per
    question); ``ValueError`` otherwise, naming the token.
    """
    if template is None:
        return [hf_vlm.chat_prompt(processor, q) for q in questions]
    token = hf_vlm.image_token(processor)
    if "{question}" not in template:
        raise ValueError(f"the prompt template {template!r} has no {{question}}; e.g. '{token} {{question}}'")
    if template.count(token) != 1:
        raise ValueError(
            f"the prompt template {template!r} must hold the processor's image token {token!r} once (one "
            f"image per question), e.g. '{token} question: {{question}} answer:'"
        )
    return [template.replace("{question}", q) for q in questions]


# -- rows -------------------------------------------------------------------------------------------


@dataclass
class AnswerRow:
    """One method at one budget, measured against the unpatched model on the same questions.

    ``tokens`` is the budget as given (a count or a fraction; 1.0 for full); ``per_kind`` maps each
    question kind to its ``n``, ``accuracy``, ``se`` and ``relative``; ``visual_tokens`` is the mean
    per image reaching the LLM (``kv_visual_tokens``: the mean held by the KV cache of the layers after
    an in-LLM cut, where the method reports it); ``prefill_ratio`` / ``generate_ratio`` are medians over
    batches of the time against full on the same batch (``None`` without timing); ``kv_bytes`` is the
    mean KV-cache size per question at the end of generation, ``kv_ratio`` its ratio to full.
    """

    method: str
    tokens: Budget
    n: int
    accuracy: float
    se: float
    relative: float | None
    per_kind: dict[str, dict[str, Any]]
    visual_tokens: float
    kv_visual_tokens: float | None
    prefill_ratio: float | None
    generate_ratio: float | None
    kv_bytes: float
    kv_ratio: float
    seconds_per_question: float
    config: dict[str, Any] | None = None
    #: why the method could not run on this model (its other fields are then ``None`` / empty)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Tally:
    """What one method gathered over the batches (per question or per batch)."""

    correct: list[bool] = field(default_factory=list)
    visual: list[float] = field(default_factory=list)
    kv_visual: list[float] = field(default_factory=list)
    kv_bytes: list[float] = field(default_factory=list)
    prefill_s: list[float] = field(default_factory=list)
    generate_s: list[float] = field(default_factory=list)


def _accuracy(correct: Sequence[bool]) -> tuple[float, float]:
    """Accuracy and its binomial standard error sqrt(p (1 - p) / n)."""
    p = sum(correct) / len(correct)
    return p, math.sqrt(p * (1 - p) / len(correct))


def _relative(value: float, full: float) -> float | None:
    return value / full if full > 0 else None


def _median_ratio(values: Sequence[float], full: Sequence[float]) -> float | None:
    if not values:
        return None
    return statistics.median(v / f for v, f in zip(values, full, strict=True))


def _failed_row(method: str, tokens: Budget, config: Any, error: str) -> AnswerRow:
    """The row of a method that this model refused (e.g. a tower reducer on a tiled tower)."""
    none: Any = None
    return AnswerRow(
        method=method, tokens=tokens, n=0, accuracy=none, se=none, relative=None, per_kind={},
        visual_tokens=none, kv_visual_tokens=None, prefill_ratio=None, generate_ratio=None,
        kv_bytes=none, kv_ratio=none, seconds_per_question=none,
        config=config.to_dict() if hasattr(config, "to_dict") else None, error=error,
    )  # fmt: skip


def _row(method: str, tokens: Budget, config: Any, tally: _Tally, full: _Tally, kinds: list) -> AnswerRow:
    accuracy, se = _accuracy(tally.correct)
    per_kind = {}
    for kind in dict.fromkeys(k for k in kinds if k is not None):
        mine = [c for c, k in zip(tally.correct, kinds, strict=True) if k == kind]
        base = [c for c, k in zip(full.correct, kinds, strict=True) if k == kind]
        acc, err = _accuracy(mine)
        per_kind[kind] = {
            "n": len(mine),
            "accuracy": acc,
            "se": err,
            "relative": _relative(acc, _accuracy(base)[0]),
        }
    kv_bytes = statistics.fmean(tally.kv_bytes)
    return AnswerRow(
        method=method,
        tokens=tokens,
        n=len(tally.correct),
        accuracy=accuracy,
        se=se,
        relative=_relative(accuracy, _accuracy(full.correct)[0]),
        per_kind=per_kind,
        visual_tokens=statistics.fmean(tally.visual),
        kv_visual_tokens=statistics.fmean(tally.kv_visual) if tally.kv_visual else None,
        prefill_ratio=_median_ratio(tally.prefill_s, full.prefill_s),
        generate_ratio=_median_ratio(tally.generate_s, full.generate_s),
        kv_bytes=kv_bytes,
        kv_ratio=kv_bytes / statistics.fmean(full.kv_bytes),
        seconds_per_question=sum(tally.generate_s) / len(tally.correct),
        config=config.to_dict() if hasattr(config, "to_dict") else None,
    )


# -- the protocol -----------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, run: Callable[[], Any]) -> tuple[Any, float]:
    _sync(device)
    start = time.perf_counter()
    result = run()
    _sync(device)
    return result, time.perf_counter() - start


def _load_image(path: Path) -> Any:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as err:
        raise ValueError(f"cannot read image {path}: {err}") from None


class _Batch:
    """One batch of questions, preprocessed once and reused by every method."""

    def __init__(
        self, items: Sequence[VQAItem], prompts: Sequence[str], processor: Any, device: torch.device
    ):
        images = [_load_image(item.image) for item in items]
        self.inputs = processor(images=images, text=list(prompts), padding=True, return_tensors="pt").to(
            device
        )
        self.answers = [normalise_answer(item.answer) for item in items]
        self.visual = (self.inputs["input_ids"] == hf_vlm.image_token_id(processor)).sum(1).tolist()


def _run(model: nn.Module, batch: _Batch, tally: _Tally, *, settings: dict, patched: bool) -> None:
    """Prefill (timed), generate (timed), score, count visual tokens and KV bytes of one batch."""
    device, timing = settings["device"], settings["timing"]
    inputs = batch.inputs
    if timing:
        tally.prefill_s.append(_timed(device, lambda: hf_vlm.prefill(model, inputs))[1])
    out, seconds = _timed(
        device,
        lambda: model.generate(
            **inputs,
            do_sample=False,
            num_beams=1,
            max_new_tokens=settings["max_new_tokens"],
            return_dict_in_generate=True,
            pad_token_id=settings["pad"],
        ),
    )
    tally.generate_s.append(seconds)
    prompt = inputs["input_ids"]
    if not torch.equal(out.sequences[:, : prompt.shape[1]].to(prompt.device), prompt):
        raise RuntimeError(
            "generate's output does not start with the prompt batch, so its new tokens cannot be told "
            "apart; the patch must keep the caller's input_ids at the front of the output"
        )
    for ids, answer in zip(out.sequences[:, prompt.shape[1] :].tolist(), batch.answers, strict=True):
        ends = [i for i, t in enumerate(ids) if t in settings["eos"]]
        text = settings["decode"](ids[: ends[0]] if ends else ids, skip_special_tokens=True)
        tally.correct.append(normalise_answer(first_line(text)) == answer)
    per_question = hf_vlm.kv_cache_bytes(out.past_key_values) / len(batch.answers)
    tally.kv_bytes.extend([per_question] * len(batch.answers))
    if not patched:
        tally.visual.extend(batch.visual)
        return
    state = patch.last_state(model)
    visual = list(state.visual_tokens)
    if len(visual) != len(batch.answers):
        raise RuntimeError(
            f"the patch reported {len(visual)} images' visual tokens for a batch of {len(batch.answers)}"
        )
    tally.visual.extend(visual)
    kv_visual = getattr(state, "kv_visual_tokens", None)
    if kv_visual is not None:
        tally.kv_visual.extend(kv_visual)


def evaluate_vlm(
    model: nn.Module,
    processor: Any,
    items: Sequence[VQAItem],
    methods: Sequence[tuple[str, Budget, Any]],
    *,
    prompt: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 10,
    timing: bool = True,
    progress: Callable[[int], None] | None = None,
) -> list[AnswerRow]:
    """Answer ``items`` unpatched and under each method; one row per method (full first).

    Args:
        model, processor: a transformers VLM and its processor (e.g. from
            :func:`tokenbudget.models.vlm.load_vlm`; its tokenizer must pad on the left).
        items: the questions (:func:`load_vqa`).
        methods: ``(name, budget as given, config)`` per row after full; each config is applied with
            ``tb.apply`` for one batch and removed with ``tb.remove`` right after.
        prompt: a template with ``{question}`` and the image token, or ``None`` for the processor's
            chat template (:func:`prompts_for`).
        batch_size: questions per generate call (left padded).
        max_new_tokens: the longest answer generated (greedy).
        timing: also time one prefill forward per batch and method (an extra forward each).
        progress: called with 1 after each batch of each method.

    Returns:
        ``[full, *one row per method]``.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
    if not items:
        raise ValueError("no questions to answer")
    if getattr(processor.tokenizer, "padding_side", "left") != "left":
        raise ValueError(
            "generation in batches needs left padding: set processor.tokenizer.padding_side = 'left'"
        )
    prompts = prompts_for(processor, [item.question for item in items], prompt)
    device = next(model.parameters()).device
    settings = {
        "device": device,
        "timing": timing,
        "max_new_tokens": max_new_tokens,
        "pad": hf_vlm.pad_token_id(processor),
        "eos": hf_vlm.eos_token_ids(model, processor),
        "decode": processor.tokenizer.decode,
    }
    full = _Tally()
    tallies = [_Tally() for _ in methods]
    # A method this model cannot take (refused at apply or on its first batch) gets a row that says
    # why, and the others still run: one unsupported name never costs the whole comparison.
    failed: dict[int, str] = {}
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            batch = _Batch(
                items[start : start + batch_size], prompts[start : start + batch_size], processor, device
            )
            if start == 0 and timing:  # the first forward pays one-time costs: keep them out of the times
                hf_vlm.prefill(model, batch.inputs)
            _run(model, batch, full, settings=settings, patched=False)
            if progress:
                progress(1)
            for index, ((name, _, config), tally) in enumerate(zip(methods, tallies, strict=True)):
                if index in failed:
                    continue
                try:
                    patch.apply(model, config)
                    _run(model, batch, tally, settings=settings, patched=True)
                except (ValueError, NotImplementedError) as err:
                    if start:  # it ran on earlier batches: a failure now is a real error
                        raise
                    failed[index] = f"{type(err).__name__}: {err}"
                    warnings.warn(f"eval-vlm: {name} cannot run on this model: {err}", stacklevel=2)
                finally:
                    patch.remove(model)
                if progress:
                    progress(1)
    kinds = [item.kind for item in items]
    rows = [_row("full", 1.0, None, full, full, kinds)]
    rows += [
        _failed_row(name, tokens, config, failed[i])
        if i in failed
        else _row(name, tokens, config, t, full, kinds)
        for i, ((name, tokens, config), t) in enumerate(zip(methods, tallies, strict=True))
    ]
    return rows
