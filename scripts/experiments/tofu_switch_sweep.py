"""ToFu's switch layer on the embedded DINOv2: fidelity and k-NN accuracy per switch layer.

switch_layer=0 merges (MLERP) in every block, switch_layer >= depth prunes in every block; ToMe
(plain size-weighted average) is the reference. Usage:

    PYTHONPATH=src python scripts/experiments/tofu_switch_sweep.py --data skimage --keep 0.25,0.05 --switch 0,3,6,12
"""

from __future__ import annotations

import argparse

import torch

import tokenbudget as tb
from tokenbudget.data.eval_sets import load_eval_data
from tokenbudget.data.images import model_normalization
from tokenbudget.evaluate.features import extract_features
from tokenbudget.evaluate.metrics import cosine_fidelity, knn_accuracy
from tokenbudget.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="skimage")
    parser.add_argument("--keep", default="0.25,0.05")
    parser.add_argument("--switch", default="0,3,6,12")
    parser.add_argument("--n-train", type=int, default=500)
    parser.add_argument("--n-test", type=int, default=300)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model("dinov2_small")
    data = load_eval_data(
        args.data,
        int(model.patch_embed.img_size[0]),
        *model_normalization(model),
        n_train=args.n_train,
        n_test=args.n_test,
    )
    train_full = extract_features(model, data.train_images)
    test_full = extract_features(model, data.test_images)
    k = min(args.k, len(data.train_labels))

    def score(config: tb.ReductionConfig) -> str:
        tb.apply(model, config)
        try:
            test = extract_features(model, data.test_images)
        finally:
            tb.remove(model)
        knn = knn_accuracy(train_full, data.train_labels, test, data.test_labels, k=k)
        return f"cosine {cosine_fidelity(test, test_full):.4f}  k-NN {knn:.3f}"

    full_knn = knn_accuracy(train_full, data.train_labels, test_full, data.test_labels, k=k)
    print(
        f"{args.data}: {len(data.train_labels)} train, {len(data.test_labels)} test; full k-NN {full_knn:.3f}"
    )
    for keep in (float(v) for v in args.keep.split(",")):
        print(f"keep={keep}  tome                  {score(tb.ToMe(keep=keep))}")
        for switch in (int(v) for v in args.switch.split(",")):
            print(
                f"keep={keep}  tofu switch_layer={switch:<3} {score(tb.ToFu(keep=keep, switch_layer=switch))}"
            )


if __name__ == "__main__":
    main()
