"""``tokenbudget eval-vlm``: the answers of a saved transformers VLM when its visual tokens are cut.

    tokenbudget eval-vlm --model DIR --data FILE.jsonl --methods full,visionzip,fastv --tokens 0.5,0.25,64

Each method of ``--methods`` (``full``: the unpatched model; any other name through
``tb.vlm_config(name, budget)``) answers every question at every ``--tokens`` budget, interleaved
batch by batch with the unpatched model; see :mod:`tokenbudget.evaluate.vlm_answers`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from . import options

DEFAULT_METHODS = "full,random,pool,visionzip,select,fastv,tome"
DEFAULT_TOKENS = "0.5,0.25,0.11"

_COUNT = re.compile(r"^\s*\d+\s*$")


def budget_list(text: str) -> list[int | float]:
    """``"0.5,64"`` -> ``[0.5, 64]``: visual-token budgets, each a fraction in (0, 1] of an image's
    tokens or a count >= 1 (written without a decimal point), kept as given."""
    budgets: list[int | float] = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            value: int | float = int(part) if _COUNT.match(part) else float(part)
        except ValueError:
            value = -1
        if isinstance(value, int) and value >= 1 or isinstance(value, float) and 0 < value <= 1:
            budgets.append(value)
        else:
            raise argparse.ArgumentTypeError(
                f"{part.strip()!r} is not a visual-token budget: give a fraction in (0, 1] of each image's "
                "tokens (0.25) or a count >= 1 (64), comma-separated"
            )
    if not budgets:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated budgets such as 0.5,0.25,64, got {text!r}"
        )
    return budgets


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``eval-vlm``."""
    ev = options.add_command(
        sub,
        "eval-vlm",
        cmd_eval_vlm,
        "answer accuracy, visual tokens, time and KV cache of a saved transformers VLM under token cuts",
    )
    ev.add_argument(
        "--model",
        required=True,
        help="a folder written by model.save_pretrained and processor.save_pretrained (loaded offline with "
        "AutoModelForImageTextToText and AutoProcessor)",
    )
    ev.add_argument(
        "--data",
        required=True,
        help="questions: JSONL lines {image, question, answer, kind (optional)} or LLaVA conversation JSON/JSONL "
        "(image paths relative to the file)",
    )
    ev.add_argument(
        "--methods",
        type=options.name_list,
        default=options.name_list(DEFAULT_METHODS),
        help=f"comma list: full (unpatched) and the names tb.vlm_method_names() lists (default: {DEFAULT_METHODS})",
    )
    ev.add_argument(
        "--tokens",
        type=budget_list,
        default=budget_list(DEFAULT_TOKENS),
        help="visual tokens per image reaching the LLM: fractions of each image's tokens (0.25) or counts (64); "
        f"comma list, each method at each (default: {DEFAULT_TOKENS}; full runs once)",
    )
    ev.add_argument(
        "--prompt",
        default=None,
        help="prompt template with {question} and the processor's image token, e.g. '<image> question: "
        "{question} answer:' (default: the processor's chat template)",
    )
    ev.add_argument("--limit", type=int, default=None, help="answer only the first N questions")
    ev.add_argument("--batch-size", type=int, default=8, help="questions per generate call (default 8)")
    ev.add_argument("--max-new-tokens", type=int, default=10, help="longest answer generated (default 10)")
    ev.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    ev.add_argument(
        "--no-timing",
        action="store_true",
        help="skip the extra timed prefill forward per batch and method (no prefill ratio; faster)",
    )
    options.add_out(ev, None, "also write the rows as JSON to this file")
    options.add_run_options(ev)


def _configs(methods: list[str], budgets: list[int | float]) -> list[tuple[str, int | float, object]]:
    """``(name, budget, config)`` for every method but full at every budget (checked before loading)."""
    if not methods:
        raise ValueError("--methods names no method; e.g. --methods full,visionzip")
    rows = []
    for name in dict.fromkeys(methods):
        if name == "full":
            continue
        from ..config.vlm import vlm_config

        for budget in budgets:
            config = vlm_config(name, budget)
            if config is None:
                raise ValueError(f"--methods: {name!r} is the unpatched model; spell it 'full'")
            rows.append((name, budget, config))
    return rows


def cmd_eval_vlm(args: argparse.Namespace) -> int:
    """Answer the questions unpatched and under every method and budget; print the rows."""
    from ..evaluate.vlm_answer_table import format_answer_table
    from ..evaluate.vlm_answers import evaluate_vlm, load_vqa, prompts_for
    from ..models.vlm import load_vlm

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise ValueError("--batch-size and --max-new-tokens must be >= 1")
    if args.prompt is not None and "{question}" not in args.prompt:
        raise ValueError(
            f"--prompt {args.prompt!r} has no {{question}}; e.g. '<image> question: {{question}} answer:'"
        )
    configs = _configs(args.methods, args.tokens)
    items = load_vqa(args.data)[: args.limit]
    model, processor = load_vlm(args.model, device=args.device, progress=not args.quiet)
    prompts_for(processor, [items[0].question], args.prompt)  # a bad template fails before any work
    bar = options.progress((1 + len(configs)) * -(-len(items) // args.batch_size), "eval-vlm", args.quiet)
    try:
        rows = evaluate_vlm(
            model,
            processor,
            items,
            configs,
            prompt=args.prompt,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            timing=not args.no_timing,
            progress=bar.update,
        )
    finally:
        bar.close()
    payload = json.dumps([r.to_dict() for r in rows], indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(payload + "\n")
    if args.json:
        print(payload)
    else:
        print(format_answer_table(rows))
        if args.out:
            print(f"wrote {args.out}", file=sys.stderr)
    return 0
