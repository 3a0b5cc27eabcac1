"""The one place that defines the networks and the class names, and the image transforms as torch
tensors.

Everything that turns an image into a prediction (preprocess, train, evaluate, the KServe
predictor) goes through the transforms of components/transforms.py (numpy; :func:`to_uint8_32`
and :func:`normalize` here are their torch views), so training and serving see identical inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from components import transforms
from components.artifact import CALIBRATION_FILE as CALIBRATION_FILE
from components.artifact import CARD_FILE as CARD_FILE
from components.artifact import WEIGHTS_FILE as WEIGHTS_FILE
from components.artifact import ModelArtifactError as ModelArtifactError
from components.artifact import artifact_files as artifact_files
from components.artifact import read_card as read_card
from components.artifact import sha256_file as sha256_file
from components.artifact import verified_card as verified_card

NUM_CLASSES = 43
IMAGE_SIZE, INPUT_SHAPE = transforms.IMAGE_SIZE, transforms.INPUT_SHAPE

# GTSRB class ids 0..42, in order.
CLASS_NAMES = (
    "Speed limit (20km/h)", "Speed limit (30km/h)", "Speed limit (50km/h)",
    "Speed limit (60km/h)", "Speed limit (70km/h)", "Speed limit (80km/h)",
    "End of speed limit (80km/h)", "Speed limit (100km/h)", "Speed limit (120km/h)",
    "No passing", "No passing for vehicles over 3.5 metric tons",
    "Right-of-way at the next intersection", "Priority road", "Yield", "Stop",
    "No vehicles", "Vehicles over 3.5 metric tons prohibited", "No entry",
    "General caution", "Dangerous curve to the left", "Dangerous curve to the right",
    "Double curve", "Bumpy road", "Slippery road", "Road narrows on the right",
    "Road work", "Traffic signals", "Pedestrians", "Children crossing",
    "Bicycles crossing", "Beware of ice/snow", "Wild animals crossing",
    "End of all speed and passing limits", "Turn right ahead", "Turn left ahead",
    "Ahead only", "Go straight or right", "Go straight or left", "Keep right",
    "Keep left", "Roundabout mandatory", "End of no passing",
    "End of no passing by vehicles over 3.5 metric tons",
)
assert len(CLASS_NAMES) == NUM_CLASSES


# --------------------------------------------------------------------------- transforms
def to_uint8_32(image: Image.Image) -> torch.Tensor:
    """Decoded image of any size -> uint8 tensor 3x32x32: :func:`components.transforms.to_uint8_32`."""
    return torch.from_numpy(transforms.to_uint8_32(image))


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 batch Nx3x32x32 -> float32, scaled to [0, 1] then standardized per channel."""
    return standardize(images.float().div_(255.0), mean, std)


def standardize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """float batch Nx3xHxW in [0, 1] -> standardized per channel."""
    mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - mean) / std


