"""Model-quality experiments: train with the pipeline's own code, report test accuracy and speed.

    python -m bench.train_quality --sample ../shared/gtsrb-sample --arch lp,signnet --epochs 3,15
    python -m bench.train_quality --data-dir /tmp/m/data --arch signnet --epochs 15 --seeds 0,1,2 --set lr=0.002
    python -m bench.train_quality --data-dir /tmp/m/data --tile 22 --epochs 1     # time ~39k-image epochs

``--data-dir`` is a preprocessed directory (train.pt / test.pt); ``--sample`` ingests and
preprocesses a torchvision GTSRB root into a temporary directory first. ``--tile N`` repeats the
training images N times (each copy as new tracks) to time full-size epochs: its accuracy is
meaningless, its images/s is what a ~39k-image training run gets. Test accuracy is measured on
the test split, which training never sees. Prints one line per run and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch

from components.model import load_model_artifact
from components.preprocess import load_split, split_path
from components.train import RECIPES, TrainConfig, accuracy, train_model

FULL_TRAIN_IMAGES = 39_209   # GTSRB's training split; the time budget is for all of it
TRACK_STRIDE = 10 ** 8       # tiled copies get track ids copy * TRACK_STRIDE + track


def prepare_sample(root: str, work: Path) -> Path:
    from components.ingest import ingest_dataset
    from components.preprocess import preprocess_dataset

    ingest_dataset(root, str(work / "raw"))
    preprocess_dataset(str(work / "raw"), str(work / "data"))
    return work / "data"


def tile_train(data_dir: Path, copies: int, work: Path) -> Path:
    """A data dir whose train split is ``copies`` copies of the original, each copy new tracks."""
    train = load_split(data_dir, "train")
    out = work / f"tiled{copies}"
    out.mkdir(parents=True, exist_ok=True)
    offsets = torch.arange(copies).repeat_interleave(len(train["labels"])) * TRACK_STRIDE
    torch.save({"images": train["images"].repeat(copies, 1, 1, 1), "labels": train["labels"].repeat(copies),
                "tracks": train["tracks"].repeat(copies) + offsets,
                "class_counts": train["class_counts"] * copies}, split_path(out, "train"))
    os.symlink(split_path(data_dir, "test").resolve(), split_path(out, "test"))
    return out


def parse_overrides(items: list[str]) -> dict:
    """``key=value`` pairs; values parsed as JSON when possible (numbers, true/false), else strings."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def run_one(data_dir: Path, test: dict, work: Path, config: TrainConfig) -> dict:
    out = work / f"model-{config.arch}-{config.epochs}-{config.seed}"
    train_model(str(data_dir), str(out), config)
    model, card = load_model_artifact(out)
    norm, training = card["normalization"], card["training"]
    return {"arch": config.arch, "epochs": config.epochs, "seed": config.seed, "overrides": config.overrides,
            "test_accuracy": accuracy(model, test["images"], test["labels"], norm["mean"], norm["std"]),
            "val_accuracy": training["val_accuracy"], "best_epoch": training["best_epoch"],
            "train_images": card["data"]["train_images"], "val_images": card["data"]["val_images"],
            "epoch_images_per_second": statistics.median(h["images_per_second"] for h in training["history"]),
            "images_per_second": training["images_per_second"], "wall_seconds": training["wall_seconds"],
            "flops_per_image": card["flops_per_image"], "parameters": card["parameters"],
            "loadavg": os.getloadavg()[0]}


def extrapolate(result: dict) -> float:
    """Seconds to train ``result``'s epochs on all of GTSRB at its measured overall images/s."""
    share = result["train_images"] / (result["train_images"] + result["val_images"])
    return FULL_TRAIN_IMAGES * share * result["epochs"] / result["images_per_second"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", help="preprocessed directory with train.pt and test.pt")
    source.add_argument("--sample", help="torchvision GTSRB root to ingest + preprocess first")
    parser.add_argument("--arch", default=",".join(RECIPES), help="comma-separated architectures")
    parser.add_argument("--epochs", default="3", help="comma-separated epoch counts")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe parameter (repeatable)")
    parser.add_argument("--tile", type=int, default=1, help="repeat the training split N times (timing)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--val-fraction", type=float,
                        help="share of training tracks held out for validation (default: the recipe's; 0 = train "
                             "on all, keep the last epoch)")
    parser.add_argument("--time-budget", type=float, default=TrainConfig.time_budget,
                        help="seconds (0 = unlimited: for accuracy experiments on a busy machine)")
    parser.add_argument("--json", help="append one JSON line per run to this file")
    args = parser.parse_args(argv)

    results = []
    with tempfile.TemporaryDirectory(prefix="train-quality-") as tmp:
        work = Path(tmp)
        data_dir = prepare_sample(args.sample, work) if args.sample else Path(args.data_dir)
        if args.tile > 1:
            data_dir = tile_train(data_dir, args.tile, work)
        overrides = parse_overrides(args.set)
        test = load_split(data_dir, "test")
        for arch in args.arch.split(","):
            for epochs in map(int, args.epochs.split(",")):
                for seed in map(int, args.seeds.split(",")):
                    config = TrainConfig(arch=arch, epochs=epochs, seed=seed, threads=args.threads,
                                         time_budget=args.time_budget, val_fraction=args.val_fraction,
                                         overrides=overrides)
                    result = run_one(data_dir, test, work, config)
                    results.append(result)
                    print("train_quality:", json.dumps(result), flush=True)
                    if args.json:
                        with open(args.json, "a") as f:
                            f.write(json.dumps(result) + "\n")
    print_table(results)
    return 0


def print_table(results: list[dict]) -> None:
    print("\n| arch | epochs | seed | test acc % | val acc % (best epoch) | train img/s | "
          "39k-image extrapolation s | MFLOPs/img | params | load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        val = "-" if r["val_accuracy"] is None else f"{r['val_accuracy']:.2f}"
        print(f"| {r['arch']} | {r['epochs']} | {r['seed']} | {r['test_accuracy']:.2f} | "
              f"{val} ({r['best_epoch']}) | {r['epoch_images_per_second']:.0f} | "
              f"{extrapolate(r):.0f} | {r['flops_per_image'] / 1e6:.1f} | {r['parameters']} | {r['loadavg']:.1f} |")


if __name__ == "__main__":
    raise SystemExit(main())
