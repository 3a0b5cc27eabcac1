"""The registry of PyTorch CPU inference backends the pipeline compares.

Each backend has a name, a one-line description, how it is enabled, and an availability
check; ``prepare(model, example)`` turns an eval-mode fp32 model into a callable that maps a
normalized float32 batch (N x 3 x 32 x 32) to logits. Unavailable backends report why instead
of disappearing.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

Predict = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    enabled_by: str
    precision: str
    prepare: Callable[[nn.Module, torch.Tensor], Predict]
    unavailable: Callable[[], str | None] = lambda: None   # reason, or None when usable


def _with_mkldnn(enabled: bool, fn: Predict) -> Predict:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.backends.mkldnn.flags(enabled=enabled), torch.inference_mode():
            return fn(x)
    return run


def _eager(model: nn.Module, example: torch.Tensor) -> Predict:
    return _with_mkldnn(False, model)


def _onednn(model: nn.Module, example: torch.Tensor) -> Predict:
    return _with_mkldnn(True, model)


def _no_mkldnn() -> str | None:
    return None if torch.backends.mkldnn.is_available() else "this torch build has no oneDNN (mkldnn)"


REFERENCE = "eager"
_arm = platform.machine() in ("aarch64", "arm64")

BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("eager", "fp32, oneDNN off: ATen's native kernels"
            + (" with OpenBLAS (the learning path's 'OpenBLAS')" if _arm else ""),
            "torch.backends.mkldnn.flags(enabled=False)", "fp32", _eager),
    Backend("onednn", "fp32, oneDNN on" + (" with Arm Compute Library (the learning path's 'ACL')" if _arm else ""),
            "torch.backends.mkldnn.flags(enabled=True) (the default)", "fp32", _onednn, _no_mkldnn),
)}


def get(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}") from None
