"""Step 3 — train: a plain PyTorch training loop on the preprocessed uint8 tensors.

Validation images are whole GTSRB tracks (~30 frames of one physical sign) held out from
training, so validation accuracy is honest; the best epoch on validation is kept.
Augmentation runs on whole batches (affine warp + brightness/contrast), never per-image PIL.
"""


import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.kfp_step import step
from components.model import DEFAULT_ARCH, FIXED_NORMALIZATION, build_model, count_flops, normalize, save_model_artifact
from components.preprocess import load_split
from components.runtime import set_threads

# Per-architecture defaults. `lp` keeps the learning path's recipe for comparability.
RECIPES = {
    "lp": dict(optimizer="adam", lr=1e-3, batch_size=64, weight_decay=0.0, augment=False,
               label_smoothing=0.0, schedule="constant"),
    "signnet": dict(optimizer="adamw", lr=3e-3, batch_size=128, weight_decay=5e-4, augment=True,
                    label_smoothing=0.1, schedule="onecycle"),
}


@dataclass
class TrainConfig:
    arch: str = DEFAULT_ARCH
    epochs: int = 15
    seed: int = 0
    val_fraction: float = 0.1
    patience: int = 0              # 0 = no early stopping; keep the best epoch anyway
    threads: int = 0               # 0 = all CPUs available to this process
    overrides: dict = field(default_factory=dict)  # any RECIPES key

    def recipe(self) -> dict:
        if self.arch not in RECIPES:
            raise ValueError(f"no training recipe for architecture {self.arch!r}; known: {sorted(RECIPES)}")
        unknown = set(self.overrides) - set(RECIPES[self.arch])
        if unknown:
            raise ValueError(f"unknown training parameter(s) {sorted(unknown)}")
        return {**RECIPES[self.arch], **self.overrides}


