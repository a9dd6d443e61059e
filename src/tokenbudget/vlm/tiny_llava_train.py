"""Train the small LLaVA of :mod:`.tiny_llava` on the shapes VQA set, and score it per question kind.

The tower is frozen, so its features at ``config.vision_feature_layer`` are computed once per image
(:func:`tower_features`, cached on disk) and training runs the projector and the Llama only, with
teacher forcing on the answer tokens (the answer word and ``</s>``), AdamW and a cosine schedule
after a short warm-up. Scoring (:func:`answer_questions`) goes through the full model and
``generate`` with greedy decoding, as any user of the saved folder would.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..models.dinov2 import default_cache_dir
from .tiny_llava import IMAGE_TOKEN, prompt


def _images(paths: Sequence[str]) -> list:
    from PIL import Image

    out = []
    for path in paths:
        with Image.open(path) as image:
            out.append(image.convert("RGB"))
    return out


def features_cache_file(model: Any, processor: Any, paths: Sequence[str]) -> Path:
    """Where :func:`tower_features` caches the features of ``paths``: keyed by the image files' bytes
    (rewriting the same images keeps the cache), the tower's weights' names and shapes, the layer,
    the selection strategy and the image processor's settings."""
    config = model.config
    key = hashlib.sha256()
    for path in paths:
        key.update(hashlib.sha256(Path(path).read_bytes()).digest())
    for name, tensor in model.model.vision_tower.state_dict().items():
        key.update(f"{name}:{tuple(tensor.shape)};".encode())
    key.update(f"{config.vision_feature_layer}:{config.vision_feature_select_strategy}:".encode())
    key.update(processor.image_processor.to_json_string().encode())
    return default_cache_dir() / "tokens" / f"tiny-llava-features-{key.hexdigest()[:16]}.pt"


@torch.no_grad()
def tower_features(
    model: Any,
    processor: Any,
    paths: Sequence[str],
    *,
    batch_size: int = 16,
    cache: bool = True,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """float16 [N, T, D]: the frozen tower's hidden states at ``model.config.vision_feature_layer`` for
    the images at ``paths`` (class token dropped under the "default" strategy), i.e. the projector's
    input. Cached under ``<cache>/tokens/`` (:func:`features_cache_file`).
    """
    config = model.config
    layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy
    if not isinstance(layer, int):
        raise ValueError(f"one vision_feature_layer is supported for caching, got {layer!r}")
    file = features_cache_file(model, processor, paths)
    if cache and file.is_file():
        return torch.load(file)
    tower = model.model.vision_tower
    chunks = []
    for start in range(0, len(paths), batch_size):
        batch = paths[start : start + batch_size]
        pixels = processor.image_processor(_images(batch), return_tensors="pt")["pixel_values"]
        hidden = tower(pixels.to(tower.dtype), output_hidden_states=True).hidden_states[layer]
        chunks.append((hidden[:, 1:] if strategy == "default" else hidden).to(torch.float16))
        if progress is not None:
            progress(len(batch))
    features = torch.cat(chunks)
    if cache:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".{os.getpid()}.tmp")
        torch.save(features, tmp)
        os.replace(tmp, file)
    return features


@dataclass
class TrainReport:
    """What a training run did: steps, seconds, and the loss of every step."""

    steps: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return {
            "steps": self.steps,
            "seconds": round(self.seconds, 1),
            "loss_first": round(self.losses[0], 4) if self.losses else float("nan"),
            "loss_last_mean": round(sum(tail) / len(tail), 4) if tail else float("nan"),
        }


def _encode(processor: Any, question: str, answer: str, image_tokens: int) -> tuple[list[int], int]:
    """Token ids of the expanded prompt + answer + ``</s>``, and where the answer starts."""
    tokenizer = processor.tokenizer
    text = prompt(processor, question).replace(IMAGE_TOKEN, IMAGE_TOKEN * image_tokens)
    ids = tokenizer(text)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if tokenizer.unk_token_id in ids or tokenizer.unk_token_id in answer_ids:
        raise ValueError(f"words outside the tokenizer's vocabulary in {question!r} -> {answer!r}")
    return ids + answer_ids + [tokenizer.eos_token_id], len(ids)


