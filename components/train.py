"""Step 3 — train: a plain PyTorch training loop on the preprocessed uint8 tensors.

Where the recipe holds a validation split (``val_fraction``; `lp`), its images are whole GTSRB
tracks (~30 frames of one physical sign) held out from training, so validation accuracy is
honest, and the best epoch on validation is kept; without one (`signnet`), every track trains and
the last epoch is kept. Augmentation (over-exposure, exposure curve, colour balance, small
rotations/zooms/shifts: :func:`augment`) runs
on whole batches, never per-image PIL. The run's length is the recipe's number of images seen
unless ``epochs`` is given; the learning-rate schedule switches from step progress to time
progress when the run would overrun its time budget, so training ends on time even on a slow
or busy machine (:class:`Clock`).
"""


import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.kfp_step import step
from components.model import (
    DEFAULT_ARCH,
    FIXED_NORMALIZATION,
    build_model,
    count_flops,
    normalize,
    save_calibration_sample,
    save_model_artifact,
    standardize,
)
from components.preprocess import load_split
from components.runtime import set_threads

# Per-architecture defaults. `lp` keeps the learning path's recipe for comparability.
# train_images: the training length when TrainConfig.epochs is 0 (the default), in images seen, so the
# same recipe means the same number of optimizer steps on any data size: 14 epochs of gtsrb-dev's 22.6k
# training images, 8 of full GTSRB's 39.2k. val_fraction: the share of training tracks held out to pick
# the kept epoch; signnet holds none out (its one-cycle schedule always ended on the kept epoch, and the
# 10 % more tracks tested better), so it keeps the last epoch. The recipe and what was tried: docs/model.md.
RECIPES = {
    "lp": dict(optimizer="adam", lr=1e-3, batch_size=64, weight_decay=0.0, augment=False,
               label_smoothing=0.0, schedule="constant", train_images=250_000, val_fraction=0.1),
    "signnet": dict(optimizer="adamw", lr=3e-3, batch_size=128, weight_decay=5e-4, augment=True,
                    label_smoothing=0.1, schedule="onecycle", train_images=300_000, val_fraction=0.0,
                    overexpose=0.2, gamma=2.0, rotate=10.0, scale=0.1, translate=0.1),
}
AUGMENTATIONS = ("overexpose", "gamma", "rotate", "scale", "translate")     # augment()'s keyword arguments


SCHEDULES = ("constant", "onecycle")
WARMUP = 0.25   # onecycle: share of training spent warming up from lr/25 to lr


@dataclass
class TrainConfig:
    arch: str = DEFAULT_ARCH
    epochs: int = 0                # 0 = the recipe's length (train_images), whatever the data size
    seed: int = 0
    val_fraction: float | None = None   # None = the recipe's (signnet trains on every track: 0)
    patience: int = 0              # 0 = no early stopping; keep the best epoch anyway
    threads: int = 0               # 0 = all CPUs available to this process
    # Seconds from the start of training (data loading included) to the end of the last epoch;
    # 0 = unlimited. Leaves ~60 s of a 300 s train step for process start-up and saving.
    time_budget: float = 240.0
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


MAX_PLANNED_EPOCHS = 30   # epochs=0 on a small data set (the 1.6k-image sample): at most this many


def planned_epochs(train_images: int, available: int) -> int:
    """Epochs that show the network at least ``train_images`` images (the recipe's length), at most
    MAX_PLANNED_EPOCHS."""
    return min(MAX_PLANNED_EPOCHS, max(1, math.ceil(train_images / max(1, available))))


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    x = images.float().div_(255.0)
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()


OVEREXPOSE_STOPS = (1.0, 3.5)   # augment(): over-exposure range, in stops (factors 2 to 11.3)


