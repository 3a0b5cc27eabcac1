"""Container image names: one source of truth, images/images.env.

Each pipeline step runs in its own image ``<IMAGE_REGISTRY>/<IMAGE_PREFIX><step>:<IMAGE_TAG>``.
Environment variables of the same names override the file's defaults, so the Makefile,
the GitHub workflows and ``pipeline.py`` always agree.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV_FILE = Path(__file__).resolve().parent.parent / "images" / "images.env"
PYPROJECT = ENV_FILE.parent.parent / "pyproject.toml"


def _defaults() -> dict[str, str]:
    values = {}
    for line in ENV_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def setting(key: str) -> str:
    return os.environ.get(key) or _defaults()[key]


def steps() -> list[str]:
    """Every image built from images/ (the shared base first)."""
    return setting("STEPS").split()


def image(step: str) -> str:
    if step not in steps():
        raise KeyError(f"no image for step {step!r}; known: {', '.join(steps())}")
    return f"{setting('IMAGE_REGISTRY')}/{setting('IMAGE_PREFIX')}{step}:{setting('IMAGE_TAG')}"


def requirements(step: str, pyproject: Path = PYPROJECT) -> list[str]:
    """The pinned requirements of an image that installs only some of the project's dependencies
    (pyproject.toml ``[tool.gtsrb.image-requirements]``; the pins stay in ``[project]
    dependencies``), without extras: ``kserve[storage]==X`` -> ``kserve==X``."""
    import re
    import tomllib

    config = tomllib.loads(pyproject.read_text())
    names = config["tool"]["gtsrb"]["image-requirements"][step]
    pinned = {re.split(r"[\[=<>!~ ]", d, maxsplit=1)[0]: re.sub(r"\[.*?\]", "", d)
              for d in config["project"]["dependencies"]}
    missing = [n for n in names if n not in pinned]
    if missing:
        raise KeyError(f"{step}: {missing} not among the project's dependencies")
    return [pinned[n] for n in names]


if __name__ == "__main__":  # `python -m components.images [step]` prints image names
    if sys.argv[1:2] == ["--requirements"]:       # `... --requirements STEP`: that image's pinned requirements
        print("\n".join(requirements(sys.argv[2])))
    else:
        for name in sys.argv[1:] or steps():
            print(image(name))
