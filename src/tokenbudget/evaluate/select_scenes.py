"""The scene benchmark for query-aware selection (``tokenbudget vlm-select-eval``).

On the multi-object test scenes (four Fashion-MNIST items of distinct classes per 224 px canvas,
embedded by DINOv2-S: 256 patch tokens each), every item of every scene is queried once per query
kind, and each method keeps k patch tokens:

* ``text``: the item's class name in a prompt ("a photo of a sandal"), MiniLM + trained projection;
* ``text+mmr``: the same with a maximal-marginal-relevance diversity term;
* ``exemplar``: a *different* Fashion-MNIST test image of the same class, shown alone at scene scale
  on a black canvas, embedded by the same backbone (mean of its foreground patch tokens);
* ``random``: k patch tokens drawn uniformly (seeded);
* ``cls-attention``: the k patches the class token attends to most in DINOv2's last block (head
  averaged): query-agnostic, the usual "important tokens" baseline;
* ``oracle``: all patches of the item (its own k).

Scores per (scene, item): (a) the share of the kept tokens whose patch the item owns
(``SceneSet.patch_owner(14)``); (b) whether the pooled kept tokens are classified as the item's class
by cosine k-NN against the oracle item bank of the train scenes (:mod:`.scene_metrics`). Both are
averaged over all scene x item queries. Chance share is the item's share of the patches (~0.11).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..ops.select import relevance
from ..vlm.select import select_by_scores
from .scene_metrics import item_reference_bank, knn_predict, pooled_feature

PATCH = 14
EXEMPLAR_SEED = 1  # exemplar scenes are drawn with another seed than the test scenes (seed 0)


@dataclass
class SelectionData:
    """Everything the benchmark scores on.

    ``tokens`` [S, 1 + P, C] (class token first), ``owner`` [S, P] item index of each patch or -1,
    ``labels`` / ``sources`` [S, I] class and Fashion-MNIST index of each item, ``class_attention``
    [S, 1 + P] (or None: no cls-attention rows), ``exemplars`` [E, C] query vectors with their
    ``exemplar_labels`` / ``exemplar_sources`` [E] (or None: no exemplar rows), and the k-NN bank.
    """

    tokens: Tensor
    owner: Tensor
    labels: Tensor
    sources: Tensor
    bank: Tensor
    bank_labels: Tensor
    class_attention: Tensor | None = None
    exemplars: Tensor | None = None
    exemplar_labels: Tensor | None = None
    exemplar_sources: Tensor | None = None


@dataclass(frozen=True)
class SelectionRow:
    """One method at one budget: mean on-item share and per-item k-NN accuracy over ``queries``."""

    method: str
    k: str
    on_item_share: float
    knn_accuracy: float
    queries: int


def scene_class_attention(
    num_scenes: int = 300, split: str = "test", seed: int = 0, progress: Callable[[int], None] | None = None
) -> Tensor:
    """DINOv2-S last-block class-token attention (head averaged) of the scenes: [S, 257], cached."""
    from ..adapters.attention_capture import class_token_attention
    from ..data.images import model_normalization, rgb_uint8_to_model_input
    from ..data.scenes import _VERSION, scene_set
    from ..data.token_cache import cached_tokens
    from ..models import dinov2_small

    def compute() -> Tensor:
        scenes = scene_set(num_scenes, split, seed=seed)
        model = dinov2_small().eval()
        mean, std = model_normalization(model)
        chunks = []
        for start in range(0, len(scenes.images), 32):
            images = rgb_uint8_to_model_input(scenes.images[start : start + 32], mean, std)
            chunks.append(class_token_attention(model, images, progress=progress))
        return torch.cat(chunks)

    key = f"dinov2_small-imgfocus-scenes-v{_VERSION}-{num_scenes}-{split}-{seed}-cls-attention-last"
    # Cached as float16 like the tokens: weights of about 1/257 keep ~3 significant digits.
    return cached_tokens(key, compute)


def exemplar_queries(
    num_exemplars: int = 100, seed: int = EXEMPLAR_SEED, progress: Callable[[int], None] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Exemplar query vectors [E, 384] of single-item test-split scenes, with their classes and sources.

    Each exemplar is one Fashion-MNIST test image placed alone on a black 224 px canvas at the
    scenes' item scale, embedded by DINOv2-S; its query is the mean of the patch tokens it covers
    (:func:`tokenbudget.vlm.exemplar_query` with the foreground mask). Cached.
    """
    from ..data.images import model_normalization, rgb_uint8_to_model_input
    from ..data.scenes import _VERSION, scene_set
    from ..data.token_cache import cached_tokens
    from ..models import dinov2_small
    from ..vlm.select import exemplar_query

    singles = scene_set(num_exemplars, "test", seed=seed, num_items=1)
    mask = torch.from_numpy(singles.patch_owner(PATCH) == 0)  # [E, 16, 16] foreground patches

    def compute() -> Tensor:
        model = dinov2_small().eval()
        mean, std = model_normalization(model)
        out = []
        for start in range(0, num_exemplars, 32):
            images = rgb_uint8_to_model_input(singles.images[start : start + 32], mean, std)
            out.append(exemplar_query(model, images, mask=mask[start : start + 32]))
            if progress is not None:
                progress(len(images))
        return torch.cat(out)

    key = f"dinov2_small-imgfocus-exemplars-v{_VERSION}-{num_exemplars}-test-{seed}-single-item-foreground"
    vectors = cached_tokens(key, compute)
    return vectors, torch.from_numpy(singles.labels[:, 0]), torch.from_numpy(singles.sources[:, 0])


