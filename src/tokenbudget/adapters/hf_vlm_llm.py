"""FastV inside the language model of a transformers VLM: cut visual tokens at decoder layer K.

:func:`install_fastv` wraps the decoder layers K..N-1 of the VLM's language model (their instance
``forward``, so weights, ``state_dict`` keys and the model's own hooks stay as they are) and records,
at every call of the VLM, which input positions are image tokens. At prefill, layer K's wrapper

1. scores every image token by the attention the last prompt token pays it at layer K, recomputed
   for that one query row from layer K's own ``input_layernorm``, q/k projections (+ q/k norms),
   the rotary function of the model's module with the decoder's cos/sin, and GQA head repeat, with
   the row's own mask (so SDPA or flash attention stay in use; nothing is forced to eager);
2. keeps the top-k image tokens of every image (order kept) and every text token that is not
   padding; rows keeping fewer positions than the longest are left-padded (slots repeating the
   row's first kept position, masked out as keys in every later mask);
3. hands layer K and all later layers only those positions: hidden states, cos/sin, mask rows and
   columns, position ids. Their attention therefore writes only the kept tokens to the KV cache.

After the last layer the kept hidden states are scattered back into the full prompt length (the
dropped positions hold the hidden state they had entering layer K), so logits keep their usual
shape. During decoding the decoder sizes its mask from layer 0's (full) cache; layers >= K get the
columns of their kept prompt positions (padding slots masked) plus the new tokens'. Decode
positions continue from the full prompt, as FastV keeps every token's original position. When
nothing would be dropped (``tokens=1.0``) the layers run untouched.
"""

from __future__ import annotations

import functools
import inspect
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config.vlm_llm import FastV
from ..ops.llm_attention import (
    apply_rope,
    causal_allowed,
    gather_positions,
    image_spans,
    keep_positions,
    left_pack,
    mask_padding_slots,
    query_row_attention,
    repeat_kv_heads,
    row_mask_bias,
)
from ..ops.visual_budget import visual_token_counts

#: VLM classes whose language model FastV knows (Llama/Mistral/Qwen2-style decoder layers)
SUPPORTED_FASTV = (
    "LlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration",
    "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
    "PaliGemmaForConditionalGeneration",
)


@dataclass
class FastVState:
    """What the last prefill of a FastV model did.

    ``available``/``visual_tokens``/``kv_visual_tokens``: one entry per image of the call (row-major):
    its visual tokens, those kept from layer K on, and those held by the KV cache of layers >= K
    (empty when the call used no cache). ``layer``: K as installed (a ``FastV(layer=None)`` resolved).
    ``scores`` ``(B, L)``: the last prompt token's attention at layer K (mean over heads); ``keep``
    ``(B, L')``: the prompt positions layers >= K saw, each row's kept text and visual tokens in order,
    left-padded with -1 where a row keeps fewer than the longest (those slots are masked out).
    ``None`` when nothing was cut (e.g. ``tokens=1.0``: layers >= K see the prompt as it is).
    """

    layer: int
    available: list[int] = field(default_factory=list)
    visual_tokens: list[int] = field(default_factory=list)
    kv_visual_tokens: list[int] = field(default_factory=list)
    scores: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    method: str = "fastv"


class _Run:
    """Mutable per-model bookkeeping shared by the hooks and wrappers of one install."""

    def __init__(self) -> None:
        self.image_mask: torch.Tensor | None = None  # (B, L) of the current VLM call
        self.real: torch.Tensor | None = None  # (B, L) not-padding tokens of the current call
        self.image_lengths: list[int] | None = None  # tokens per image of the current call
        self.keep: torch.Tensor | None = None  # (B, L') positions layers >= K see at the last prefill
        self.valid: torch.Tensor | None = None  # (B, L') False at the left-padding slots of ``keep``
        self.padded = False  # whether ``valid`` has any padding slot
        self.prompt_len = 0
        self.entry: torch.Tensor | None = None  # hidden states entering layer K at prefill
        self.cache: weakref.ref | None = None
        self.mode: str | None = None  # "cut" (prefill), "continue" (decode) or None, for this forward
        self.state: FastVState | None = None