def pack_scene(
    encoded: Sequence[tuple[list[int], int]], image_token_id: int
) -> tuple[list[int], list[int], list[int], list[bool]]:
    """One training row for several questions about one image: the shared prompt prefix (up to the
    last image token) once, then each question's own tokens as a segment.

    ``encoded`` holds :func:`_encode`'s (ids, answer start) per question. Returns (ids, positions,
    segment of each token: 0 for the prefix, 1.. per question, and whether each token is an answer
    target). Positions restart after the prefix in every segment, so that with the mask of
    :func:`segment_mask` each question sees exactly what it would see alone (one image, no other
    question), at the positions it would have alone.
    """
    first = encoded[0][0]
    prefix = max(i for i, t in enumerate(first) if t == image_token_id) + 1
    ids, positions, segments = list(first[:prefix]), list(range(prefix)), [0] * prefix
    targets = [False] * prefix
    for number, (row, start) in enumerate(encoded, 1):
        if row[:prefix] != first[:prefix]:
            raise ValueError("questions packed into one row must share the prompt before their text")
        ids += row[prefix:]
        positions += list(range(prefix, len(row)))
        segments += [number] * (len(row) - prefix)
        targets += [i >= start for i in range(prefix, len(row))]
    return ids, positions, segments, targets


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, L, L] attention mask of packed rows (``segments`` [B, L]: 0 prefix, 1.. a question,
    -1 padding): causal, and a question's tokens see the prefix and their own question only. Padding
    rows see the first token, so that no softmax row is empty."""
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same = segments[:, :, None] == segments[:, None, :]
    prefix = (segments == 0)[:, None, :]
    allowed = causal & (same | prefix) & (segments >= 0)[:, None, :]
    allowed[:, :, 0] |= segments < 0
    return allowed[:, None]


def answer_loss(
    model: Any,
    features: torch.Tensor,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    segments: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    """Mean cross-entropy of the target tokens (``targets`` bool [B, L]: each is predicted from the
    token before it) given the cached tower ``features`` [B, T, D] and packed rows (``input_ids``,
    ``position_ids``, ``segments`` [B, L] from :func:`pack_scene`).

    Composes the model's own parts as its forward does: projector -> image-token rows of the input
    embeddings -> language model -> output head (only where a target is predicted).
    """
    image_embeds = model.model.multi_modal_projector(features)
    embeds = model.get_input_embeddings()(input_ids)
    slots = (input_ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(slots, image_embeds.to(embeds.dtype))
    hidden = model.model.language_model(
        inputs_embeds=embeds, attention_mask=segment_mask(segments), position_ids=position_ids
    ).last_hidden_state
    predict = targets[:, 1:]
    logits = model.lm_head(hidden[:, :-1][predict])
    return F.cross_entropy(logits.float(), input_ids[:, 1:][predict])


def _batch(
    rows: Sequence[tuple[list[int], list[int], list[int], list[bool]]], pad: int
) -> tuple[torch.Tensor, ...]:
    length = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    positions = torch.zeros((len(rows), length), dtype=torch.long)
    segments = torch.full((len(rows), length), -1, dtype=torch.long)
    targets = torch.zeros((len(rows), length), dtype=torch.bool)
    for b, (i, p, s, t) in enumerate(rows):
        ids[b, : len(i)], positions[b, : len(p)] = torch.tensor(i), torch.tensor(p)
        segments[b, : len(s)], targets[b, : len(t)] = torch.tensor(s), torch.tensor(t)
    return ids, positions, segments, targets


def train_tiny_llava(
    model: Any,
    processor: Any,
    features: torch.Tensor,
    records: Sequence[dict],
    scene_index: Sequence[int],
    *,
    epochs: float = 2.0,
    batch_size: int = 8,
    lr: float = 2e-3,
    weight_decay: float = 0.01,
    warmup: float = 0.05,
    seed: int = 0,
    max_seconds: float | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> TrainReport:
    """Train the projector and the Llama of ``model`` in place on ``records`` (dicts with ``question``
    and ``answer``); record ``i`` reads ``features[scene_index[i]]`` ([T, D] cached tower features).

    A batch is ``batch_size`` images with all their questions packed into one row each
    (:func:`pack_scene`), so the 256-odd image tokens are run once per image, not once per question.
    An epoch visits every image once. AdamW (betas 0.9/0.98, grad-norm clip 1), linear warm-up over
    ``warmup`` of the steps, then cosine to zero; ``max_seconds`` stops early.
    """
    if len(records) != len(scene_index) or not records:
        raise ValueError(
            f"need one scene index per record, got {len(records)} records, {len(scene_index)} indices"
        )
    if epochs <= 0 or batch_size < 1:
        raise ValueError(f"epochs must be > 0 and batch_size >= 1, got {epochs}, {batch_size}")
    image_tokens = features.shape[1]
    by_scene: dict[int, list[tuple[list[int], int]]] = {}
    for record, scene in zip(records, scene_index, strict=True):
        by_scene.setdefault(scene, []).append(
            _encode(processor, record["question"], record["answer"], image_tokens)
        )
    scenes = sorted(by_scene)
    rows = [pack_scene(by_scene[s], model.config.image_token_id) for s in scenes]
    pad = processor.tokenizer.pad_token_id
    params = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower.")]
    model.model.vision_tower.requires_grad_(False)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )
    total = max(1, math.ceil(epochs * len(scenes) / batch_size))
    warm = max(1, int(warmup * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))
        ),
    )
    generator = torch.Generator().manual_seed(seed)
    report, start = TrainReport(), time.perf_counter()
    model.train()
    order = torch.empty(0, dtype=torch.long)
    for step in range(total):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(scenes), generator=generator)])
        batch, order = order[:batch_size].tolist(), order[batch_size:]
        ids, positions, segments, targets = _batch([rows[i] for i in batch], pad)
        feats = features[[scenes[i] for i in batch]].float()
        loss = answer_loss(model, feats, ids, positions, segments, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        report.steps, report.seconds = step + 1, time.perf_counter() - start
        report.losses.append(loss.item())
        if progress is not None:
            progress(step + 1, report.losses[-1])
        if max_seconds is not None and report.seconds > max_seconds:
            break
    model.eval()
    return report


@torch.no_grad()
def answer_questions(
    model: Any,
    processor: Any,
    records: Sequence[dict],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 3,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy answers (the first generated word, lower case) to ``records`` (dicts with an absolute
    ``image`` path and a ``question``), through ``processor`` and ``model.generate`` in batches."""
    answers = []
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        inputs = processor(
            images=_images([r["image"] for r in batch]),
            text=[prompt(processor, r["question"]) for r in batch],
            return_tensors="pt",
            padding=True,
        )
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        answers.extend((t.split() or [""])[0].lower() for t in texts)
        if progress is not None:
            progress(len(batch))
    return answers