def load_selection_data(
    num_scenes: int = 300,
    *,
    class_attention: bool = True,
    exemplars: bool = True,
    progress: Callable[[int], None] | None = None,
) -> SelectionData:
    """The cached test scenes (the first ``num_scenes`` of the 300), their attention and exemplars."""
    from ..data.token_cache import dinov2_scene_tokens

    if not 1 <= num_scenes <= 300:
        raise ValueError(f"num_scenes must be in [1, 300] (the cached test scenes), got {num_scenes}")
    scenes, tokens = dinov2_scene_tokens(300, "test", progress=progress)
    bank, bank_labels = item_reference_bank()
    s = slice(0, num_scenes)
    data = SelectionData(
        tokens=tokens[s],
        owner=torch.from_numpy(scenes.patch_owner(PATCH)).flatten(1)[s],
        labels=torch.from_numpy(scenes.labels)[s],
        sources=torch.from_numpy(scenes.sources)[s],
        bank=bank,
        bank_labels=bank_labels,
    )
    if class_attention:
        data.class_attention = scene_class_attention(300, "test", progress=progress)[s]
    if exemplars:
        data.exemplars, data.exemplar_labels, data.exemplar_sources = exemplar_queries(progress=progress)
    return data


def pick_exemplars(data: SelectionData, item: int) -> Tensor:
    """[S, C] the exemplar query of each scene's ``item``: one of its class, never the item's own image."""
    rows = []
    for s, (label, source) in enumerate(
        zip(data.labels[:, item].tolist(), data.sources[:, item].tolist(), strict=True)
    ):
        ok = torch.nonzero((data.exemplar_labels == label) & (data.exemplar_sources != source))[:, 0]
        if len(ok) == 0:
            raise ValueError(f"no exemplar of class {label} other than the item itself; use more exemplars")
        rows.append(int(ok[s % len(ok)]))  # rotate through the class's exemplars across scenes
    return data.exemplars[rows]


def score_selection(data: SelectionData, item: int, kept: Tensor) -> tuple[Tensor, Tensor]:
    """Per scene: share of ``kept`` [S, P] (bool) patches on ``item``, and k-NN correctness [S]."""
    on_item = (data.owner == item) & kept
    share = on_item.sum(1).float() / kept.sum(1).clamp_min(1).float()
    features = pooled_feature(data.tokens[:, 1:], kept.float())  # [S, C]
    predicted = knn_predict(data.bank, data.bank_labels, features)
    return share, (predicted == data.labels[:, item]).float()


def run_selection_benchmark(
    data: SelectionData,
    ks: Sequence[int] = (8, 16, 32, 64),
    *,
    text_queries: Tensor | None = None,
    diversity: float = 0.3,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[SelectionRow]:
    """Every method at every k (see the module docstring). ``text_queries`` [num_classes, C]: the
    query vector of each class's prompt (None: no text rows). ``progress(1)`` after each method x k."""
    tokens, num_items = data.tokens, data.labels.shape[1]
    scenes, n = tokens.shape[:2]
    generator = torch.Generator().manual_seed(seed)
    methods: dict[str, Callable[[int], Tensor]] = {}  # name -> item -> scores [S, N]
    if text_queries is not None:
        methods["text"] = lambda i: relevance(tokens, text_queries[data.labels[:, i]])
    if text_queries is not None and diversity > 0:
        methods[f"text+mmr{diversity:g}"] = methods["text"]
    if data.exemplars is not None:
        methods["exemplar"] = lambda i: relevance(tokens, pick_exemplars(data, i))
    methods["random"] = lambda i: torch.rand(scenes, n, generator=generator)
    if data.class_attention is not None:
        methods["cls-attention"] = lambda i: data.class_attention
    rows = []
    for name, scores_of in methods.items():
        mmr = diversity if name.startswith("text+mmr") else 0.0
        for k in ks:
            shares, hits = [], []
            for i in range(num_items):
                out = select_by_scores(tokens, scores_of(i), k, num_prefix=1, diversity=mmr)
                share, hit = score_selection(data, i, out.assignment[:, 1:] >= 0)
                shares.append(share)
                hits.append(hit)
            rows.append(_row(name, str(k), shares, hits))
            if progress is not None:
                progress(1)
    shares, hits = [], []
    for i in range(num_items):
        share, hit = score_selection(data, i, data.owner == i)
        shares.append(share[data.owner.eq(i).any(1)])
        hits.append(hit[data.owner.eq(i).any(1)])
    rows.append(_row("oracle", "item", shares, hits))
    return rows


def _row(name: str, k: str, shares: list[Tensor], hits: list[Tensor]) -> SelectionRow:
    share, hit = torch.cat(shares), torch.cat(hits)
    return SelectionRow(name, k, float(share.mean()), float(hit.mean()), len(share))


def format_rows(rows: Sequence[SelectionRow]) -> str:
    """A fixed-width table: method, k, on-item share, k-NN accuracy, queries."""
    lines = [f"{'method':<16} {'k':>5} {'on-item share':>14} {'k-NN acc':>9} {'queries':>8}"]
    for r in rows:
        lines.append(
            f"{r.method:<16} {r.k:>5} {r.on_item_share:>14.3f} {r.knn_accuracy:>9.3f} {r.queries:>8}"
        )
    return "\n".join(lines)


def chance_share(data: SelectionData) -> float:
    """Mean share of the patches an item owns: what random selection scores on average."""
    shares = [(data.owner == i).float().mean(1) for i in range(data.labels.shape[1])]
    return float(np.mean([float(s.mean()) for s in shares]))
