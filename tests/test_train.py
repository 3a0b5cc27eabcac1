import math
import time

import pytest
import torch

from components.model import DEFAULT_ARCH, load_model_artifact
from components.preprocess import load_split
from components.train import (
    WARMUP,
    Clock,
    TrainConfig,
    accuracy,
    augment,
    channel_stats,
    epoch_batches,
    lr_factor,
    selection_tolerance,
    split_by_track,
    train_model,
)


def test_split_by_track_holds_out_whole_tracks_and_keeps_every_class():
    tracks_per_class = [1, 3, 4, 5, 7]                  # class 0 has a single physical sign
    labels, tracks = [], []
    for label, n in enumerate(tracks_per_class):
        for track in range(n):
            labels += [label] * 4
            tracks += [label * 100000 + track] * 4
    labels, tracks = torch.tensor(labels), torch.tensor(tracks)
    train, val = split_by_track(tracks, labels, 0.2, torch.Generator().manual_seed(0))
    assert sorted(torch.cat([train, val]).tolist()) == list(range(len(labels)))
    assert not set(tracks[train].tolist()) & set(tracks[val].tolist())
    assert len(tracks[val].unique()) == round(0.2 * sum(tracks_per_class))
    assert set(labels[train].tolist()) == set(range(len(tracks_per_class)))
    assert 0 not in labels[val].tolist()


def test_selection_tolerance_is_one_standard_error_over_tracks():
    assert selection_tolerance(99.0, 131) == pytest.approx(0.869, abs=1e-3)     # full GTSRB
    assert selection_tolerance(50.0, 9) == pytest.approx(16.667, abs=1e-3)      # the sample
    assert selection_tolerance(100.0, 9) == 0.0
    assert selection_tolerance(50.0, 0) == 50.0


def test_onecycle_warms_up_then_anneals_to_zero():
    factors = [lr_factor("onecycle", p / 100) for p in range(101)]
    peak = round(WARMUP * 100)
    assert factors[0] == pytest.approx(0.04) and factors[peak] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a < b for a, b in zip(factors[:peak], factors[1:peak + 1], strict=True))
    assert all(a > b for a, b in zip(factors[peak:-1], factors[peak + 1:], strict=True))
    assert lr_factor("constant", 0.7) == 1.0
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        lr_factor("cosine", 0.5)


def test_clock_follows_steps_while_the_plan_fits_and_time_once_it_overruns():
    now = time.perf_counter()
    fits = Clock(total_steps=100, budget=10.0, start=now - 5.0)   # loading took half the budget
    assert fits.progress() == 0.0                   # steps only: the first learning rate never depends on timing
    fits._first_step = now - 0.5                    # 20 steps in 0.5 s: 80 more take 2 s, 7.5 s in all
    fits.steps = 20
    assert fits.progress() == 0.2 and not fits.by_time and not fits.out_of_time()
    slow = Clock(total_steps=100, budget=10.0, start=now - 5.0)
    slow.progress()
    slow._first_step = now - 4.0                    # 20 steps in 4 s: 80 more take 16 s, 21 s in all
    slow.steps = 20
    assert slow.progress() == pytest.approx(0.5, abs=0.01) and slow.by_time
    slow.steps = 80
    assert slow.progress() == 0.8                   # the larger of steps and time
    few = Clock(total_steps=1000, budget=100.0, start=now - 5.0)
    few.progress()
    few._first_step, few.steps = now - 4.0, 49     # under 5 % of the plan and of the budget: no projection
    assert few.progress() == 0.049 and not few.by_time
    few._first_step = now - 6.0                     # 5 % of the budget spent stepping: 951 more steps overrun
    assert few.progress() == pytest.approx(0.05, abs=0.01) and few.by_time   # 5 s of 100 spent
    late = Clock(total_steps=100, budget=10.0, start=now - 11.0)
    assert late.out_of_time()
    unlimited = Clock(total_steps=100, budget=0.0, start=now - 1e6)
    unlimited.steps = 25
    assert unlimited.progress() == 0.25 and not unlimited.out_of_time()


def test_training_twice_with_one_seed_gives_the_same_weights(prepared, tmp_path):
    cards = [train_model(str(prepared), str(tmp_path / f"run{i}"), TrainConfig(epochs=2, seed=3)) for i in range(2)]
    assert cards[0]["weights_sha256"] == cards[1]["weights_sha256"]
    assert [h["train_loss"] for h in cards[0]["training"]["history"]] == \
        [h["train_loss"] for h in cards[1]["training"]["history"]]


