"""Any saved transformers vision-language model, loaded offline, and the few facts about it that an
evaluation needs: its image token, its chat prompt, its end-of-sequence ids, one prefill forward and
the bytes of a generation's KV cache.

This is the framework-reading side of :mod:`tokenbudget.evaluate.vlm_answers`: everything that knows
how transformers names things (``AutoModelForImageTextToText``, a processor's ``image_token``, a
``Cache``'s layers) lives here, so the protocol itself only calls public processor/model APIs.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "chat_prompt",
    "eos_token_ids",
    "image_token",
    "image_token_id",
    "kv_cache_bytes",
    "load_vlm",
    "pad_token_id",
    "prefill",
]

INSTALL_HINT = "pip install 'tokenbudget[hf]'"


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            f"loading a saved vision-language model needs transformers: {INSTALL_HINT}"
        ) from err
    return transformers


def load_vlm(
    path: str | Path, *, device: str | torch.device = "cpu", progress: bool = True
) -> tuple[nn.Module, Any]:
    """A saved transformers VLM and its processor, offline, ready for batched greedy generation.

    Args:
        path: a directory written by ``model.save_pretrained`` and ``processor.save_pretrained``
            (any family ``AutoModelForImageTextToText`` knows: LLaVA, LLaVA-NeXT, Qwen2-VL, ...).
        device: where the model runs.
        progress: show transformers' weight-loading bar.

    Returns:
        ``(model, processor)``: the model in eval mode with SDPA attention on ``device``; the
        processor's tokenizer pads on the left (generation appends on the right, so every prompt
        must end at the last column) and has a pad token (where it had none: its end-of-sequence,
        unknown or first token).
    """
    transformers = _transformers()
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"no model directory at {path}; pass a folder written by model.save_pretrained(...) and "
            "processor.save_pretrained(...)"
        )
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json; is it a folder written by model.save_pretrained(...)?")
    bars = transformers.utils.logging.is_progress_bar_enabled()
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    try:
        model = transformers.AutoModelForImageTextToText.from_pretrained(
            path, local_files_only=True, attn_implementation="sdpa"
        )
    except ValueError as err:
        raise ValueError(
            f"{path} does not hold a vision-language model transformers can load with "
            f"AutoModelForImageTextToText: {err}"
        ) from err
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    try:
        processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{path} has no processor that AutoProcessor can load (save it with processor.save_pretrained "
            f"next to the model): {err}"
        ) from err
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or not hasattr(processor, "image_processor"):
        raise ValueError(
            f"{path}: AutoProcessor gave a {type(processor).__name__}, not a processor of images and text; "
            "save the model's multimodal processor (e.g. LlavaProcessor) next to it"
        )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        # Pad positions are masked out, so any token of the vocabulary pads correctly; adding a new
        # one would give ids the embedding does not have.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.convert_ids_to_tokens(0)
    return model.to(device).eval(), processor


def image_token(processor: Any) -> str:
    """The text of the processor's image placeholder (e.g. ``"<image>"``), which its prompts must hold
    once per image."""
    token = getattr(processor, "image_token", None)
    if not isinstance(token, str) or not token:
        raise ValueError(
            f"{type(processor).__name__} names no image token (processor.image_token); eval-vlm needs a "
            "processor that expands one placeholder per image"
        )
    return token


def image_token_id(processor: Any) -> int:
    """The id of the image token: what ``input_ids`` hold once per visual token the LLM receives."""
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None:
        token_id = processor.tokenizer.convert_tokens_to_ids(image_token(processor))
    return int(token_id)


def chat_prompt(processor: Any, question: str) -> str:
    """The processor's chat template applied to one user turn of one image and ``question``, with the
    assistant's turn opened (``add_generation_prompt=True``)."""
    if not getattr(processor, "chat_template", None):
        raise ValueError(
            f"the processor ({type(processor).__name__}) has no chat template; pass a prompt template "
            f"(eval-vlm: --prompt) with "
            f"{{question}} and its image token {image_token(processor)!r}, e.g. "
            f"'{image_token(processor)} question: {{question}} answer:'"
        )
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)


def eos_token_ids(model: nn.Module, processor: Any) -> set[int]:
    """Every id that ends a generated answer: the generation config's ``eos_token_id`` (an int or a
    list) and the tokenizer's end-of-sequence token."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), processor.tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, Iterable):
            ids.update(int(v) for v in value)
    return ids


def pad_token_id(processor: Any) -> int:
    """The id generation pads finished answers with (the tokenizer's pad token)."""
    return int(processor.tokenizer.pad_token_id)


def prefill(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> Any:
    """One forward over the prompt batch as generation's prefill runs it: with a KV cache, and logits
    of the last position only where the model takes ``logits_to_keep`` (a full-vocabulary logit row
    per prompt position is work generation never does)."""
    kwargs: dict[str, Any] = {"use_cache": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    return model(**batch, **kwargs)


def kv_cache_bytes(past_key_values: Any) -> int:
    """Bytes of the keys and values a generation left in its cache, summed over layers.

    Reads a transformers ``Cache`` (``.layers``, each with ``keys`` / ``values`` tensors of shape
    [B, heads, seq, head_dim]; layers that hold fewer entries, e.g. after an in-LLM cut, count what
    they hold) or the legacy tuple of ``(key, value)`` pairs.
    """
    if past_key_values is None:
        raise ValueError(
            "generate returned no KV cache (past_key_values); the model must generate with use_cache=True"
        )
    layers = getattr(past_key_values, "layers", None)
    pairs = (
        [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in layers]
        if layers is not None
        else list(past_key_values)
    )
    total = 0
    for pair in pairs:
        for tensor in pair:
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total
