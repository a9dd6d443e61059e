"""What every adapter shares: a pre-norm block run with token reduction between attention and MLP.

Framework-free: the adapters (``timm.py``, ``hf.py``, ``openclip.py``) subclass
:class:`ReducingBlockForward` and say only how to run *their* block's two residual branches and how
their attention keys look. The per-forward bookkeeping (state, schedule, proportional attention,
keys for the metric, ``tokens_per_layer``) lives here once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ..context import PatchContext, compiling


class ReducingBlockForward:
    """Instance-level ``forward`` of one pre-norm transformer block, reducing tokens between the
    attention branch and the MLP branch as the strategy says.

    Subclasses implement :meth:`attention_branch` and :meth:`mlp_branch` by calling the block's own
    submodules (never a copy of an upstream forward), and :meth:`call` with the framework's block
    signature, delegating to :meth:`run`.

    A forward enters the patch's :class:`~tokenbudget.context.ForwardGate` at the first block and
    leaves it after the last (or when a block raises), so ``tb.apply`` / ``tb.remove`` in another
    thread wait for it; a forward that reaches a block without having run its predecessors
    through this patch runs that block unreduced (with a warning), never half under one config.
    """

    def __init__(self, block: nn.Module, layer: int, ctx: PatchContext) -> None:
        self.block = block
        self.layer = layer
        self.ctx = ctx
        self.is_last = layer == ctx.num_layers - 1

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if compiling():
            out = self.call(*args, **kwargs)
        else:
            if self.layer == 0 and not self.ctx.gate.enter(blocks=True):
                # The patch was replaced or removed while this forward waited: run what is installed now.
                return self.block.forward(*args, **kwargs)
            try:
                out = self.call(*args, **kwargs)
            except BaseException:
                self._abandon()
                raise
        if out is None:  # reached without its predecessors: the block as it is
            warnings.warn(
                f"block {self.layer} of a patched model ran without blocks 0..{self.layer - 1} of the same "
                "forward in this thread (blocks called from the middle, or a forward that began before "
                "tb.apply); it runs unreduced",
                RuntimeWarning,
                stacklevel=2,
            )
            return type(self.block).forward(self.block, *args, **kwargs)
        return out

    def _abandon(self) -> None:
        self.ctx.abandon()
        self.ctx.gate.leave(blocks=True)

    # -- what an adapter provides ------------------------------------------------------------
    def call(self, *args: Any, **kwargs: Any) -> Tensor | None:
        """The block with the framework's signature; returns :meth:`run`'s output."""
        raise NotImplementedError

    def attention_branch(self, x: Tensor, attn_bias: Tensor | None, **attn_kwargs: Any) -> Tensor:
        """The attention residual branch on tokens ``x`` [B, N, C] (without the residual add).

        ``attn_bias`` is ``None`` or an additive attention bias [B, 1, 1, N] (log token size for
        proportional attention, or the caller's own mask when nothing is reduced); ``attn_kwargs``
        are the framework's other attention arguments, handed through from :meth:`run`.
        """
        raise NotImplementedError

    def mlp_branch(self, x: Tensor) -> Tensor:
        """The MLP residual branch on tokens ``x`` [B, N', C] (without the residual add)."""
        raise NotImplementedError

    def class_attention(self, attn_bias: Tensor | None) -> Tensor:
        """The class token's attention to every token [B, N] (head average) in the attention branch
        that just ran, for strategies that rank tokens by it (``needs_class_attention``)."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot give class attention; attention pruning (tb.Prune, "
            "tb.DynamicViT) is supported on timm models"
        )

    # -- shared ------------------------------------------------------------------------------
    def run(
        self, x: Tensor, user_mask: Any = None, masked: bool = False, **attn_kwargs: Any
    ) -> Tensor | None:
        """Both branches with the reduction between; ``x`` [B, N, C] -> [B, N - r, C]; ``None`` when
        this block was reached without its predecessors (the caller then runs the block unchanged).

        ``user_mask`` is an attention mask the caller passed to the model (any form the framework
        takes); it is handed through unchanged when this forward reduces nothing and refused
        otherwise (it describes the unreduced tokens); ``masked=True`` refuses reduction likewise
        for a mask given another way (e.g. ``is_causal``).
        """
        ctx, layer = self.ctx, self.layer
        strategy = ctx.strategy
        state = ctx.state_for_block(layer, x)  # x: [B, N, C]
        if state is None:
            return None
        # Strategies that act without removing tokens (learned pruning while training) say so.
        acts_at = getattr(strategy, "acts_at", None)
        acts = acts_at(layer, state) if acts_at is not None else state.merged_per_layer[layer] > 0
        if user_mask is not None or masked:
            if any(state.merged_per_layer) or acts:
                raise NotImplementedError(
                    "an attention mask (attn_mask, attention_mask, is_causal) cannot be combined with token "
                    "reduction (the mask is for the "
                    "unreduced tokens); call the model without a mask or use a zero budget"
                )
            attn_bias = user_mask
        elif strategy.prop_attn or state.decision is not None:
            # [B, 1, 1, N]: log(size) and/or log of soft keep decisions; None before any merge
            attn_bias = state.attention_bias(x.dtype)
        elif state.padding is not None:
            # [B, 1, 1, N]: size-0 padding of a ragged batch is masked out even without prop_attn
            attn_bias = state.padding_bias(x.dtype)
        else:
            attn_bias = None
        local = ctx.local
        class_attn = acts and getattr(strategy, "needs_class_attention", False)
        want_keys = local.want_keys = acts and strategy.needs_keys and not class_attn
        local.want_query = class_attn
        x = x + self.attention_branch(x, attn_bias, **attn_kwargs)
        if acts:
            metric = None
            if class_attn:
                metric = self.class_attention(attn_bias)  # [B, N]
                local.want_query = False
            elif want_keys:
                metric = local.keys  # [B, N, d] set by the adapter's key capture
                if metric is None:
                    raise RuntimeError(f"block {layer}: the attention keys were not captured")
                local.keys = None
            local.want_keys = False
            x = strategy.reduce(x, metric, state, layer)  # [B, N - r, C]
        else:
            local.want_keys = False
        for observe in ctx.observers:  # e.g. the entropy profile: tokens entering the MLP
            observe(layer, x, state)
        x = x + self.mlp_branch(x)
        state.tokens_per_layer.append(x.shape[1])
        if self.is_last:
            ctx.finish(state)
            if not compiling():
                ctx.gate.leave(blocks=True)
        return x

    def wants_keys(self) -> bool:
        """True while this thread's current block needs the attention keys."""
        return getattr(self.ctx.local, "want_keys", False)

    def give_keys(self, metric: Tensor) -> None:
        """Hand this thread's current block the ToMe metric [B, N, d] (keys summed over heads)."""
        self.ctx.local.keys = metric


class KeyCapture:
    """Forward hook on the module whose output holds a block's attention keys.

    ``to_metric`` turns that output into ToMe's metric [B, N, d]: the keys summed over heads (the
    cosine similarity that uses them does not see the 1/H of an average). Nothing is computed when
    the block does not need keys.
    """

    def __init__(self, ctx: PatchContext, to_metric: Callable[[Tensor], Tensor]) -> None:
        self.ctx = ctx
        self.to_metric = to_metric

    def __call__(self, module: nn.Module, args: Any, output: Tensor) -> None:
        local = self.ctx.local
        if getattr(local, "want_keys", False):
            local.keys = self.to_metric(output)


def merged_sizes(ctx: PatchContext, x: Tensor) -> Tensor | None:
    """Token sizes [B, N, 1] for tokens ``x`` [B, N, C] that the latest forward of this patched model
    (this thread's) left, or ``None`` when nothing was merged or ``x`` is an unreduced sequence.

    Pooling heads use this to weight averages (and attention pooling) by how many patches each token
    stands for. ``ValueError`` when ``x`` has a token count that no forward of this model produced.
    """
    state = ctx.last_state()
    if state is None or state.size is None:
        return None
    if (x.shape[0], x.shape[1]) == (state.batch_size, state.num_tokens):
        return state.size
    if x.shape[1] != state.input_tokens:
        raise ValueError(
            f"the pooling head got {x.shape[1]} tokens, but the latest forward of this patched model in "
            f"this thread left {state.num_tokens}; pool the features of a forward in the same thread"
        )
    return None  # tokens from an unreduced source: nothing to weight


class GridGuard:
    """Replaces entry points that reshape tokens back to the patch grid (not defined after merging)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"{self.name} reshapes tokens back to the patch grid, which merged tokens no longer fill; "
            "use the model's token output (and tb.last_state(model) for sizes and the source map), or "
            "tb.remove(model) first"
        )
