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


def test_clock_progress_is_the_larger_of_steps_and_time():
    now = time.perf_counter()
    clock = Clock(total_steps=100, budget=10.0, start=now - 5.0)
    assert clock.progress() == pytest.approx(0.5, abs=0.01) and not clock.out_of_time()
    clock.steps = 80
    assert clock.progress() == 0.8
    late = Clock(total_steps=100, budget=10.0, start=now - 11.0)
    assert late.progress() == 1.0 and late.out_of_time()
    unlimited = Clock(total_steps=100, budget=0.0, start=now - 1e6)
    unlimited.steps = 25
    assert unlimited.progress() == 0.25 and not unlimited.out_of_time()


def test_augment_is_reproducible_varied_and_never_mirrors():
    x = torch.zeros(256, 3, 32, 32)
    x[..., :16] = 1.0                                    # bright left half, dark right half
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert torch.equal(out, augment(x, torch.Generator().manual_seed(0)))
    assert torch.equal(out[..., 16:], x[..., 16:])       # never flipped: the right half stays dark
    gains = out[..., 0, 0]                               # per image and channel
    assert gains.min() >= 0.85 and gains.max() <= 1.15 and gains.std() > 0.05
    assert torch.equal(out[..., :16], gains[..., None, None].expand(-1, -1, 32, 16))


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
    card = train_model(str(prepared), str(tmp_path), TrainConfig(epochs=12, seed=0))
    training, data = card["training"], card["data"]
    assert card["architecture"] == DEFAULT_ARCH
    assert training["epochs_run"] == len(training["history"]) == 12 and not training["stopped_by_time_budget"]
    assert 1 <= training["best_epoch"] <= 12 and training["images_per_second"] > 0
    assert data["train_images"] + data["val_images"] == 43 * 2 * 3 and data["val_tracks"] == 9
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


def test_default_beats_lp_on_unseen_real_signs_after_three_epochs(sample_data, tmp_path):
    """The pipeline's short smoke run (--epochs 3 on the sample) must stay well above 15 %."""
    test = load_split(sample_data, "test")
    scores = {}
    for arch in ("lp", DEFAULT_ARCH):
        train_model(str(sample_data), str(tmp_path / arch), TrainConfig(arch=arch, epochs=3, seed=0))
        model, card = load_model_artifact(tmp_path / arch)
        norm = card["normalization"]
        scores[arch] = accuracy(model, test["images"], test["labels"], norm["mean"], norm["std"])
    assert scores[DEFAULT_ARCH] >= 20.0, scores
    assert scores[DEFAULT_ARCH] >= scores["lp"] + 5.0, scores
