"""Visual-token cuts on transformers VLMs: fewer visual tokens reach the language model, and nothing
else in user code changes (``processor(...)``, ``model(**inputs)``, ``model.generate(**inputs)``).

How (composition around transformers 5.x, no upstream forward copied): while patched, the model's
``forward`` and ``generate`` are instance attributes that, when a call carries pixels,

1. compute the image features with the model's own ``get_image_features`` (the tower and projector
   run as they are; VisionZip reads the attention of the vision layer the projector reads through a
   forward pre-hook; :class:`~tokenbudget.TowerReduce` has our ViT reducer installed in the tower);
2. cut each image's features to its budget (``kept`` rows, some pooled or merged);
3. drop the image placeholders of the cut tokens from ``input_ids`` and every per-token input
   (attention mask, labels, token type ids, explicit positions), row by row, keeping the padding side;
4. call the original ``forward`` / ``generate`` on that shorter prompt with the cut features as
   ``mm_encoder_outputs`` (transformers' own way to pass pre-computed image features).

The shorter prompt is a valid prompt: LLaVA-style models give it contiguous positions. Qwen2-VL /
2.5-VL keep their 3-D rope positions: they are computed on the full prompt and the surviving
columns kept (the model's ``get_rope_index`` answers with them, and the rope delta that decoding
uses is shifted by the tokens dropped). ``generate`` returns the caller's full prompt followed by
the new tokens, so ``out[:, :input_ids.shape[1]]`` slices the prompt off as before. ``forward``
returns logits over the shorter sequence. ``tokens=1.0`` runs the same path and is bit-identical.
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config.vlm import TowerReduce, VisionZip, VisualPool, VisualRandom, VisualSelect, VisualTokens
from ..ops.visual_budget import visual_token_counts
from ..ops.visual_cut import (
    compact,
    gather_seq,
    keep_random,
    keep_top,
    pool_cells,
    question_scores,
    segment_cells,
    split_budget,
    visionzip,
)
from ..state import VLMState
from . import hf_vlm_parts as parts
from .base import register_installer
from .hf_vlm_fastv import FastVAdapter, VLMContext


@dataclass(frozen=True)
class Family:
    """One VLM family: its name and how its images' tokens are laid out (``square``: one view of the
    tower's grid; ``anyres``: LLaVA-NeXT / OneVision base view + tiles; ``qwen``: Qwen's merged grid)."""

    name: str
    layout: str


FAMILIES: dict[str, Family] = {
    "LlavaForConditionalGeneration": Family("llava", "square"),
    "LlavaNextForConditionalGeneration": Family("llava_next", "anyres"),
    "LlavaOnevisionForConditionalGeneration": Family("llava_onevision", "anyres"),
    "Qwen2VLForConditionalGeneration": Family("qwen2_vl", "qwen"),
    "Qwen2_5_VLForConditionalGeneration": Family("qwen2_5_vl", "qwen"),
    "PaliGemmaForConditionalGeneration": Family("paligemma", "square"),
}

_PIXELS = ("pixel_values",)


def vlm_family(model: nn.Module) -> Family:
    """The family of a supported transformers VLM; ``ValueError`` naming the supported classes."""
    name = type(model).__name__
    if type(model).__module__.startswith("transformers.") and name in FAMILIES:
        return FAMILIES[name]
    raise ValueError(
        f"visual-token cuts patch transformers VLMs ({', '.join(FAMILIES)}); got "
        f"{type(model).__module__}.{name}. ViT configs such as tb.ToMe patch vision transformers"
    )


class _Method:
    """Instance-level replacement of ``model.<name>`` (``forward`` / ``generate``); ``__wrapped__`` is
    the original, so signature checks (transformers inspects ``forward``'s parameters) see it."""

    def __init__(self, adapter: VLMAdapter, name: str) -> None:
        self.adapter, self.name = adapter, name

    @property
    def __wrapped__(self) -> Any:
        model = self.adapter.model
        return getattr(type(model), self.name).__get__(model)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        original = self.__wrapped__
        if args:  # name the positional arguments
            bound = inspect.signature(original).bind_partial(*args)
            kwargs = {**bound.arguments, **kwargs}
            if self.name == "generate" and "inputs" in kwargs:
                kwargs["input_ids"] = kwargs.pop("inputs")
        if kwargs.get("pixel_values") is None or not self.adapter.first_step(kwargs):
            return original(**kwargs)
        return self.adapter.run(original, kwargs, generate=self.name == "generate")


class _RopeIndex:
    """Instance-level ``get_rope_index`` of a Qwen VLM: during a cut call, the 3-D positions of the
    surviving tokens (computed on the full prompt) for the shortened prompt; otherwise the original."""

    def __init__(self, adapter: VLMAdapter) -> None:
        self.adapter = adapter

    def __call__(self, input_ids: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        pending = getattr(self.adapter.local, "rope", None)
        if pending is not None:
            ids, positions, deltas = pending
            n = input_ids.shape[0] // ids.shape[0]
            if input_ids.shape[1] == ids.shape[1] and torch.equal(input_ids, ids.repeat_interleave(n, 0)):
                return positions.repeat_interleave(n, 1), deltas.repeat_interleave(n, 0)
        inner = self.adapter.base
        return type(inner).get_rope_index(inner, input_ids, *args, **kwargs)


class VLMAdapter:
    """Installs a visual-token cut on one transformers VLM (see the module docstring)."""

    name = "hf-vlm"

    def __init__(self, model: nn.Module, config: VisualTokens) -> None:
        self.family = vlm_family(model)
        self.model = model
        self.base = model.model
        self.config = config
        self.local = threading.local()
        self.ctx: VLMContext | None = None
        self.tower: Any = None  # (adapter, context) of TowerReduce's reducer in the vision tower
        self.tower_tokens: tuple[int, int] | None = None  # (visual tokens per image before, after)
        if isinstance(config, (VisionZip, TowerReduce)) and self.family.layout != "qwen":
            self._check_tower()
        if isinstance(config, TowerReduce):
            from .hf_vlm_tower import prepare_tower

            self.tower, self.tower_tokens = prepare_tower(self.base, self.family, config)
        elif self.family.layout == "square":
            n = self._square_tokens()
            visual_token_counts(config.tokens, [n])  # a count larger than the image's tokens fails now

    def __getstate__(self) -> dict:
        # thread-local slots belong to one process: a copied or loaded model starts with fresh ones
        return {k: v for k, v in self.__dict__.items() if k != "local"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.local = threading.local()

    # -- structure -----------------------------------------------------------------------------
    def _check_tower(self) -> None:
        tower = getattr(self.base, "vision_tower", None)
        if tower is None or not hasattr(getattr(tower, "vision_model", tower), "encoder"):
            raise ValueError(f"{type(self.model).__name__}'s vision tower is not a CLIP / SigLIP encoder")

    def _side(self) -> int:
        vc = self.model.config.vision_config
        return int(vc.image_size) // int(vc.patch_size)

    def _square_tokens(self) -> int:
        """Visual tokens per image of a one-view family (the class token counts with ``full``)."""
        cls = parts.has_class_token(self.base.vision_tower)
        strategy = getattr(self.model.config, "vision_feature_select_strategy", "full")
        return self._side() ** 2 + (1 if cls and strategy == "full" else 0)

    # -- install -------------------------------------------------------------------------------
    def install(self, ctx: VLMContext) -> None:
        self.ctx = ctx
        self.model.forward = _Method(self, "forward")
        self.model.generate = _Method(self, "generate")
        if self.family.layout == "qwen":
            self.base.get_rope_index = _RopeIndex(self)
        if self.tower is not None:
            self.tower[0].install(self.tower[1])

    def uninstall(self) -> None:
        for obj, attr in ((self.model, "forward"), (self.model, "generate"), (self.base, "get_rope_index")):
            obj.__dict__.pop(attr, None)
        if self.tower is not None:
            self.tower[0].uninstall()

    # -- one call ------------------------------------------------------------------------------
    @staticmethod
    def first_step(kwargs: dict) -> bool:
        """True for a call that encodes the prompt (not a decoding step on a filled cache)."""
        cache = kwargs.get("past_key_values")
        return cache is None or not hasattr(cache, "get_seq_length") or cache.get_seq_length() == 0

    def run(self, original: Any, kwargs: dict, *, generate: bool) -> Any:
        if kwargs.get("input_ids") is None:
            raise NotImplementedError(
                "visual-token cuts need input_ids (the image placeholders say where each image's tokens go); "
                "pass input_ids from the processor rather than inputs_embeds"
            )
        new, state, rope = self.cut(kwargs)
        self.local.rope = rope
        try:
            out = original(**new)
        finally:
            self.local.rope = None
        self.ctx.finish(state)
        if not generate:
            return out
        prompt = kwargs["input_ids"]
        sequences = out if isinstance(out, Tensor) else out.sequences
        repeat = sequences.shape[0] // prompt.shape[0]
        full = torch.cat([prompt.repeat_interleave(repeat, 0), sequences[:, new["input_ids"].shape[1] :]], 1)
        if isinstance(out, Tensor):
            return full
        out.sequences = full
        return out

    def cut(self, kwargs: dict) -> tuple[dict, VLMState, tuple | None]:
        """The keyword arguments of the shortened call, the state, and Qwen's pending positions."""
        config, mconfig = self.config, self.model.config
        ids = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        capture, handle = self._attention_hook() if isinstance(config, VisionZip) else (None, None)
        try:
            encoded = self._encode(self.base.get_image_features, kwargs)
        finally:
            if handle is not None:
                handle.remove()
        feats = list(encoded.pooler_output)
        is_image = ids == mconfig.image_token_id
        if self.tower_tokens is not None:
            available = [self.tower_tokens[0]] * len(feats)
            counts = [int(f.shape[0]) for f in feats]
        else:
            available = [int(f.shape[0]) for f in feats]
            scores = None
            if config.allocation == "adaptive":  # how varied each image's tokens are
                scores = [float(((f.detach() - f.detach().mean(0)) ** 2).sum(-1).mean()) for f in feats]
            counts = visual_token_counts(
                config.tokens, available, allocation=config.allocation, scores=scores
            )
        if int(is_image.sum()) != sum(available):
            raise ValueError(
                f"the prompt holds {int(is_image.sum())} image tokens but its images have {sum(available)} "
                "visual tokens; build the inputs with the model's processor"
            )
        spans = torch.split(is_image.nonzero(), available)  # per image: [n_i, 2] (row, column)
        if any(int(s[:, 0].min()) != int(s[:, 0].max()) for s in spans):
            raise ValueError(
                "an image's placeholder tokens span two prompts; build the inputs with the processor"
            )
        maps = self._index_maps(kwargs, len(feats)) if self.family.layout == "anyres" else None
        keep = ~is_image & (mask != 0)  # padding is laid out anew
        if isinstance(config, VisualSelect) and config.query == "attention" and counts != available:
            self.local.llm = self._layer_queries(kwargs, ids, mask, is_image, feats)
        new_feats = []
        for i, (f, span, k) in enumerate(zip(feats, spans, counts, strict=True)):
            if self.tower_tokens is not None or k == f.shape[0]:
                g, kept = f, torch.arange(k, device=f.device)
            else:
                g, kept = self._reduce(i, f, k, span, ids, mask, capture, maps, kwargs)
            new_feats.append(g)
            rows, cols = span[:, 0], span[:, 1]
            keep[rows[kept.to(rows.device)], cols[kept.to(cols.device)]] = True
        left = not bool((mask[:, -1] == 0).any())
        if counts == available:  # nothing cut: the same layout, padding columns included
            source = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
            valid = torch.ones_like(ids, dtype=torch.bool)
        else:
            source, valid = compact(keep, left)
        pad = getattr(mconfig.get_text_config(), "pad_token_id", None)
        new = {k: v for k, v in kwargs.items() if k not in _PIXELS}
        new["input_ids"] = gather_seq(ids, source, valid, 0 if pad is None else pad)
        if kwargs.get("attention_mask") is not None or not bool(valid.all()):  # no mask given, none needed
            new["attention_mask"] = gather_seq(mask, source, valid, 0)
        for key, fill in (("labels", -100), ("token_type_ids", 0), ("mm_token_type_ids", 0)):
            if isinstance(kwargs.get(key), Tensor):
                new[key] = gather_seq(kwargs[key], source, valid, fill)
        if isinstance(kwargs.get("position_ids"), Tensor):
            new["position_ids"] = gather_seq(
                kwargs["position_ids"], source, valid, 0, dim=kwargs["position_ids"].dim() - 1
            )
        pooled = encoded.pooler_output
        encoded.pooler_output = (
            torch.cat(new_feats) if isinstance(pooled, Tensor) else type(pooled)(new_feats)
        )
        new["mm_encoder_outputs"] = {**(kwargs.get("mm_encoder_outputs") or {}), "image": encoded}
        if kwargs.get("pixel_values_videos") is not None:  # videos pass uncut, but encoded here too:
            new["mm_encoder_outputs"]["video"] = self._encode(self.base.get_video_features, kwargs)
            del new["pixel_values_videos"]  # the model takes pixels or encoder outputs, not both
        rope = self._positions(kwargs, mask, new, source, valid) if self.family.layout == "qwen" else None
        return new, VLMState(config.method, available, [int(g.shape[0]) for g in new_feats]), rope

    @staticmethod
    def _encode(encode: Any, kwargs: dict) -> Any:
        """``encode`` (the model's ``get_image_features`` / ``get_video_features``) on the inputs of
        the call it takes (as ``generate`` does)."""
        names = inspect.signature(encode).parameters
        given = {
            k: kwargs[k] for k in names if k not in ("kwargs", "return_dict") and kwargs.get(k) is not None
        }
        return encode(**given, return_dict=True)

    def _full_positions(self, kwargs: dict, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Qwen: the 3-D rope positions [3, B, L] and deltas [B, 1] of the full prompt."""
        if kwargs.get("mm_token_type_ids") is None:
            raise ValueError(
                "Qwen VLMs need mm_token_type_ids (the processor returns it) to place image tokens"
            )
        inner = self.base
        return type(inner).get_rope_index(
            inner,
            kwargs["input_ids"],
            mm_token_type_ids=kwargs["mm_token_type_ids"],
            image_grid_thw=kwargs.get("image_grid_thw"),
            video_grid_thw=kwargs.get("video_grid_thw"),
            attention_mask=mask,
        )

    def _positions(self, kwargs: dict, mask: Tensor, new: dict, source: Tensor, valid: Tensor) -> tuple:
        """Qwen: 3-D positions [3, B, L'] of the kept tokens, from the full prompt, and the rope deltas."""
        positions, deltas = self._full_positions(kwargs, mask)
        kept = gather_seq(positions, source, valid, 0, dim=2)
        dropped = (mask.sum(1) - gather_seq(mask, source, valid, 0).sum(1)).to(deltas.device).unsqueeze(1)
        return new["input_ids"], kept, deltas + dropped

    # -- the cuts ------------------------------------------------------------------------------
    def _reduce(self, i: int, f: Tensor, k: int, span: Tensor, ids: Tensor, mask: Tensor,
                capture: Any, maps: list[Tensor] | None, kwargs: dict) -> tuple[Tensor, Tensor]:  # fmt: skip
        config, n = self.config, f.shape[0]
        if isinstance(config, VisualRandom):
            gen = self.local.__dict__.setdefault("gen", torch.Generator())
            if i == 0:
                gen.manual_seed(config.seed)
            kept = keep_random(n, k, gen).to(f.device)
            return f[kept], kept
        if isinstance(config, VisualPool):
            layout = self._layout(i, n, maps, kwargs)
            if len(layout) > k:
                layout = [(1, n)]
            cells = segment_cells(layout, split_budget(k, [r * c for r, c in layout]))
            return pool_cells(f, cells, k)
        if isinstance(config, VisualSelect):
            kept = keep_top(self._select_scores(f, span, ids, mask), k).to(f.device)
            return f[kept], kept
        if isinstance(config, VisionZip):
            scores, keys = self._zip_scores(i, n, capture, maps, kwargs)
            c = config.contextual
            c = c if isinstance(c, int) else (max(1, round(c * k)) if c > 0 else 0)
            return visionzip(f, scores.to(f.device), keys.to(f.device), k, c)
        raise NotImplementedError(f"{type(config).__name__} has no cut on {self.family.name}")

    def _layout(self, i: int, n: int, maps: list[Tensor] | None, kwargs: dict) -> list[tuple[int, int]]:
        if self.family.layout == "qwen":
            t, h, w = (int(v) for v in kwargs["image_grid_thw"][i])
            m = self.base.visual.spatial_merge_size
            return [(t * h // m, w // m)]
        side = self._side()
        if self.family.layout == "anyres":
            return parts.anyres_layout(maps[i], self._crop_tokens(), side)
        return parts.square_layout(n, side) or [(1, n)]

    def _question(self, span: Tensor, ids: Tensor, mask: Tensor) -> tuple[int, Tensor]:
        """(row, positions [L] bool) of the text after the image in its prompt (up to the next image;
        the whole prompt's text when none follows)."""
        row, end = int(span[0, 0]), int(span[-1, 1]) + 1
        text = (mask[row] != 0) & (ids[row] != self.model.config.image_token_id)
        after = text.clone()
        after[:end] = False
        later = (~text[end:]).nonzero()
        if later.numel():
            after[end + int(later[0]) :] = False
        return row, after if bool(after.any()) else text

    def _select_scores(self, f: Tensor, span: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """VisualSelect's score [N] of each of an image's tokens for its prompt's question."""
        row, where = self._question(span, ids, mask)
        if not bool(where.any()):
            return torch.zeros(f.shape[0], device=f.device)
        if self.config.query == "embeddings":
            with torch.no_grad():
                return question_scores(f, self.model.get_input_embeddings()(ids[row][where]))
        llm = self.local.llm  # the question's attention in the LLM's layer 1 (see _layer_queries)
        queries = where.nonzero().squeeze(1)
        q = llm.q[row][:, queries]  # [H, Q, d]
        logits = q @ llm.k[row].transpose(-1, -2) * llm.scaling  # [H, Q, L]
        keys = torch.arange(ids.shape[1], device=ids.device)
        allowed = (keys.unsqueeze(0) <= queries.unsqueeze(1)) & (mask[row] != 0).unsqueeze(0)  # causal
        weights = torch.softmax(logits.masked_fill(~allowed.to(logits.device), float("-inf")), dim=-1)
        return weights[:, :, span[:, 1].to(weights.device)].mean((0, 1))

    def _layer_queries(self, kwargs: dict, ids: Tensor, mask: Tensor, is_image: Tensor, feats: list) -> Any:
        """Queries and keys of the LLM's decoder layer 1 on the full prompt (images scattered in as the
        model does), for ``VisualSelect(query="attention")``."""
        with torch.no_grad():
            embeds = self.model.get_input_embeddings()(ids)
            embeds[is_image.to(embeds.device)] = torch.cat(feats).to(embeds.device, embeds.dtype)
            if self.family.layout == "qwen":
                positions = self._full_positions(kwargs, mask)[0]
            else:
                positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            return parts.llm_layer_queries(self.base.language_model, embeds, mask, positions, layer=1)

    # -- VisionZip's attention -------------------------------------------------------------------
    def _attention_hook(self) -> tuple[Any, Any]:
        if self.family.layout == "qwen":
            capture = parts.PackedAttentionScores()
            attention = self.base.visual.blocks[-1].attn
        else:
            tower = self.base.vision_tower
            layers = parts.tower_layers(tower)
            layer = layers[parts.feature_layer_index(self.model.config, len(layers))]
            capture = parts.CrossAttentionScores(parts.has_class_token(tower))
            attention = parts.layer_attention(layer)
        return capture, attention.register_forward_pre_hook(capture, with_kwargs=True)

    def _crop_tokens(self) -> int:
        """Visual tokens per crop of an anyres family (the class token is cut by ``default``)."""
        cls = parts.has_class_token(self.base.vision_tower)
        drop = cls and self.model.config.vision_feature_select_strategy == "default"
        return self._side() ** 2 + (1 if cls else 0) - (1 if drop else 0)

    def _index_maps(self, kwargs: dict, images: int) -> list[Tensor]:
        sizes = kwargs["image_sizes"]
        crops = parts.anyres_crops(self.base, sizes)
        return parts.anyres_index_map(self.base, crops[:images], self._crop_tokens(), sizes)

    def _zip_scores(self, i: int, n: int, capture: Any, maps: list[Tensor] | None, kwargs: dict) -> tuple[Tensor, Tensor]:  # fmt: skip
        if self.family.layout == "qwen":
            if i == 0:
                grid = kwargs["image_grid_thw"]
                scores, keys = parts.qwen_unit_scores(self.base.visual, capture, grid)
                m2 = self.base.visual.spatial_merge_size**2
                sizes = (grid.prod(-1) // m2).tolist()
                self.local.zip = list(zip(torch.split(scores, sizes), torch.split(keys, sizes), strict=True))
            return self.local.zip[i]
        scores, keys = capture.scores, capture.keys
        strategy = getattr(self.model.config, "vision_feature_select_strategy", "full")
        if parts.has_class_token(self.base.vision_tower) and strategy == "default":
            scores, keys = scores[:, 1:], keys[:, 1:]
        if self.family.layout == "square":
            return scores[i], keys[i]
        index = maps[i].to(scores.device)
        flat_s, flat_k = scores.reshape(-1), keys.reshape(-1, keys.shape[-1])
        newline = index < 0
        s = torch.where(newline, flat_s.min() - 1, flat_s[index.clamp(min=0)])
        k = torch.where(newline.unsqueeze(1), torch.zeros_like(flat_k[:1]), flat_k[index.clamp(min=0)])
        return s, k


@register_installer(VisualTokens)
def prepare_vlm(model: nn.Module, config: VisualTokens) -> tuple[Any, VLMContext]:
    """(adapter, context) of a visual-token cut on a transformers VLM (``tb.apply``'s installer)."""
    vlm_family(model)
    if config.method == "fastv":
        return FastVAdapter(model, config), VLMContext(config)
    if type(config) is VisualTokens:
        raise ValueError("VisualTokens is the base of the VLM configs; use e.g. tb.VisionZip(tokens=64)")
    return VLMAdapter(model, config), VLMContext(config)
