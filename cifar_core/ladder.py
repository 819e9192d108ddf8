"""The model ladder as data: every per-model fact in one table, nothing else.

Each ``Rung`` holds what the project knows about one model id: the seed notebook's settings
and test accuracy (../shared/docs/model-ladder.md), whether it has a pretrained backbone, its
``--grid default`` search space (plain lists, the same form as a ``--grid FILE``), what a
trial asks for on a GPU cluster, and what ``--smoke-test`` shrinks it to. The Keras builders
live in ``models.py`` (``MODELS``, same ids); the sweep turns the grids into ``tune.*`` values.

No TensorFlow, no Ray: the settings module, the planner and the report all read this cheaply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Rung:
    """One model of the ladder."""

    description: str
    seed_settings: dict[str, Any]          # the notebook's values; other fields take defaults
    # The notebook's test accuracy; math.nan when the model is not in it (M8), so the report's
    # differences come out as nan and render as a dash instead of failing on None.
    seed_test_accuracy: float
    default_grid: dict[str, Any]           # {field: value or [values]}; a list is a grid axis
    gpu_resources: dict[str, float]        # per trial with --use-gpu
    backbone: str | None = None            # pretrained convolutional base, if any
    smoke_settings: dict[str, Any] = field(default_factory=dict)  # on top of SMOKE_SETTINGS
    # Settings fields only this model's builder reads; other models refuse non-default values.
    architecture_settings: frozenset[str] = frozenset()


#: ``--smoke-test`` for every model: tiny data, one epoch. Plumbing only: accuracy ~chance.
SMOKE_SETTINGS: dict[str, Any] = {"limit": 300, "num_epochs": 1, "batch_size": 32}

#: A random backbone at 32 px (no download), 0.35 wide for MobileNetV2, one epoch per phase.
_SMOKE_BACKBONE = {"image_size": 32, "backbone_weights": "none"}

#: Small CNNs share a card four to one (input-bound long before they fill an A10G), M6 two to
#: one, M5/M7 take a whole card.
_QUARTER_GPU = {"CPU": 2, "GPU": 0.25}

LADDER: dict[str, Rung] = {
    "M1": Rung(
        "baseline small CNN: one valid 3x3 conv, max-pool, Dense100",
        dict(num_epochs=50, batch_size=512, optimizer="sgd", learning_rate=0.01,
             dense_units=100, dropout_rate=0.0),
        0.552,
        {"learning_rate": [0.01, 0.03, 0.1], "batch_size": [128, 512]},
        _QUARTER_GPU),
    "M2": Rung(
        "two 3x3 convs, max-pool, Dense128",
        dict(num_epochs=50, batch_size=512, optimizer="sgd", learning_rate=0.01,
             dense_units=128, dropout_rate=0.0),
        0.580,
        {"learning_rate": [0.01, 0.03, 0.1], "batch_size": [128, 512]},
        _QUARTER_GPU),
    "M4": Rung(
        "two conv blocks (32, 64) with dropout after each, Dense128, dropout 0.5",
        dict(num_epochs=50, batch_size=512, optimizer="adam", learning_rate=1e-3,
             dense_units=128, dropout_rate=0.5, conv_dropout_rate=0.2),
        0.782,
        {"learning_rate": [3e-4, 1e-3, 3e-3], "dropout_rate": [0.3, 0.5],
         "conv_dropout_rate": [0.1, 0.2]},
        _QUARTER_GPU),
    "M5": Rung(
        "frozen VGG16 (ImageNet) at 64x64, Flatten, Dense256, dropout 0.5",
        dict(num_epochs=20, batch_size=64, optimizer="sgd", learning_rate=1e-3,
             momentum=0.9, nesterov=True, dense_units=256, dropout_rate=0.5, image_size=64),
        0.672,
        {"learning_rate": [1e-3, 3e-3], "dropout_rate": [0.3, 0.5]},
        {"CPU": 4, "GPU": 1}, backbone="VGG16", smoke_settings=_SMOKE_BACKBONE),
    "M6": Rung(
        "VGG-style 64/128/256 conv blocks with BatchNorm, behind random augmentation",
        dict(num_epochs=25, batch_size=512, optimizer="adam", learning_rate=1e-3,
             dense_units=128, dropout_rate=0.5, augment_contrast=0.1, augment_flip=True,
             augment_rotation=0.1),
        0.825,
        {"learning_rate": [3e-4, 1e-3], "augment_rotation": [0.05, 0.1]},
        {"CPU": 2, "GPU": 0.5}),
    # Rotation 15 degrees = 15/360 of a turn; shifts 10 %; flips. Phase 1: 20 epochs at 1e-4;
    # phase 2: 15 epochs at 1e-5 with the last 50 backbone layers trainable.
    "M7": Rung(
        "MobileNetV2 (ImageNet) at 96x96, GAP, dropout, Dense256, dropout; two phases",
        dict(num_epochs=20, batch_size=64, optimizer="adam", learning_rate=1e-4,
             dense_units=256, dropout_rate=0.4, image_size=96, augment_rotation=15 / 360,
             augment_shift=0.1, augment_flip=True, fine_tune_epochs=15,
             fine_tune_learning_rate=1e-5, fine_tune_layers=50, early_stopping_patience=5,
             reduce_lr_patience=3),
        0.886,
        {"learning_rate": [1e-4, 3e-4], "fine_tune_layers": [30, 50]},
        {"CPU": 4, "GPU": 1}, backbone="MobileNetV2",
        smoke_settings={**_SMOKE_BACKBONE, "backbone_alpha": 0.35, "fine_tune_epochs": 1}),
    # Not from the notebook: a fast from-scratch recipe after airbench (Keller Jordan) and David
    # Page's "How to train your ResNet": frozen 2x2 patch whitening from the training data,
    # three conv groups with BatchNorm and Dirac init, Nesterov SGD at batch 128 with a 20%
    # warm-up then linear decay, weight EMA, flip + 2-px shifts, 6-view TTA. Widths are
    # leaner than airbench's 64/256/256 to fit <= 60 min per run on 2 CPU cores (see
    # results/bench-throughput.md). SGD weight_decay 5e-3 (decoupled, per unit rate) matches
    # PyTorch's coupled 5e-4 at momentum 0.9; the logits are scaled by 1/8 (Page's 0.125).
    "M8": Rung(
        "fast from-scratch VGG: frozen patch whitening, 3 BN conv groups, weight EMA, TTA",
        # Batch 128, no label smoothing, the weight EMA: what the subset ablation kept
        # (results/m8-ablation.md). Warm-up and linear decay: what the full data's validation
        # preferred over the ablation's constant rate (results/README.md).
        dict(num_epochs=12, batch_size=128, optimizer="sgd", learning_rate=0.1, momentum=0.9,
             nesterov=True, weight_decay=5e-3, label_smoothing=0.0,
             learning_rate_schedule="linear", warmup_fraction=0.2, ema_decay=0.99,
             widths="48,160,160", whitening=True, dirac_init=True, tta_level=2,
             augment_flip=True, augment_shift=2 / 32),
        math.nan,
        # No widths or num_epochs axes: a grid point overrides --smoke-test's tiny settings, so
        # those ablations go in a --grid FILE (e.g. {"M8": {"widths": ["64,256,256"]}}).
        {"learning_rate": [0.05, 0.1], "ema_decay": [0.0, 0.99]},
        {"CPU": 2, "GPU": 0.5},
        smoke_settings={"widths": "8,16,16"},
        architecture_settings=frozenset({"widths", "whitening", "dirac_init", "tta_level"})),
}

#: Every model id, in ladder order.
MODEL_IDS: tuple[str, ...] = tuple(LADDER)


def rung(model: str) -> Rung:
    """The ladder entry for ``model``; a KeyError naming the valid ids otherwise."""
    try:
        return LADDER[model]
    except KeyError:
        raise KeyError(f"unknown model {model!r}; valid models: {list(MODEL_IDS)}") from None


def smoke_settings(model: str) -> dict[str, Any]:
    """What ``--smoke-test`` sets for ``model`` (fields a user gave explicitly still win)."""
    return {**SMOKE_SETTINGS, **rung(model).smoke_settings}