def per_kind_accuracy(records: Sequence[dict], answers: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per kind (and ``all``): ``n``, ``accuracy``, its binomial standard error ``se``, and the
    ``majority`` rate (accuracy of always giving that kind's most frequent answer in ``records``)."""
    from ..data.vqa import majority_rates

    if len(records) != len(answers):
        raise ValueError(f"one answer per record needed, got {len(answers)} for {len(records)}")
    majority = majority_rates(records)
    majority["all"] = (
        "",
        sum(majority[k][1] * sum(r["kind"] == k for r in records) for k in majority) / len(records),
    )
    out = {}
    for kind in [*sorted({r["kind"] for r in records}), "all"]:
        hits = [a == r["answer"] for r, a in zip(records, answers, strict=True) if kind in ("all", r["kind"])]
        acc = sum(hits) / len(hits)
        out[kind] = {
            "n": len(hits),
            "accuracy": acc,
            "se": math.sqrt(acc * (1 - acc) / len(hits)),
            "majority": majority[kind][1],
        }
    return out


def format_accuracy(table: dict[str, dict[str, float]]) -> str:
    """The per-kind table of :func:`per_kind_accuracy` as aligned text."""
    lines = [f"{'kind':<8} {'n':>5} {'accuracy':>9} {'se':>6} {'majority':>9}"]
    for kind, row in table.items():
        lines.append(
            f"{kind:<8} {row['n']:>5} {row['accuracy']:>9.3f} {row['se']:>6.3f} {row['majority']:>9.3f}"
        )
    return "\n".join(lines)


def scene_indices(records: Sequence[dict]) -> tuple[list[str], list[int]]:
    """The distinct image paths of ``records`` (first-seen order) and each record's index into them."""
    paths: dict[str, int] = {}
    index = [paths.setdefault(str(Path(r["image"])), len(paths)) for r in records]
    return list(paths), index


def train_vqa_llava(
    out: str | os.PathLike[str],
    *,
    n_train: int = 27000,
    n_test: int = 900,
    epochs: float = 2.0,
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    batch_size: int = 8,
    lr: float = 2e-3,
    max_seconds: float | None = None,
    init: str | os.PathLike[str] | None = None,
    bars: Callable[[int, str], Any] | None = None,
) -> dict[str, Any]:
    """The whole recipe: write the VQA set to ``out/data``, build the model around the embedded DINOv2-S,
    cache its tower features, train, save model + processor to ``out``, reload the folder through the
    Auto classes and score the test split per kind (greedy ``generate``). Writes ``out/results.json``
    and returns the same dict (``accuracy``: :func:`per_kind_accuracy`; ``train``: the report; sizes).

    ``init``: a saved folder to continue training from (a fresh schedule over ``epochs``) instead of a
    new model. ``bars(total, desc)`` makes a progress bar (an object with ``update(n)`` and ``close()``).
    """
    import json

    from ..data.vqa import read_vqa, vocabulary, write_vqa
    from ..models.dinov2_hf import dinov2_small_hf
    from .tiny_llava import build_processor, build_tiny_llava, load_tiny_llava, save_tiny_llava

    folder = Path(out).expanduser()
    files = write_vqa(folder / "data", n_train, n_test, seed=seed)
    train, test = read_vqa(files["train"]), read_vqa(files["test"])
    if init is not None:  # continue training a saved model (its own sizes and processor)
        model, processor = load_tiny_llava(init)
        text = model.config.text_config
        hidden_size, num_layers, num_heads = (
            text.hidden_size,
            text.num_hidden_layers,
            text.num_attention_heads,
        )
    else:
        tower = dinov2_small_hf()
        processor = build_processor(tower.config, vocabulary())
        model = build_tiny_llava(
            tower, processor, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, seed=seed
        )
    paths, index = scene_indices(train)
    bar = bars(len(paths), "tower features") if bars else None
    features = tower_features(model, processor, paths, progress=bar.update if bar else None)
    if bar:
        bar.close()
    scenes = len(paths)
    steps = max(1, math.ceil(epochs * scenes / batch_size))
    bar = bars(steps, "train") if bars else None

    def on_step(step: int, loss: float) -> None:
        if bar:
            bar.update(1)
            if hasattr(bar, "set_postfix") and step % 10 == 0:
                bar.set_postfix(loss=f"{loss:.3f}")

    report = train_tiny_llava(
        model,
        processor,
        features,
        train,
        index,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        max_seconds=max_seconds,
        progress=on_step,
    )
    if bar:
        bar.close()
    save_tiny_llava(model, processor, folder)
    model, processor = load_tiny_llava(folder)  # score what a user loads, not the object in memory
    bar = bars(len(test), "test answers") if bars else None
    start = time.perf_counter()
    answers = answer_questions(model, processor, test, progress=bar.update if bar else None)
    if bar:
        bar.close()
    results = {
        "accuracy": per_kind_accuracy(test, answers),
        "train": report.summary(),
        "answer_seconds": round(time.perf_counter() - start, 1),
        "sizes": {"hidden_size": hidden_size, "num_layers": num_layers, "num_heads": num_heads},
        "recipe": {
            "n_train": n_train,
            "n_test": n_test,
            "epochs": epochs,
            "seed": seed,
            "batch_size": batch_size,
            "lr": lr,
            "train_scenes": scenes,
            "init": None if init is None else str(init),
        },
        "threads": torch.get_num_threads(),
    }
    (folder / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


__all__ = [
    "features_cache_file",
    "TrainReport",
    "answer_loss",
    "pack_scene",
    "segment_mask",
    "answer_questions",
    "format_accuracy",
    "per_kind_accuracy",
    "scene_indices",
    "tower_features",
    "train_tiny_llava",
    "train_vqa_llava",
]