def augment(images: torch.Tensor, mean, std, generator: torch.Generator, overexpose: float = 0.0,
            gamma: float = 0.0, rotate: float = 0.0, scale: float = 0.0, translate: float = 0.0) -> torch.Tensor:
    """uint8 batch -> normalized, augmented float batch, every image drawn independently:

    - over-exposure: with probability ``overexpose``, the image times 2 ** s, s uniform in
      OVEREXPOSE_STOPS, clipped to [0, 1] and re-quantized to 8 bits (blown-out signs whose red
      ring has turned white: what neither per-image standardization nor the gamma curve makes);
    - exposure: a gamma curve x ** g on [0, 1] pixels, g = gamma ** u, u uniform in [-1, 1]
      (dark and washed-out signs; SignNet's ImageStandardize undoes linear brightness and
      contrast changes, not this one);
    - colour balance: each channel times a gain in 0.85-1.15 (cameras, daylight);
    - geometry: rotation by up to ±``rotate`` degrees, zoom by up to ±``scale``, shift by up to
      ±``translate`` of the image size (bilinear, border pixels repeated).
    Never a flip: it would change a sign's meaning (keep left / keep right).
    """
    n = images.shape[0]
    x = images.float().div_(255.0)
    if overexpose:
        blown = torch.rand(n, 1, 1, 1, generator=generator) < overexpose
        low, high = OVEREXPOSE_STOPS
        stops = torch.where(blown, low + torch.rand(n, 1, 1, 1, generator=generator) * (high - low), torch.zeros(()))
        x = x.mul_(torch.pow(2.0, stops)).clamp_(0.0, 1.0).mul_(255.0).round_().div_(255.0)
    if gamma:
        x = x.pow_(torch.tensor(gamma).pow(torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1))
    x = standardize(x, mean, std)
    x = x * (torch.rand(n, x.shape[1], 1, 1, generator=generator) * 0.3 + 0.85)
    if rotate or scale or translate:
        u = torch.rand(n, 4, generator=generator) * 2 - 1
        angle = u[:, 0] * math.radians(rotate)
        zoom = 1 + u[:, 1] * scale
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        grid = _affine_grid(cos, sin, u[:, 2] * 2 * translate, u[:, 3] * 2 * translate, x.shape[-2], x.shape[-1])
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return x


def _affine_grid(cos, sin, tx, ty, height: int, width: int) -> torch.Tensor:
    """``F.affine_grid`` for rotation+zoom+shift (same grid, align_corners=False), written as broadcast
    arithmetic instead of affine_grid's batched matmul, which is slow on CPU for 32x32 images."""
    ys = (torch.arange(height, dtype=torch.float32) * 2 + 1) / height - 1
    xs = (torch.arange(width, dtype=torch.float32) * 2 + 1) / width - 1
    yy, xx = ys.view(1, -1, 1), xs.view(1, 1, -1)
    c, s, tx, ty = (v.view(-1, 1, 1) for v in (cos, sin, tx, ty))
    return torch.stack([c * xx - s * yy + tx, s * xx + c * yy + ty], -1)


@torch.no_grad()
def accuracy(model, images: torch.Tensor, labels: torch.Tensor, mean, std, batch: int = 512) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        logits = model(normalize(images[i:i + batch], mean, std).contiguous(memory_format=torch.channels_last))
        correct += (logits.argmax(1) == labels[i:i + batch]).sum().item()
    return 100.0 * correct / max(1, len(images))


