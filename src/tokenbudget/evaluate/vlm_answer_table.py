"""The rows of :func:`~tokenbudget.evaluate.vlm_answers.evaluate_vlm` as a fixed-width text table."""

from __future__ import annotations

from collections.abc import Sequence

from .vlm_answers import AnswerRow

__all__ = ["format_answer_table"]


def _num(value: float | None, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def format_answer_table(rows: Sequence[AnswerRow]) -> str:
    """One line per row: accuracy ± SE, relative to full, accuracy per question kind, visual tokens
    per image, prefill and generate time against full, KV cache per question (MB) and against full,
    generate seconds per question."""
    kinds = list(dict.fromkeys(k for r in rows for k in r.per_kind))
    header = (
        f"{'method':<12} {'tokens':>6} {'n':>5} {'accuracy':>13} {'rel':>6} "
        + "".join(f"{k[:10]:>11}" for k in kinds)
        + f" {'visual':>7} {'prefill':>8} {'generate':>9} {'KV MB/q':>8} {'KV':>6} {'s/q':>7}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        if r.error is not None:
            lines.append(f"{r.method:<12} {str(r.tokens):>6}  not run: {r.error}")
            continue
        accuracy = f"{r.accuracy:.3f}±{r.se:.3f}"
        tokens = "all" if r.method == "full" else str(r.tokens)
        lines.append(
            f"{r.method:<12} {tokens:>6} {r.n:>5} {accuracy:>13} {_num(r.relative, '.3f', 6)} "
            + "".join(
                f"{r.per_kind[k]['accuracy']:>11.3f}" if k in r.per_kind else f"{'-':>11}" for k in kinds
            )
            + f" {r.visual_tokens:>7.1f} {_num(r.prefill_ratio, '.2f', 7)}x {_num(r.generate_ratio, '.2f', 8)}x "
            f"{r.kv_bytes / 2**20:>8.3f} {r.kv_ratio:>5.2f}x {r.seconds_per_question:>7.3f}"
        )
    return "\n".join(lines)
