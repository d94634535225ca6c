"""A stand-in for the few `torchvision.transforms` diffusers' train_text_to_image_lora.py uses, for CPU-only torch.

The PyPI torchvision wheel links CUDA libraries and cannot load beside a CPU build of torch, so on a CPU machine
bench/measure.py installs this module as `torchvision` before running the example. It does the same preprocessing
(resize the short side, crop, optional flip, to tensor, normalise) with PIL and torch; only used for benchmarks.
"""

from __future__ import annotations

import enum
import importlib.machinery
import random
import sys
import types

import numpy as np
import torch
from PIL import Image


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    LANCZOS = "lanczos"
    BOX = "box"
    HAMMING = "hamming"


_PIL = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
}


class Compose:
    def __init__(self, steps):
        self.steps = steps

    def __call__(self, x):
        for step in self.steps:
            x = step(x)
        return x


class Resize:
    def __init__(self, size, interpolation=InterpolationMode.BILINEAR):
        self.size, self.mode = size, _PIL[interpolation.value]

    def __call__(self, image):
        w, h = image.size
        scale = self.size / min(w, h)
        return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), self.mode)


class CenterCrop:
    def __init__(self, size):
        self.size = size

    def __call__(self, image):
        w, h = image.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))


class RandomCrop(CenterCrop):
    def __call__(self, image):
        w, h = image.size
        left, top = random.randint(0, w - self.size), random.randint(0, h - self.size)
        return image.crop((left, top, left + self.size, top + self.size))


class RandomHorizontalFlip:
    def __call__(self, image):
        return image.transpose(Image.FLIP_LEFT_RIGHT) if random.random() < 0.5 else image


class Lambda:
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x):
        return self.fn(x)


class ToTensor:
    def __call__(self, image):
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = mean[0], std[0]

    def __call__(self, tensor):
        return (tensor - self.mean) / self.std


def install():
    transforms = types.ModuleType("torchvision.transforms")
    for obj in (
        InterpolationMode,
        Compose,
        Resize,
        CenterCrop,
        RandomCrop,
        RandomHorizontalFlip,
        Lambda,
        ToTensor,
        Normalize,
    ):
        setattr(transforms, obj.__name__, obj)
    package = types.ModuleType("torchvision")
    package.transforms = transforms
    package.__version__ = "shim"
    package.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
    transforms.__spec__ = importlib.machinery.ModuleSpec("torchvision.transforms", None)
    sys.modules["torchvision"] = package
    sys.modules["torchvision.transforms"] = transforms
