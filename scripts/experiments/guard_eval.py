"""The entropy guard on the embedded DINOv2: how often it fires, accuracy at aggressive budgets.

For each keep: plain ToMe, ToMe with the guard (``tome-guard``, floor 0.2734 unless --floor), and
plain ToMe at the guard's measured mean FLOPs (equal FLOPs). Classifiers (k-NN k=20, linear probe)
are fit on full-token training features and scored on reduced test features, as in
``tokenbudget eval``. Fashion-MNIST full-token features come from the shared token cache
(``dinov2_fashion_mnist_tokens``, float16); the anomaly set is embedded here.

    PYTHONPATH=src python scripts/experiments/guard_eval.py --data fashion-mnist --n-test 200 --keep 0.05,0.02
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import tokenbudget as tb
from tokenbudget.evaluate.budgets import keep_for_flops_speedup
from tokenbudget.evaluate.features import extract_features
from tokenbudget.evaluate.guard_report import entropy_profile, format_profile, guard_summary
from tokenbudget.evaluate.metrics import cosine_fidelity, knn_accuracy, linear_probe_accuracy


def harness_features(tokens: torch.Tensor) -> torch.Tensor:
    """[N, 2C] class token | mean of the patch tokens, from full tokens [N, T, C]."""
    tokens = tokens.float()
    return torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=1)


def load(args, model):  # noqa: ANN001, ANN201
    from tokenbudget.data.images import model_normalization

    mean, std = model_normalization(model)
    if args.data == "fashion-mnist":
        from tokenbudget.data.fashion_mnist import fashion_mnist_subset, to_model_input
        from tokenbudget.data.token_cache import dinov2_fashion_mnist_tokens

        train_tokens, y_train = dinov2_fashion_mnist_tokens("train", 100)
        test_tokens, y_test = dinov2_fashion_mnist_tokens("test", 50)
        images, labels = fashion_mnist_subset("test", 50, 0)
        assert torch.equal(torch.as_tensor(labels), torch.as_tensor(y_test))
        # a balanced subset of n_test of the 500 cached test images
        per_class = args.n_test // 10
        idx = torch.cat([(torch.as_tensor(y_test) == c).nonzero()[:per_class, 0] for c in range(10)])
        x_test = to_model_input(images[idx.numpy()], 224, mean, std)
        return (
            harness_features(train_tokens),
            torch.as_tensor(y_train),
            harness_features(test_tokens[idx]),
            torch.as_tensor(y_test)[idx],
            x_test,
        )
    from tokenbudget.data.eval_sets import load_eval_data

    data = load_eval_data(args.data, 224, mean, std, n_train=args.n_train, n_test=args.n_test)
    tr = extract_features(model, data.train_images, 32)
    te = extract_features(model, data.test_images, 32)
    return tr, data.train_labels, te, data.test_labels, data.test_images


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--keep", default="0.05,0.02")
    parser.add_argument("--floor", type=float, default=tb.DEFAULT_ENTROPY_FLOOR)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profiles", action="store_true", help="print per-block entropy tables")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = tb.models.dinov2_small().eval()
    t0 = time.time()
    tr, y_tr, te_full, y_te, x_te = load(args, model)
    knn_full = knn_accuracy(tr, y_tr, te_full, y_te, k=20)
    lin_full = linear_probe_accuracy(tr, y_tr, te_full, y_te)
    print(
        f"{args.data}: {len(y_tr)} train / {len(y_te)} test, full tokens k-NN {knn_full:.3f} linear {lin_full:.3f}"
    )
    rows = []

    def run(name: str, config) -> dict:  # noqa: ANN001
        prof = entropy_profile(model, x_te, config, batch_size=25)
        knn = knn_accuracy(tr, y_tr, prof.features, y_te, k=20)
        lin = linear_probe_accuracy(tr, y_tr, prof.features, y_te)
        row = {
            "name": name,
            "keep": config.keep,
            "knn": knn,
            "linear": lin,
            "cosine": cosine_fidelity(prof.features, te_full),
            "final_tokens_mean": float(prof.real_tokens[:, -1].float().mean()),
            **guard_summary(prof, args.floor),
        }
        rows.append(row)
        print(json.dumps(row), f"({time.time() - t0:.0f}s)", flush=True)
        if args.profiles:
            print(format_profile(prof, args.floor), flush=True)
        return row

    for keep in [float(k) for k in args.keep.split(",")]:
        run("tome", tb.ToMe(keep=keep))
        guard = run("tome-guard", tb.ToMe(keep=keep, entropy_floor=args.floor))
        same_flops = keep_for_flops_speedup(model, 1.0 / guard["flops_ratio_mean"])
        run("tome@guard-flops", tb.ToMe(keep=same_flops))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
