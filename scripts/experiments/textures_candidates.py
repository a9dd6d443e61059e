"""Screen reducer candidates on one dataset at one FLOPs-ideal speedup (for choosing Auto's design).

Each candidate is a JSON config without a budget (the budget is the ``keep`` that gives the
speedup); ``random`` is random drop averaged over seeds 0-2. Prints k-NN (harness feature and
class token alone, with binomial standard errors), cosine to full features, the bias diagnostic
(largest |fraction| of a class gap covered by the mean shift) and, for datasets with the texture
classes, the shift of nominal and local images towards ``global`` and the k-NN confusion matrix.

Choose on ``textures-val`` (its own generator seed) or train splits, never on the test sets.

    PYTHONPATH=src python scripts/experiments/textures_candidates.py --data textures-val --speedup 2 \\
        --candidates tome,random,pool,'{"method": "auto", "merge": "moment"}'
"""

from __future__ import annotations

import argparse
import json

import torch
from textures_lib import HEADER, Scorer, format_row, keeps, knn_predictions, load_data

import tokenbudget as tb
from tokenbudget.evaluate.shift import feature_shift


def parse_candidates(text: str) -> list[str]:
    """Comma-separated names or JSON objects (commas inside braces do not split)."""
    out, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            out.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        out.append(current.strip())
    return out


def label_of(spec: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in spec.items() if k != "method") or spec["method"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="textures-val")
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--n-test", type=int, default=300)
    parser.add_argument("--speedup", type=float, default=2.0)
    parser.add_argument("--candidates", default="tome,random,pool")
    parser.add_argument("--linear", action="store_true", help="also fit the linear probe")
    parser.add_argument(
        "--seed", type=int, default=0, help="data seed (skimage: another seed crops other windows)"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = tb.models.dinov2_small().eval()
    data = load_data(args.data, model, args.n_train, args.n_test, args.seed)
    scorer = Scorer(model, data, linear=args.linear)
    keep = keeps(model, [args.speedup])[args.speedup]
    textures = args.data.startswith("textures")
    print(f"{data.name}: {len(data.train_labels)} train / {len(data.test_labels)} test, "
          f"FLOPs-ideal {args.speedup}x (keep {keep}), k-NN k={scorer.k}")  # fmt: skip
    extra = "  nom->glob loc->glob  confusion (rows true, cols predicted)" if textures else ""
    print(f"{HEADER}{extra}")

    def texture_columns(tests: list[torch.Tensor]) -> str:
        """Shift towards global of nominal and local images (mean over ``tests``, e.g. seeds) and
        the k-NN confusion matrix summed over them."""
        if not textures:
            return ""
        nom = loc = 0.0
        confusion = torch.zeros(3, 3, dtype=torch.long)
        for test in tests:
            report = feature_shift(scorer.train, data.train_labels, scorer.test_full, test, data.test_labels)
            nom += report.pair(0, 2, true_class=0).fraction / len(tests)
            loc += report.pair(1, 2, true_class=1).fraction / len(tests)
            pred = knn_predictions(scorer.train, data.train_labels, test, scorer.k)
            confusion.index_put_((data.test_labels, pred), torch.ones_like(pred), accumulate=True)
        return f"  {nom:>+9.3f} {loc:>+9.3f}  {confusion.tolist()}"

    print(format_row(scorer.full) + texture_columns([scorer.test_full]), flush=True)
    for text in parse_candidates(args.candidates):
        if text == "random":
            configs = [tb.RandomDrop(keep=keep, seed=s) for s in range(3)]
            row = scorer.score_mean("random (3 seeds)", configs)
            print(format_row(row) + texture_columns([scorer.features(c) for c in configs]), flush=True)
            continue
        spec = json.loads(text) if text.startswith("{") else {"method": text}
        config = tb.config_from_dict({**spec, "keep": keep})
        test = scorer.features(config)
        row = scorer.score(label_of(spec)[:22], config)
        print(format_row(row) + texture_columns([test]), flush=True)


if __name__ == "__main__":
    main()
