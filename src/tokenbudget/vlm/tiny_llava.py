"""A small LLaVA built here: the embedded DINOv2-S as its frozen tower, a 2-layer MLP projector and a
small Llama trained from scratch on the shapes VQA set (:mod:`tokenbudget.data.vqa`).

It exists to measure VLM token cuts on answers, end to end and offline; it is not a chat model. Every
part is a stock transformers class (``LlavaForConditionalGeneration`` around ``Dinov2Model`` and
``LlamaForCausalLM``; ``LlavaProcessor`` with a ``BitImageProcessor`` and a word-level
``PreTrainedTokenizerFast``), so ``AutoModelForImageTextToText.from_pretrained(DIR)`` and
``AutoProcessor.from_pretrained(DIR)`` load a saved one offline, and methods see a real LLaVA.

This module builds the processor and the model; :mod:`.tiny_llava_train` caches tower features,
trains, answers and scores.

Choices (all stored in the saved config, none assumed by readers):

- ``vision_feature_layer=-2``: the input of the tower's last block, as LLaVA-1.5 reads its CLIP tower.
  The last block of a self-supervised or contrastive tower is shaped by its pretraining head; the one
  before keeps more local detail, and methods that score tokens in the tower (VisionZip) are
  published against that layer.
- ``vision_feature_select_strategy="default"``: the class token is dropped, so an image gives the LLM
  its (size / patch)^2 patch tokens (256 at 224 px and patch 14); the processor counts them the same way
  (``num_additional_image_tokens=1`` for the class token, minus one under "default").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..models.dinov2 import default_cache_dir

DEFAULT_NAME = "tiny-llava-dinov2"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN)
#: words of the prompt format around the questions (lower-cased by the tokenizer's normalizer)
PROMPT_WORDS = ("user", "assistant", ":")
# USER: <image>\nQUESTION ASSISTANT: ANSWER</s> -- LLaVA-1.5's format, simplified. Content may be a
# string or a list of {"type": "image"} / {"type": "text", "text": ...} parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}</s> "
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - the hf extra is installed in development
        raise ImportError("the tiny LLaVA needs transformers: pip install tokenbudget[hf]") from err
    return transformers


def vlm_dir(name: str = DEFAULT_NAME) -> Path:
    """Where a trained small VLM called ``name`` lives: ``<cache>/vlm/<name>`` (``TOKENBUDGET_CACHE``
    moves the cache)."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"name must be a plain folder name like {DEFAULT_NAME!r}, got {name!r}")
    return default_cache_dir() / "vlm" / name


def build_tokenizer(words: list[str] | tuple[str, ...], max_length: int = 1024) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over :data:`SPECIAL_TOKENS`, :data:`PROMPT_WORDS` and
    ``words`` (lower-cased; split on whitespace and punctuation; unknown words -> ``<unk>``).

    Prepends ``<s>``; pads on the left (generation); decodes by joining words with spaces.
    """
    transformers = _require_transformers()
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab: dict[str, int] = {}
    for word in (*SPECIAL_TOKENS, *PROMPT_WORDS, *sorted({w.lower() for w in words})):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=max_length,
        chat_template=CHAT_TEMPLATE,
    )


def build_processor(vision_config: Any, words: list[str] | tuple[str, ...]) -> Any:
    """A ``LlavaProcessor`` for a tower of ``vision_config`` (a ``Dinov2Config``): images resized to the
    tower's ``image_size`` square (no crop), ImageNet mean/std as DINOv2 was trained, and the image
    token expanded to (image_size / patch_size)^2 patch tokens (class token dropped)."""
    transformers = _require_transformers()
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

    side = int(vision_config.image_size)
    image_processor = transformers.BitImageProcessor(
        size={"height": side, "width": side},
        do_center_crop=False,
        resample=PILImageResampling.BICUBIC,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
    )
    tokenizer = build_tokenizer(words, max_length=(side // int(vision_config.patch_size)) ** 2 + 256)
    return transformers.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=int(vision_config.patch_size),
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the tower's class token (Dinov2 has no register tokens here)
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_llava(
    tower: Any,
    processor: Any,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    vision_feature_layer: int = -2,
    seed: int = 0,
) -> Any:
    """A ``LlavaForConditionalGeneration`` around ``tower`` (a transformers ``Dinov2Model``; its weights
    are copied in and frozen), a fresh projector and a fresh Llama of the given sizes whose vocabulary
    is ``processor``'s tokenizer. ``intermediate_size`` defaults to 4 x ``hidden_size``."""
    transformers = _require_transformers()
    import torch

    if not isinstance(tower, transformers.Dinov2Model):
        raise ValueError(
            f"tower must be a transformers Dinov2Model (tb.models.dinov2_small_hf()), got {type(tower).__name__}"
        )
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})")
    depth = int(tower.config.num_hidden_layers)
    if not -depth <= vision_feature_layer <= depth:
        raise ValueError(
            f"vision_feature_layer must index the tower's {depth + 1} hidden states (-{depth}..{depth}), "
            f"got {vision_feature_layer}"
        )
    tokenizer = processor.tokenizer
    side, patch = int(tower.config.image_size), int(tower.config.patch_size)
    text_config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=int(tokenizer.model_max_length),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,  # a small vocabulary: the output head shares the input embedding
    )
    config = transformers.LlavaConfig(
        vision_config=tower.config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(side // patch) ** 2,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=vision_feature_layer,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config)
    missing = model.model.vision_tower.load_state_dict(tower.state_dict(), strict=True)
    if missing.missing_keys or missing.unexpected_keys:  # pragma: no cover - strict raises first
        raise ValueError(f"tower weights do not fit the LLaVA tower: {missing}")
    model.model.vision_tower.requires_grad_(False)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def save_tiny_llava(model: Any, processor: Any, out: str | os.PathLike[str]) -> Path:
    """``save_pretrained`` of the model and processor into ``out``; returns the folder."""
    folder = Path(out).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def load_tiny_llava(folder: str | os.PathLike[str]) -> tuple[Any, Any]:
    """(model, processor) of a saved folder through the Auto classes, offline; model in eval mode."""
    transformers = _require_transformers()
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no saved VLM at {path}; train one with `tokenbudget train-vlm --out {path}`"
        )
    model = transformers.AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
    processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    return model.eval(), processor


def prompt(processor: Any, question: str) -> str:
    """The generation prompt of one question about one image, from the processor's chat template."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_NAME",
    "IMAGE_TOKEN",
    "build_processor",
    "build_tiny_llava",
    "build_tokenizer",
    "load_tiny_llava",
    "prompt",
    "save_tiny_llava",
    "vlm_dir",
]