class FastVHandle:
    """An installed FastV: ``state`` (a :class:`FastVState` after the first prefill) and
    ``uninstall()``, which restores the model exactly."""

    def __init__(self, config: FastV, run: _Run, undo: list) -> None:
        self.config = config
        self._run = run
        self._undo = undo

    @property
    def state(self) -> FastVState | None:
        return self._run.state

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module, int]:
    """(the VLM's inner model, its language model, the image token id)."""
    name = type(model).__name__
    inner = getattr(model, "model", None)
    llm = getattr(inner, "language_model", None)
    if llm is None or not hasattr(model, "config"):
        raise ValueError(
            f"FastV needs a transformers vision-language model ({', '.join(SUPPORTED_FASTV)}); got {name}"
        )
    if name not in SUPPORTED_FASTV:
        raise NotImplementedError(
            f"FastV does not support the language model of {name} yet; supported: {', '.join(SUPPORTED_FASTV)}. "
            "A cut before the LLM (e.g. tb.VisionZip) may work for it"
        )
    token = getattr(model.config, "image_token_id", None)
    if token is None:
        token = getattr(model.config, "image_token_index", None)
    if token is None:
        raise NotImplementedError(f"{name}'s config names no image_token_id/image_token_index")
    for i, layer in enumerate(llm.layers):
        attn = getattr(layer, "self_attn", None)
        if not all(
            hasattr(m, a) for m, a in ((layer, "input_layernorm"), (attn, "q_proj"), (attn, "k_proj"))
        ):
            raise NotImplementedError(
                f"FastV reads input_layernorm/self_attn.q_proj/k_proj of each decoder layer; layer {i} of "
                f"{type(llm).__name__} ({type(layer).__name__}) has another layout"
            )
    return inner, llm, int(token)


def install_fastv(model: nn.Module, config: FastV) -> FastVHandle:
    """Install ``config`` on a VLM in place; ``handle.uninstall()`` restores it exactly.

    ``config.layer=None`` is resolved here (:func:`resolve_layer`: 2, or N-1 when N <= 2).
    ``ValueError`` for a layer outside 1..N-1 (N: the language model's decoder layers) or a model
    that is not a VLM; ``NotImplementedError`` for a VLM whose language model is not supported.
    """
    if not isinstance(config, FastV):
        raise ValueError(f"install_fastv takes a tb.FastV config, got {type(config).__name__}")
    inner, llm, token = _parts(model)
    layers = llm.layers
    layer_k = resolve_layer(config.layer, len(layers), type(model).__name__)
    types = getattr(llm.config, "layer_types", None) or []
    if any(t != "full_attention" for t in types[layer_k:]):
        raise NotImplementedError(
            f"FastV supports full-attention decoder layers only; layers {layer_k}.. of {type(llm).__name__} "
            f"include {sorted(set(types[layer_k:]) - {'full_attention'})} (a sliding-window cache cannot hold "
            "the cut prompt)"
        )
    run, undo = _Run(), []

    names = list(inspect.signature(type(inner).forward).parameters)[1:]  # the inner model's arguments

    def on_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = {**dict(zip(names, args, strict=False)), **kwargs}
        ids, embeds, mask = call.get("input_ids"), call.get("inputs_embeds"), call.get("attention_mask")
        # generate encodes the images before prefill and passes them in: read their lengths there
        encoded = (call.get("mm_encoder_outputs") or {}).get("image")
        run.image_lengths = _lengths(getattr(encoded, "pooler_output", None))
        tokens = ids if ids is not None else embeds
        # the caller's padding (a 2-D mask of this call's tokens): FastV never keeps padding
        padding = isinstance(mask, torch.Tensor) and mask.ndim == 2 and tokens is not None
        run.real = mask.bool() if padding and mask.shape == tokens.shape[:2] else None
        if ids is not None:
            run.image_mask = ids == token
        elif embeds is not None:  # placeholders are the image token's embedding until the scatter
            ref = module.get_input_embeddings()(torch.tensor(token, device=embeds.device))
            run.image_mask = (embeds == ref.to(embeds.dtype)).all(dim=-1)
        else:
            run.image_mask = None

    undo.append(inner.register_forward_pre_hook(on_call, with_kwargs=True).remove)
    _wrap(inner, "get_image_features", _record_lengths(run, inner.get_image_features), undo)
    for idx in range(layer_k, len(layers)):
        layer = layers[idx]
        original = layer.forward
        _wrap(layer, "forward", _layer_wrapper(run, config, layer_k, layer, idx, len(layers), original), undo)
    return FastVHandle(config, run, undo)


