"""A task: a name, class names, prompt templates and its data splits."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from PIL import Image

ImageSource = Union[Path, Image.Image]

DEFAULT_TEMPLATES = ["a photo of a {}.", "an image of a {}.", "a {}."]
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class Split:
    """Images (paths or in-memory PIL images) and their integer labels."""

    images: list[ImageSource]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class TaskData:
    """One task of a continual-learning sequence."""

    name: str
    classes: list[str]
    train: Split
    test: Split
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    source: str = ""

    @property
    def prompts_classes(self) -> list[str]:
        """Class names as they are read in prompts (underscores become spaces)."""
        return [c.replace("_", " ") for c in self.classes]


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid task name, else raise ConfigError."""
    from clipzoo.errors import ConfigError

    if not NAME_RE.match(name or ""):
        raise ConfigError(
            f"invalid task name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit"
        )
    return name