def split_by_track(tracks: torch.Tensor, labels: torch.Tensor, fraction: float,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tensors (train, val). ``fraction`` of all tracks (whole physical signs) go to
    validation, drawn only from classes that keep at least one other track for training."""
    pairs = torch.stack([labels, tracks], 1).unique(dim=0)          # (label, track) per track
    per_class = torch.bincount(pairs[:, 0], minlength=int(labels.max()) + 1)
    eligible = pairs[per_class[pairs[:, 0]] >= 2]
    n_val = min(round(fraction * len(pairs)), len(eligible))
    chosen, taken = [], torch.zeros_like(per_class)
    for i in torch.randperm(len(eligible), generator=generator).tolist():
        label, track = eligible[i].tolist()
        if len(chosen) < n_val and taken[label] + 1 < per_class[label]:
            chosen.append(track)
            taken[label] += 1
    is_val = torch.isin(tracks, torch.tensor(chosen, dtype=tracks.dtype))
    return (~is_val).nonzero().squeeze(1), is_val.nonzero().squeeze(1)


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    x = images.float().div_(255.0)
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Batch augmentation on normalized images: small rotation/scale/shift (no flips — they
    change a sign's meaning) and brightness/contrast jitter."""
    n = x.shape[0]

    def uniform(low, high):
        return torch.rand(n, generator=generator) * (high - low) + low

    angle = uniform(-12, 12) * math.pi / 180
    scale = uniform(0.9, 1.1)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, uniform(-0.1, 0.1)], 1),
                         torch.stack([sin, cos, uniform(-0.1, 0.1)], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    contrast = uniform(0.7, 1.3).view(n, 1, 1, 1)
    brightness = uniform(-0.4, 0.4).view(n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * contrast + mean + brightness


@torch.no_grad()
def accuracy(model, images: torch.Tensor, labels: torch.Tensor, mean, std, batch: int = 512) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        logits = model(normalize(images[i:i + batch], mean, std))
        correct += (logits.argmax(1) == labels[i:i + batch]).sum().item()
    return 100.0 * correct / max(1, len(images))


def _optimizer(model, recipe: dict, steps: int):
    params = model.parameters()
    if recipe["optimizer"] == "adam":
        opt = torch.optim.Adam(params, lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    elif recipe["optimizer"] == "adamw":
        opt = torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    elif recipe["optimizer"] == "sgd":
        opt = torch.optim.SGD(params, lr=recipe["lr"], momentum=0.9, nesterov=True,
                              weight_decay=recipe["weight_decay"])
    else:
        raise ValueError(f"unknown optimizer {recipe['optimizer']!r}")
    if recipe["schedule"] == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"], total_steps=max(1, steps))
    elif recipe["schedule"] == "constant":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    else:
        raise ValueError(f"unknown schedule {recipe['schedule']!r}")
    return opt, sched


def train_model(data_dir: str, output_dir: str, config: TrainConfig = TrainConfig(), on_epoch=None) -> dict:
    """Train, keep the best validation epoch, write weights + model card to ``output_dir``.

    ``on_epoch(epoch, stats)`` is called after every epoch (the KFP wrapper logs Metrics there).
    Returns the model card.
    """
    recipe = config.recipe()
    threads = set_threads(config.threads or None)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)

    data = load_split(data_dir, "train")
    images, labels = data["images"], data["labels"]
    train_idx, val_idx = split_by_track(data["tracks"], labels, config.val_fraction, gen)
    mean, std = FIXED_NORMALIZATION.get(config.arch) or channel_stats(images[train_idx])
    x_val, y_val = images[val_idx], labels[val_idx]

    model = build_model(config.arch)
    batch = recipe["batch_size"]
    steps_per_epoch = math.ceil(len(train_idx) / batch)
    opt, sched = _optimizer(model, recipe, steps_per_epoch * config.epochs)
    print(f"train: {config.arch}, {len(train_idx)} train / {len(val_idx)} val images "
          f"({len(data['tracks'][val_idx].unique())} held-out tracks), {config.epochs} epochs, "
          f"{threads} threads, recipe {recipe}", flush=True)

    best = {"val_accuracy": -1.0, "epoch": 0, "state": None}
    history, seen, start = [], 0, time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        model.train()
        epoch_start, total_loss, correct = time.perf_counter(), 0.0, 0
        order = train_idx[torch.randperm(len(train_idx), generator=gen)]
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            x, y = normalize(images[idx], mean, std), labels[idx]
            if recipe["augment"]:
                x = augment(x, gen)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=recipe["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
            correct += (logits.argmax(1) == y).sum().item()
        seen += len(order)
        seconds = time.perf_counter() - epoch_start
        stats = {"train_loss": total_loss / len(order), "train_accuracy": 100.0 * correct / len(order),
                 "val_accuracy": accuracy(model, x_val, y_val, mean, std) if len(val_idx) else float("nan"),
                 "images_per_second": len(order) / seconds, "seconds": seconds}
        history.append({"epoch": epoch, **stats})
        print(f"train: epoch {epoch}/{config.epochs} loss {stats['train_loss']:.4f} "
              f"train acc {stats['train_accuracy']:.2f}% val acc {stats['val_accuracy']:.2f}% "
              f"({stats['images_per_second']:.0f} img/s, {seconds:.1f}s)", flush=True)
        if on_epoch:
            on_epoch(epoch, stats)
        score = stats["val_accuracy"] if len(val_idx) else float(epoch)
        if score > best["val_accuracy"]:
            best = {"val_accuracy": score, "epoch": epoch,
                    "state": {k: v.clone() for k, v in model.state_dict().items()}}
        elif config.patience and epoch - best["epoch"] >= config.patience:
            print(f"train: early stop, no val improvement for {config.patience} epochs", flush=True)
            break
    wall = time.perf_counter() - start
    model.load_state_dict(best["state"])
    model.eval()

    card = {
        "architecture": config.arch,
        "normalization": {"mean": list(mean), "std": list(std)},
        "flops_per_image": count_flops(model),
        "parameters": sum(p.numel() for p in model.parameters()),
        "training": {**asdict(config), "recipe": recipe, "threads": threads,
                     "best_epoch": best["epoch"], "epochs_run": len(history),
                     "val_accuracy": best["val_accuracy"] if len(val_idx) else None,
                     "wall_seconds": round(wall, 2), "images_per_second": round(seen / wall, 1),
                     "history": history},
        "data": {"train_images": len(train_idx), "val_images": len(val_idx),
                 "val_tracks": len(data["tracks"][val_idx].unique()),
                 "class_counts": data["class_counts"].tolist()},
    }
    card = save_model_artifact(output_dir, model, card)
    print(f"train: done in {wall:.1f}s ({seen / wall:.0f} img/s), best epoch {best['epoch']} "
          f"val acc {card['training']['val_accuracy']}", flush=True)
    return card


@step("train")
def train(data: Input[Dataset], arch: str, epochs: int, seed: int, model: Output[Model],
          metrics: Output[Metrics]):
    """Train with a seed; per-epoch metrics; weights + model card as the Model artifact."""
    from components.train import TrainConfig, train_model

    def log(epoch, stats):
        for key in ("train_loss", "train_accuracy", "val_accuracy"):
            metrics.log_metric(f"epoch{epoch:03d}_{key}", round(stats[key], 4))

    card = train_model(data.path, model.path, TrainConfig(arch=arch, epochs=epochs, seed=seed), on_epoch=log)
    metrics.log_metric("best_val_accuracy", card["training"]["val_accuracy"] or 0.0)
    metrics.log_metric("train_wall_seconds", card["training"]["wall_seconds"])
    metrics.log_metric("train_images_per_second", card["training"]["images_per_second"])
    model.metadata.update(architecture=card["architecture"], weights_sha256=card["weights_sha256"],
                          flops_per_image=card["flops_per_image"])