def resolve_layer(layer: int | None, n_layers: int, name: str = "the model") -> int:
    """The decoder layer K where FastV cuts: ``layer`` if given (checked to be in 1..N-1), else 2 as in
    the paper, or N-1 (the last layer with one before it) when the language model has 2 layers or fewer."""
    if layer is None:
        if n_layers < 2:
            raise ValueError(
                f"FastV needs a language model of at least 2 decoder layers (one to score with, one to cut "
                f"from); {name} has {n_layers}: use a cut before the LLM (e.g. tb.VisionZip) instead"
            )
        return min(2, n_layers - 1)
    if not 1 <= layer < n_layers:
        raise ValueError(
            f"FastV(layer={layer}): the language model of {name} has {n_layers} decoder layers; give a layer "
            f"in 1..{n_layers - 1} (layer 0 has nothing to score with), or layer=None for the default"
        )
    return layer


def _wrap(module: nn.Module, name: str, replacement: Any, undo: list) -> None:
    """Set an instance attribute, restoring what the instance held before on undo."""
    had = name in module.__dict__
    previous = module.__dict__.get(name)
    setattr(module, name, replacement)

    def restore() -> None:
        if had:
            setattr(module, name, previous)
        else:
            delattr(module, name)

    undo.append(restore)


def _record_lengths(run: _Run, original: Any) -> Any:
    """``get_image_features`` that also records each image's token count (its pooled features)."""

    @functools.wraps(original)  # generate reads its signature to pick the arguments it passes
    def get_image_features(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        run.image_lengths = _lengths(getattr(out, "pooler_output", None))
        return out

    return get_image_features


def _lengths(pooled: Any) -> list[int] | None:
    """Tokens per image of a VLM's per-image feature list (``None`` when it is not one)."""
    if isinstance(pooled, (list, tuple)) and pooled and all(isinstance(t, torch.Tensor) for t in pooled):
        return [int(t.shape[0]) for t in pooled]
    return None


def _layer_wrapper(
    run: _Run, config: FastV, layer_k: int, layer: nn.Module, idx: int, n_layers: int, original: Any
) -> Any:
    # the class's signature names the positional arguments even when ``original`` is another
    # library's (*args, **kwargs) wrapper (e.g. accelerate's device hooks); drop ``self``
    params = list(inspect.signature(type(layer).forward).parameters.values())[1:]
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    # a layer that gets no mask from the decoder gets one in this format when the cut pads rows
    flash = "flash" in str(getattr(layer.self_attn.config, "_attn_implementation", ""))

    def forward(*args: Any, **kwargs: Any) -> Any:
        call = dict(zip(names, args, strict=False))
        call.update(kwargs)
        hidden = call[names[0]]
        cache = call.get("past_key_values")
        if idx == layer_k:
            _begin(run, config, layer_k, layer, hidden, call, cache)
        if run.mode == "cut":
            if idx == layer_k:
                call[names[0]] = gather_positions(hidden, run.keep, dim=1)
            _slice_prefill(call, run, flash)
        elif run.mode == "continue":
            _slice_decode(call, run, cache, idx, hidden.shape[1], flash)
        out = original(**call)
        if idx == n_layers - 1 and run.mode == "cut":
            out = _scatter_back(out, run)
            _finish(run, layer_k, cache)
        if idx == n_layers - 1:
            run.mode = None
        return out

    return forward


def _cache_len(cache: Any, idx: int) -> int:
    """Entries layer ``idx`` of a cache holds (0 when there is none yet)."""
    layers = getattr(cache, "layers", None)
    if cache is None or layers is None or idx >= len(layers):
        return 0
    kind = type(layers[idx]).__name__
    if kind != "DynamicLayer":
        raise NotImplementedError(
            f"FastV keeps a different number of tokens per layer, which needs a DynamicCache (generate's "
            f"default); layer {idx} of this cache is a {kind}"
        )
    return layers[idx].get_seq_length()


def _begin(
    run: _Run, config: FastV, layer_k: int, layer: nn.Module, hidden: torch.Tensor, call: dict, cache: Any
) -> None:
    """At layer K: decide whether this forward is a prefill to cut, a decode step to slice, or neither."""
    if _cache_len(cache, layer_k) > 0:
        same = run.cache is not None and run.cache() is cache
        run.mode = "continue" if same and run.keep is not None else None
        return
    run.keep, run.valid, run.mode = None, None, None
    mask = run.image_mask
    if mask is None or mask.shape != hidden.shape[:2] or not bool(mask.any()):
        run.state = FastVState(layer_k)  # a prompt without images: nothing cut
        return
    with torch.no_grad():  # a choice of positions: no gradient flows through the scores
        scores = last_row_scores(layer, hidden, call.get("position_embeddings"), call.get("attention_mask"))
    spans = image_spans(mask, run.image_lengths)
    available, counts = [], []
    for b, row in enumerate(spans):  # adaptive spreads within a row, so every row keeps the same total
        sizes = [end - start for start, end in row]
        mass = [float(scores[b, start:end].sum()) for start, end in row]
        available += sizes
        counts += visual_token_counts(config.tokens, sizes, allocation=config.allocation, scores=mass)
    state = FastVState(layer_k, available, counts, [], scores.detach(), None)
    run.state = state
    if counts == available:  # nothing to drop (e.g. tokens=1.0): the layers run exactly as unpatched
        state.kv_visual_tokens = list(counts) if cache is not None else []
        return
    real = run.real if run.real is not None and run.real.shape == mask.shape else None
    # every row keeps its real text tokens + k per image; rows keeping fewer are left-padded
    run.keep, run.valid = left_pack(keep_positions(scores, spans, counts, real))
    run.padded = not bool(run.valid.all())
    run.prompt_len, run.entry, run.mode = hidden.shape[1], hidden, "cut"
    run.cache = weakref.ref(cache) if cache is not None else None
    state.keep = run.keep.masked_fill(~run.valid, -1)


def last_row_scores(
    layer: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """Attention ``(B, L)`` (mean over heads) that each row's last valid token pays every position
    at ``layer``, from the hidden states ``(B, L, D)`` entering it, without running its attention."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    batch, length, _ = x.shape
    rows = torch.arange(batch, device=x.device)
    query_index = _query_index(mask, batch, length, x.device)
    head_dim = attn.head_dim
    q = attn.q_proj(x[rows, query_index]).view(batch, 1, -1, head_dim)
    k = attn.k_proj(x).view(batch, length, -1, head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3/Gemma-style q/k norms act on each head before rope
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if position_embeddings is not None:
        cos, sin = position_embeddings
        cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
        rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
        cq, sq = cos[rows, query_index][:, None], sin[rows, query_index][:, None]
        if rope is not None:  # the model's own rotary function (its layout, its mrope folding)
            q, k = rope(q, q, cq, sq)[0], rope(k, k, cos, sin)[0]
        else:
            q, k = apply_rope(q, cq, sq), apply_rope(k, cos, sin)
    k = repeat_kv_heads(k, q.shape[1] // k.shape[1])
    if mask is None:
        mask_row = None
    elif mask.ndim == 4:
        mask_row = mask[rows, 0, query_index, :length]
    else:  # a 2-D padding mask (flash attention): padding and causality
        mask_row = mask[:, :length].bool() & (torch.arange(length, device=x.device) <= query_index[:, None])
    bias = row_mask_bias(mask_row, query_index, length)
    softcap = getattr(attn, "attn_logit_softcapping", None)  # Gemma-2-style capped logits
    return query_row_attention(q[:, :, 0], k, attn.scaling, bias, softcap=softcap)


def _query_index(mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """``(B,)`` the last position of each row that is a real token (a padded query sees nothing)."""
    if mask is None:
        return torch.full((batch,), length - 1, device=device)
    if mask.ndim == 4:
        steps = torch.arange(length, device=mask.device)
        diag = mask[:, 0, steps, steps]
        valid = diag if diag.dtype == torch.bool else diag.float() > torch.finfo(diag.dtype).min / 2
    else:
        valid = mask[:, :length].bool()
    positions = torch.arange(length, device=device).expand(batch, -1)
    return torch.where(valid.to(device), positions, -1).amax(dim=1).clamp(min=0)


def _slice_positional(call: dict, keep: torch.Tensor, length: int) -> None:
    """cos/sin and position ids of the kept positions (their original positions: 1-D or Qwen's 3-D)."""
    pe = call.get("position_embeddings")
    if pe is not None:
        call["position_embeddings"] = tuple(gather_positions(t, keep, dim=-2, batch_dim=-3) for t in pe)
    ids = call.get("position_ids")
    if isinstance(ids, torch.Tensor) and ids.ndim >= 2 and ids.shape[-1] == length:
        call["position_ids"] = gather_positions(ids, keep, dim=-1, batch_dim=-2)


def _check_mask(mask: Any) -> None:
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise NotImplementedError(
            f"FastV slices tensor attention masks (SDPA, eager, flash attention); this layer got a "
            f"{type(mask).__name__} (e.g. flex attention's BlockMask): load the model with "
            "attn_implementation='sdpa'"
        )


def _slice_prefill(call: dict, run: _Run, flash: bool) -> None:
    """Prefill of layers >= K: the kept positions only, padding slots masked out as keys."""
    keep, valid = run.keep, run.valid
    _slice_positional(call, keep, run.prompt_len)
    mask = call.get("attention_mask")
    _check_mask(mask)
    if mask is None:
        if not run.padded:
            return  # plain causal attention over the kept tokens, as before the cut
        allowed = causal_allowed(valid, keep.shape[1])  # the decoder skipped its causal mask
        mask = valid.long() if flash else allowed
    elif mask.ndim == 4:
        mask = gather_positions(gather_positions(mask, keep, dim=2), keep, dim=-1)
    else:  # a 2-D padding mask (flash attention)
        mask = gather_positions(mask, keep, dim=-1)
    call["attention_mask"] = mask_padding_slots(mask, valid, rows=valid if mask.ndim == 4 else None)


def _slice_decode(call: dict, run: _Run, cache: Any, idx: int, new: int, flash: bool) -> None:
    """Decode step: mask columns of the kept prompt positions plus every later token's; the prompt's
    padding slots stay masked out."""
    mask = call.get("attention_mask")
    _check_mask(mask)
    held = _cache_len(cache, idx)
    later = held + new - run.keep.shape[1]  # tokens after the prompt, the new ones included
    valid = torch.cat([run.valid, run.valid.new_ones(run.valid.shape[0], later)], dim=1)
    if mask is None:
        if run.padded:
            call["attention_mask"] = valid.long() if flash else causal_allowed(valid, new)
        return  # otherwise: attend to the whole (already cut) cache
    width = mask.shape[-1]
    if width - run.prompt_len != later:
        raise RuntimeError(
            f"FastV: layer {idx}'s KV cache holds {held} entries, which does not match a mask of width {width} "
            f"for a prompt of {run.prompt_len} cut to {run.keep.shape[1]}; was the cache edited in between?"
        )
    steps = torch.arange(run.prompt_len, width, device=mask.device).expand(run.keep.shape[0], -1)
    columns = torch.cat([run.keep.to(mask.device), steps], dim=1)
    call["attention_mask"] = mask_padding_slots(gather_positions(mask, columns, dim=-1), valid)


def _scatter_back(out: Any, run: _Run) -> Any:
    """The last layer's output at full prompt length: kept positions from ``out``, the rest as they
    entered layer K (so logits keep their shape; the last token, the one generate reads, is kept)."""
    hidden = out[0] if isinstance(out, tuple) else out
    full = run.entry.to(hidden.device, hidden.dtype).clone()
    rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None].expand_as(run.keep)
    valid = run.valid.to(hidden.device)  # padding slots are not written back
    full[rows[valid], run.keep.to(hidden.device)[valid]] = hidden[valid]
    run.entry = None
    return (full, *out[1:]) if isinstance(out, tuple) else full


def _finish(run: _Run, layer_k: int, cache: Any) -> None:
    state = run.state
    if state is not None and cache is not None and _cache_len(cache, layer_k) == run.keep.shape[1]:
        state.kv_visual_tokens = list(state.visual_tokens)