# --------------------------------------------------------------------------- networks
class LPNet(nn.Module):
    """The Arm learning path's network (conv32-conv64-fc128-fc43), kept for comparison."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.fc1 = nn.Linear(64 * 6 * 6, 128)
        self.fc2 = nn.Linear(128, NUM_CLASSES)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


class ImageStandardize(nn.Module):
    """Per-image contrast normalization: the image minus its mean, over its standard deviation, both
    taken over the central ``window`` x ``window`` pixels (all channels) of the 32 x 32 crop.

    GTSRB crops range from near-black to washed out. Normalizing each image as a whole (not each
    channel, so a sign's colours keep their ratios) makes the network invariant to overall
    brightness and contrast (linear changes) by construction; non-linear exposure changes are
    left to the training recipe's exposure augmentations (gamma curve, clipped over-exposure).
    The statistics come from the centre, where the sign is, not from the background around it (a
    bright sky, a dark tree): on gtsrb-dev that took the 3-seed mean from 98.62 to 99.19 %
    (docs/model.md). The window is a buffer in the state dict, so weights trained with another
    window (or with whole-image statistics, before 2026-12-06) do not load into this network.
    """

    def __init__(self, window: int = 16, eps: float = 1e-3):
        super().__init__()
        self.eps = eps
        self.register_buffer("window", torch.tensor(window))
        self._set_bounds()

    def _set_bounds(self):
        """The centre's rows/columns, as Python ints (a slice export and compile see as constants)."""
        self._lo = (IMAGE_SIZE - int(self.window)) // 2
        self._hi = self._lo + int(self.window)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._set_bounds()                  # the saved window wins over the constructor's

    def forward(self, x):
        centre = x[:, :, self._lo:self._hi, self._lo:self._hi]
        mean = centre.mean(dim=(1, 2, 3), keepdim=True)
        var = centre.var(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps)


def _conv_pool_bn(cin: int, cout: int) -> nn.Sequential:
    """3x3 conv -> 2x2 max-pool -> BN -> ReLU. Pooling before BN and ReLU (as fast CIFAR-10
    training recipes do) runs both on a quarter of the pixels."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.MaxPool2d(2),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class SignNet(nn.Module):
    """Default network: per-image standardization (centre statistics), three conv-pool-BN blocks
    (width w, 2w, 4w: 32 -> 16 -> 8 -> 4 px), one more 3x3 conv at 4x4, dropout, a 128-unit hidden
    layer, linear head.
    25.9 MFLOPs per image at w = 32. Why this shape: docs/model.md."""

    def __init__(self, width: int = 32, dropout: float = 0.3):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            ImageStandardize(),
            _conv_pool_bn(3, w),            # 16x16
            _conv_pool_bn(w, 2 * w),        # 8x8
            _conv_pool_bn(2 * w, 4 * w),    # 4x4
            _conv_bn(4 * w, 4 * w),         # 4x4
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(4 * w * 16, 128), nn.ReLU(inplace=True),
                                  nn.Dropout(dropout), nn.Linear(128, NUM_CLASSES))

    def forward(self, x):
        return self.head(self.features(x))


ARCHITECTURES = {"lp": LPNet, "signnet": SignNet}
DEFAULT_ARCH = "signnet"
# lp keeps the learning path's Normalize(0.5, 0.5); other nets use per-channel train stats.
FIXED_NORMALIZATION = {"lp": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])}


def build_model(arch: str) -> nn.Module:
    try:
        return ARCHITECTURES[arch]()
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}") from None


def count_flops(model: nn.Module) -> int:
    """Forward FLOPs for one image (FlopCounterMode counts a multiply-add as 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, *INPUT_SHAPE))
    model.train(was_training)
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------- artifact
# The Model artifact (components/artifact.py reads and verifies it).
CALIBRATION_IMAGES = 512
CALIBRATION_SEED = 0                    # fixed: every evaluation and every server quantizes identically


def save_calibration_sample(directory: str | Path, train_images: torch.Tensor) -> dict:
    """Write CALIBRATION_IMAGES training images (uint8, a CALIBRATION_SEED-seeded sample in
    index order) into ``directory``; returns the model card's ``calibration`` entry."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(CALIBRATION_SEED))
    sample = train_images[pick[:CALIBRATION_IMAGES].sort().values].contiguous()
    path = directory / CALIBRATION_FILE
    torch.save(sample, path)
    return {"file": CALIBRATION_FILE, "images": len(sample), "seed": CALIBRATION_SEED, "dtype": "uint8",
            "sha256": sha256_file(path)}


def save_model_artifact(directory: str | Path, model: nn.Module, card: dict) -> dict:
    """Write weights + model card into ``directory`` (beside a calibration sample the card
    already names, if any); returns the completed card."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_FILE
    torch.save(model.state_dict(), weights)
    card = dict(card, weights_file=WEIGHTS_FILE, weights_sha256=sha256_file(weights),
                torch_version=torch.__version__, input_shape=list(INPUT_SHAPE),
                input_dtype="uint8 RGB, resized to 32x32, then normalized",
                class_names=list(CLASS_NAMES))
    (directory / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    return card


def load_model_artifact(directory: str | Path) -> tuple[nn.Module, dict]:
    """Load weights + card, verifying every file's sha256 against the card."""
    card = verified_card(directory)
    model = build_model(card["architecture"])
    weights = Path(directory) / card.get("weights_file", WEIGHTS_FILE)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:     # e.g. a signnet trained before ImageStandardize had its window
        lines = str(e).splitlines()   # torch: "Error(s) in loading state_dict for X:", then the problems
        detail = lines[1].strip() if len(lines) > 1 else str(e)
        raise ModelArtifactError(f"{directory}: its weights do not fit this code's {card['architecture']!r} network "
                                 f"({detail}): an artifact of an older version of the network; train it again"
                                 ) from None
    model.eval()
    return model, card


def calibration_images(directory: str | Path, card: dict) -> torch.Tensor:
    """The artifact's calibration sample, normalized like every input (N x 3 x 32 x 32 float32);
    ``card`` comes from :func:`verified_card` / :func:`load_model_artifact`."""
    if "calibration" not in card:
        raise ModelArtifactError(f"{directory}: the model card names no calibration sample (an artifact "
                                 "from before calibration.pt was written: train it again)")
    images = torch.load(Path(directory) / card["calibration"]["file"], weights_only=True)
    return normalize(images, card["normalization"]["mean"], card["normalization"]["std"])