def _optimizer(model, recipe: dict) -> torch.optim.Optimizer:
    params = model.parameters()
    if recipe["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    if recipe["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    if recipe["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=recipe["lr"], momentum=0.9, nesterov=True,
                               weight_decay=recipe["weight_decay"])
    raise ValueError(f"unknown optimizer {recipe['optimizer']!r}")


def lr_factor(schedule: str, progress: float) -> float:
    """Learning-rate multiplier ``progress`` (0..1) of the way through training.

    onecycle: linear warm-up from 1/25 over the first WARMUP, then cosine annealing to 0.
    """
    if schedule == "constant":
        return 1.0
    if schedule == "onecycle":
        if progress < WARMUP:
            return 0.04 + 0.96 * progress / WARMUP
        return 0.5 * (1.0 + math.cos(math.pi * (progress - WARMUP) / (1.0 - WARMUP)))
    raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")


class Clock:
    """Training progress in [0, 1]; the learning-rate schedule follows it and training stops at 1.

    Progress is steps done / steps planned, so where the planned epochs fit in ``budget`` a run is
    reproducible: same data, same seed, same weights. Once enough steps have run to project the
    finish (at least 10, and 5 % of the plan or of the budget) and the projection overruns the
    budget, progress becomes the larger of that and seconds spent / ``budget`` for the rest of the
    run: on a slow or busy machine a run ends within its budget with a fully annealed model (fewer
    epochs, not a schedule cut short). ``out_of_time`` stops training at the budget in any case.
    """

    def __init__(self, total_steps: int, budget: float = 0.0, start: float | None = None):
        self.total_steps, self.budget, self.steps = max(1, total_steps), budget, 0
        self.start = time.perf_counter() if start is None else start
        self.by_time = False                     # switched to time-based progress (latches)
        self._first_step: float | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def progress(self) -> float:
        by_steps = self.steps / self.total_steps
        if self.budget and not self.by_time:
            self.by_time = self._projected_seconds() > self.budget
        if self.by_time:
            return min(1.0, max(by_steps, self.elapsed() / self.budget))
        return min(1.0, by_steps)

    def _projected_seconds(self) -> float:
        """Seconds the whole run will take at the average pace of its steps so far (0 until
        enough steps have run for the average to mean something)."""
        now = time.perf_counter()
        if self._first_step is None:
            self._first_step = now
        stepping = now - self._first_step
        if self.steps < 10 or (self.steps < 0.05 * self.total_steps and stepping < 0.05 * self.budget):
            return 0.0
        per_step = stepping / self.steps
        return (now - self.start) + (self.total_steps - self.steps) * per_step

    def out_of_time(self) -> bool:
        return bool(self.budget) and self.elapsed() >= self.budget


def selection_tolerance(val_accuracy: float, val_tracks: int) -> float:
    """One standard error (percentage points) of an accuracy measured on ``val_tracks`` signs.

    A track's ~30 frames are near-duplicates, so the independent samples are the tracks, not the
    images: on the 1,752-image sample (9 val tracks) this is ~15 points, on full GTSRB (~131
    val tracks, ~99 % accuracy) under 1 point.
    """
    p = min(max(val_accuracy / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1.0 - p) / max(1, val_tracks))


def epoch_batches(images: int, batch: int) -> int:
    """Optimizer steps in one epoch of ``images``: a last, partial batch of under a quarter of
    ``batch`` images is left out (its images come back in the next epoch's shuffle): a batch of a
    few images would skew batch norm's running statistics, which the saved model keeps (258 images
    in batches of 128 left a last batch of 2 and cost the synthetic test 24 points of accuracy)."""
    full, rest = divmod(images, batch)
    return full + (1 if rest and (full == 0 or rest >= batch // 4) else 0)


def train_epoch(model, opt, clock: Clock, images, labels, order, mean, std, recipe: dict,
                gen) -> tuple[float, int, int]:
    """One pass over ``order`` (indices into images), or less if ``clock`` runs out.

    Returns (summed loss, correct predictions, images trained on).
    """
    model.train()
    total_loss, correct, seen, batch = 0.0, 0, 0, recipe["batch_size"]
    for i in range(0, epoch_batches(len(order), batch) * batch, batch):
        progress = clock.progress()
        if progress >= 1.0:
            break
        for group in opt.param_groups:
            group["lr"] = recipe["lr"] * lr_factor(recipe["schedule"], progress)
        idx = order[i:i + batch]
        y = labels[idx]
        if recipe["augment"]:
            x = augment(images[idx], mean, std, gen, **{k: recipe.get(k, 0.0) for k in AUGMENTATIONS})
        else:
            x = normalize(images[idx], mean, std)
        logits = model(x.contiguous(memory_format=torch.channels_last))
        loss = F.cross_entropy(logits, y, label_smoothing=recipe["label_smoothing"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        clock.steps += 1
        total_loss += loss.item() * len(idx)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(idx)
    return total_loss, correct, seen


def train_model(data_dir: str, output_dir: str, config: TrainConfig = TrainConfig(), on_epoch=None) -> dict:
    """Train, keep the best validation epoch (the last one without a validation split), write
    weights + model card to ``output_dir``.

    Best epoch: the latest one whose validation accuracy is within one standard error
    (:func:`selection_tolerance`) of the highest, so a tiny, noisy validation set cannot pick an
    early, half-trained epoch by luck. ``on_epoch(epoch, stats)`` is called after every epoch
    (the KFP wrapper logs Metrics there). Returns the model card.
    """
    start = time.perf_counter()
    recipe = config.recipe()
    lr_factor(recipe["schedule"], 0.0)   # unknown schedule: fail before loading data
    threads = set_threads(config.threads or None)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)

    data = load_split(data_dir, "train")
    images, labels = data["images"], data["labels"]
    val_fraction = recipe["val_fraction"] if config.val_fraction is None else config.val_fraction
    train_idx, val_idx = split_by_track(data["tracks"], labels, val_fraction, gen)
    mean, std = FIXED_NORMALIZATION.get(config.arch) or channel_stats(images[train_idx])
    x_val, y_val = images[val_idx], labels[val_idx]
    val_tracks = len(data["tracks"][val_idx].unique())

    # channels_last: oneDNN runs convolutions and batch norm faster in NHWC on CPU (docs/measurements.md).
    model = build_model(config.arch).to(memory_format=torch.channels_last)
    opt = _optimizer(model, recipe)
    epochs = config.epochs or planned_epochs(recipe["train_images"], len(train_idx))
    steps_per_epoch = epoch_batches(len(train_idx), recipe["batch_size"])
    epoch_images = min(len(train_idx), steps_per_epoch * recipe["batch_size"])   # a whole epoch trains on these
    clock = Clock(steps_per_epoch * epochs, config.time_budget, start)
    print(f"train: {config.arch}, {len(train_idx)} train / {len(val_idx)} val images "
          f"({val_tracks} held-out tracks), {epochs} epochs, {threads} threads, "
          f"time budget {config.time_budget or 'none'} s, recipe {recipe}", flush=True)

    best = {"val_accuracy": float("nan"), "epoch": 0, "state": None}
    top, top_epoch = -1.0, 0
    history, seen, loop_start = [], 0, time.perf_counter()
    for epoch in range(1, epochs + 1):
        if clock.out_of_time():
            break
        epoch_start = time.perf_counter()
        order = train_idx[torch.randperm(len(train_idx), generator=gen)]
        total_loss, correct, n = train_epoch(model, opt, clock, images, labels, order, mean, std, recipe, gen)
        if n == 0:
            break
        seconds = time.perf_counter() - epoch_start
        seen += n
        stats = {"train_loss": total_loss / n, "train_accuracy": 100.0 * correct / n,
                 "val_accuracy": accuracy(model, x_val, y_val, mean, std) if len(val_idx) else float("nan"),
                 "images_per_second": n / seconds, "seconds": seconds, "images": n}
        history.append({"epoch": epoch, **stats})
        val = f" val acc {stats['val_accuracy']:.2f}%" if len(val_idx) else ""
        print(f"train: epoch {epoch}/{epochs} loss {stats['train_loss']:.4f} "
              f"train acc {stats['train_accuracy']:.2f}%{val} "
              f"({stats['images_per_second']:.0f} img/s incl. augmentation, {seconds:.1f}s"
              + (" + validation)" if len(val_idx) else ")")
              + ("" if n == epoch_images else f" — time budget reached after {n} images"), flush=True)
        if on_epoch:
            on_epoch(epoch, stats)
        score = stats["val_accuracy"] if len(val_idx) else 0.0    # no validation: keep the last epoch
        if score > top:
            top, top_epoch = score, epoch
        if score >= top - selection_tolerance(top, val_tracks):
            best = {"val_accuracy": stats["val_accuracy"], "epoch": epoch,
                    "state": {k: v.clone() for k, v in model.state_dict().items()}}
        if config.patience and epoch - top_epoch >= config.patience:
            print(f"train: early stop, no val improvement for {config.patience} epochs", flush=True)
            break
    wall = time.perf_counter() - loop_start
    stopped_by_time = clock.steps < clock.total_steps and (clock.progress() >= 1.0 or clock.out_of_time())
    total = clock.elapsed()
    if best["state"] is None:
        raise RuntimeError(f"time budget of {config.time_budget:g} s used up ({total:.1f} s, data loading "
                           "included) before the first epoch finished; raise TrainConfig.time_budget")
    model.load_state_dict(best["state"])
    model = model.to(memory_format=torch.contiguous_format).eval()

    card = {
        "architecture": config.arch,
        "normalization": {"mean": list(mean), "std": list(std)},
        "flops_per_image": count_flops(model),
        "parameters": sum(p.numel() for p in model.parameters()),
        "training": {**asdict(config), "recipe": recipe, "threads": threads,
                     "epochs_planned": epochs, "best_epoch": best["epoch"], "epochs_run": len(history),
                     "stopped_by_time_budget": stopped_by_time,
                     "seconds_with_loading": round(total, 2),
                     "val_accuracy": best["val_accuracy"] if len(val_idx) else None,
                     "wall_seconds": round(wall, 2), "images_per_second": round(seen / wall, 1),
                     "history": history},
        "data": {"train_images": len(train_idx), "val_images": len(val_idx), "val_tracks": val_tracks,
                 "class_counts": data["class_counts"].tolist()},
    }
    card["calibration"] = save_calibration_sample(output_dir, images[train_idx])
    card = save_model_artifact(output_dir, model, card)
    print(f"train: done in {wall:.1f}s ({seen / wall:.0f} img/s), kept epoch {best['epoch']}"
          + (f", val acc {best['val_accuracy']:.2f}%" if len(val_idx) else " (the last: no validation split)"),
          flush=True)
    return card


@step("train")
def train(data: Input[Dataset], arch: str, epochs: int, seed: int, model: Output[Model],
          metrics: Output[Metrics]):
    """Train with a seed; per-epoch metrics; weights + model card as the Model artifact."""
    import math

    from components.train import TrainConfig, train_model

    def log(epoch, stats):
        for key in ("train_loss", "train_accuracy", "val_accuracy"):
            if math.isfinite(stats[key]):                         # no validation split: no val metric
                metrics.log_metric(f"epoch{epoch:03d}_{key}", round(stats[key], 4))

    card = train_model(data.path, model.path, TrainConfig(arch=arch, epochs=epochs, seed=seed), on_epoch=log)
    training = card["training"]
    if training["val_accuracy"] is not None:
        metrics.log_metric("best_val_accuracy", training["val_accuracy"])
    metrics.log_metric("final_train_accuracy", round(training["history"][-1]["train_accuracy"], 4))
    metrics.log_metric("train_wall_seconds", training["wall_seconds"])
    metrics.log_metric("train_images_per_second", training["images_per_second"])
    model.metadata.update(architecture=card["architecture"], weights_sha256=card["weights_sha256"],
                          flops_per_image=card["flops_per_image"])