def test_augment_is_reproducible_varied_and_never_mirrors():
    images = torch.zeros(256, 3, 32, 32, dtype=torch.uint8)
    images[..., :16] = 255                               # bright left half, dark right half
    mean, std = [0.5] * 3, [0.5] * 3
    out = augment(images, mean, std, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    assert torch.equal(out, augment(images, mean, std, torch.Generator().manual_seed(0)))
    assert (out[..., 16:] < 0).all() and (out[..., :16] > 0).all()     # never flipped: the right half stays dark
    assert torch.equal(out[..., 16:], -out[..., :16])    # white +1, black -1, both times the channel's gain
    gains = out[..., 0, 0]                               # per image and channel
    assert gains.min() >= 0.85 and gains.max() <= 1.15 and gains.std() > 0.05
    assert torch.equal(out[..., :16], gains[..., None, None].expand(-1, -1, 32, 16))


def test_augment_gamma_changes_exposure_per_image_within_its_spread():
    images = torch.full((512, 3, 32, 32), 64, dtype=torch.uint8)            # mid-dark grey, 0.251
    out = augment(images, [0.0] * 3, [1.0] * 3, torch.Generator().manual_seed(0), gamma=2.0)
    level = out[:, :, 0, 0]                              # x ** g times a 0.85-1.15 gain, per image and channel
    x = 64 / 255
    assert level.min() >= x ** 2 * 0.85 - 1e-6 and level.max() <= x ** 0.5 * 1.15 + 1e-6
    assert level.mean(1).std() > 0.05, "each image gets its own curve"
    assert level.mean(1).max() > x * 1.3 and level.mean(1).min() < x / 1.3, "both darker and brighter"


def test_augment_overexpose_blows_out_a_share_of_images_and_clips_them():
    images = torch.full((2000, 3, 32, 32), 100, dtype=torch.uint8)
    images[..., :16] = 200                               # a bright left half, twice the right half
    out = augment(images, [0.0] * 3, [1.0] * 3, torch.Generator().manual_seed(0), overexpose=0.2)
    ratio = out[:, :, 0, 0] / out[:, :, 0, 31]           # left / right, per image and channel: the gain cancels
    kept = (ratio - 2.0).abs() < 1e-5                    # untouched images keep the ratio exactly
    assert kept.all(1).eq(kept.any(1)).all(), "an image is blown out as a whole, all channels"
    blown = ~kept[:, 0]
    assert 0.17 < blown.float().mean() < 0.23
    # x 2 to x 11.3 clips the bright half at 1.0 and the dark half (100/255 x 2**s) at or near it
    assert (ratio[blown] >= 1.0 - 1e-5).all() and (ratio[blown] <= 255 / 200 + 1e-5).all()
    assert (ratio[blown] == 1.0).float().mean() > 0.7    # most blown images: both halves white
    level = out[blown][:, :, 0, 31] / out[blown][:, :, 0, 0]          # dark half in [0, 1], 8-bit steps
    assert torch.allclose(level * 255, (level * 255).round(), atol=1e-3)


def test_augment_geometry_moves_content_but_keeps_the_frame():
    images = torch.zeros(64, 3, 32, 32, dtype=torch.uint8)
    images[:, :, 12:20, 12:20] = 255                     # a centred bright square
    mean, std = [0.0] * 3, [1.0] * 3
    still = augment(images, mean, std, torch.Generator().manual_seed(1))
    moved = augment(images, mean, std, torch.Generator().manual_seed(1), rotate=10, scale=0.1, translate=0.1)
    centre = lambda x: (x[:, 0] > 0.5).float().nonzero()[:, 1:].float().mean(0)      # noqa: E731
    assert torch.allclose(centre(still), torch.tensor([15.5, 15.5]))
    shifts = torch.stack([centre(moved[i:i + 1]) for i in range(64)]) - 15.5
    assert shifts.abs().max() <= 0.1 * 32 + 1.5 and shifts.std() > 0.5


def test_channel_stats_are_per_channel_over_the_training_images():
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    images[:, 1] = 255
    images[:2, 2] = 255
    mean, std = channel_stats(images)
    assert mean == pytest.approx([0.0, 1.0, 0.5])
    assert std == pytest.approx([0.0, 0.0, 0.5], abs=1e-3)


def test_recipe_rejects_unknown_parameters_and_architectures():
    with pytest.raises(ValueError, match="lr_max"):
        TrainConfig(overrides={"lr_max": 1.0}).recipe()
    with pytest.raises(ValueError, match="no training recipe"):
        TrainConfig(arch="resnet50").recipe()
    with pytest.raises(ValueError, match="unknown schedule"):    # before touching the (missing) data
        train_model("/nonexistent", "/nonexistent", TrainConfig(overrides={"schedule": "step"}))


def test_default_model_learns_the_synthetic_signs(prepared, tmp_path):
    # 24 optimizer steps on 258 drawn signs: the recipe's photo augmentation (exposure, warps) is off here
    # (it needs thousands of steps to pay off); its effect on real signs is measured in docs/model.md.
    card = train_model(str(prepared), str(tmp_path), TrainConfig(epochs=12, seed=0, overrides={"augment": False}))
    training, data = card["training"], card["data"]
    assert card["architecture"] == DEFAULT_ARCH
    assert training["epochs_run"] == len(training["history"]) == 12 and not training["stopped_by_time_budget"]
    assert training["images_per_second"] > 0
    # the default recipe holds no tracks out (docs/model.md): every image trains, the last epoch is kept
    assert data["train_images"] == 43 * 2 * 3 and data["val_images"] == data["val_tracks"] == 0
    assert training["best_epoch"] == 12 and training["val_accuracy"] is None
    assert all(math.isnan(h["val_accuracy"]) for h in training["history"])
    assert all(0.0 < m < 1.0 for m in card["normalization"]["mean"])
    model, card = load_model_artifact(tmp_path)
    test = load_split(prepared, "test")
    norm = card["normalization"]
    assert accuracy(model, test["images"], test["labels"], norm["mean"], norm["std"]) >= 90.0


def test_time_budget_ends_training_on_time(prepared, tmp_path):
    card = train_model(str(prepared), str(tmp_path), TrainConfig(epochs=500, time_budget=2.0))
    training = card["training"]
    assert training["stopped_by_time_budget"] and training["epochs_run"] < 500
    assert 2.0 <= training["seconds_with_loading"] < 2.0 + 3.0    # one batch + one validation past it
    assert training["history"][-1]["images"] <= card["data"]["train_images"]



def test_a_budget_spent_before_the_first_epoch_says_so_and_writes_nothing(prepared, tmp_path):
    with pytest.raises(RuntimeError, match=r"time budget of 1e-06 s used up .* before the first epoch finished"):
        train_model(str(prepared), str(tmp_path / "model"), TrainConfig(epochs=1, time_budget=1e-6))
    assert not (tmp_path / "model").exists()


def test_default_beats_lp_on_unseen_real_signs_after_five_epochs(sample_data, tmp_path):
    """The pipeline's short smoke run (--epochs 5 on the sample, the workflow's default) must stay
    well above 15 %. (The centre-statistics signnet starts slower than the whole-image one did: 3
    epochs gave 12.9 % on seed 0, 5 epochs 31.8 %; docs/model.md.)"""
    test = load_split(sample_data, "test")
    scores = {}
    for arch in ("lp", DEFAULT_ARCH):
        train_model(str(sample_data), str(tmp_path / arch), TrainConfig(arch=arch, epochs=5, seed=0))
        model, card = load_model_artifact(tmp_path / arch)
        norm = card["normalization"]
        scores[arch] = accuracy(model, test["images"], test["labels"], norm["mean"], norm["std"])
    assert scores[DEFAULT_ARCH] >= 20.0, scores
    assert scores[DEFAULT_ARCH] >= scores["lp"] + 5.0, scores


def test_affine_grid_is_torchs_affine_grid():
    import math

    import torch.nn.functional as F

    from components.train import _affine_grid

    g = torch.Generator().manual_seed(0)
    angle, zoom = (torch.rand(6, generator=g) - 0.5) * math.radians(20), 1 + (torch.rand(6, generator=g) - 0.5) * 0.2
    tx, ty = (torch.rand(6, generator=g) - 0.5) * 0.4, (torch.rand(6, generator=g) - 0.5) * 0.4
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    expected = F.affine_grid(theta, [6, 3, 32, 32], align_corners=False)
    assert torch.allclose(_affine_grid(cos, sin, tx, ty, 32, 32), expected, atol=1e-6)


def test_an_epoch_leaves_out_a_last_batch_of_a_few_images():
    assert epoch_batches(258, 128) == 2                    # 128 + 128 (+ 2 left out)
    assert epoch_batches(22_625, 128) == 177               # gtsrb-dev: the last 97 train
    assert epoch_batches(39_209, 128) == 307               # full GTSRB: the last 41 train
    assert epoch_batches(20, 128) == 1 and epoch_batches(256, 128) == 2 and epoch_batches(0, 128) == 0
