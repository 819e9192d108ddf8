"""One flat, frozen, validated settings object per run.

A Tune trial's config, a CLI invocation and a checkpoint's ``settings.json`` all become a
``Settings`` through ``Settings.from_dict``; an unknown key or a bad value raises
``SettingsError`` naming the field and the value *before* any data is read or any cluster work
starts. Each model's seed-notebook values come from the ladder (``ladder.LADDER``); a field
given explicitly overrides them.

This module imports neither TensorFlow nor Ray, so validating a whole grid costs milliseconds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from cifar_core.ladder import LADDER, MODEL_IDS

#: CIFAR-10's classes, in the order the data set numbers them (label 0..9).
CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)

OPTIMIZERS = ("sgd", "adam")
LEARNING_RATE_SCHEDULES = ("constant", "linear")
#: Keras dtype policies: float32, or float16/bfloat16 compute with float32 variables.
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
#: Test-time augmentation levels: 0 none, 1 horizontal flip (2 views), 2 flip x {no shift,
#: 1-px shift up-left, 1-px shift down-right} (6 views), airbench's levels.
TTA_LEVELS = (0, 1, 2)


class SettingsError(ValueError):
    """A settings field has an unknown name or a value outside its allowed range."""


def upgrade_legacy_fields(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with fields that older records and settings.json wrote in today's terms:
    ``mixed_precision`` (a bool, float16 when true) became ``precision``."""
    if "mixed_precision" not in config or "precision" in config:
        return config
    config = dict(config)
    legacy = config.pop("mixed_precision")
    if not isinstance(legacy, bool):
        raise SettingsError(f"mixed_precision={legacy!r} has type {type(legacy).__name__}, "
                            "expected bool")
    config["precision"] = "mixed_float16" if legacy else "float32"
    return config


def _help(text: str, **kwargs: Any) -> Any:
    """A dataclass field whose docstring travels as metadata (used for ``--help`` too)."""
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True)
class Settings:
    """Everything one training run depends on. Field names are the CLI flags and Tune keys."""

    model: str = _help(f"Model id from the ladder: {', '.join(MODEL_IDS)}.", default="M4")
    data: str = _help(
        "CIFAR-10 source: 'keras' (download), a cifar-10-batches-py directory, an image-folder "
        "directory <root>/{train,test}/<class>/*, or s3://bucket/prefix holding either.",
        default_factory=lambda: os.environ.get("CIFAR10_DATA", "keras"))
    limit: int | None = _help(
        "Use a stratified subset of N training images (and N/5 test images) for quick runs.",
        default=None)
    validation_fraction: float = _help(
        "Fraction of the training set held out (stratified, seeded) for validation.", default=0.1)
    seed: int = _help("Seed for weight init, shuffling and augmentation (vary it to repeat "
                      "a configuration).", default=0)
    split_seed: int = _help("Seed for the validation split and --limit subsets; kept apart "
                            "from seed so repeats share one data split.", default=0)
    num_epochs: int = _help("Training epochs (M7: phase-1 epochs, backbone frozen).", default=50)
    batch_size: int = _help("Global batch size in images per optimizer step.", default=512)
    optimizer: str = _help("'sgd' or 'adam'.", default="sgd")
    learning_rate: float = _help("Learning rate (M7: phase-1 rate).", default=0.01)
    momentum: float = _help("SGD momentum in [0, 1); ignored by Adam.", default=0.0)
    nesterov: bool = _help("Nesterov momentum for SGD.", default=False)
    dense_units: int = _help("Units of the hidden Dense layer of the head.", default=128)
    dropout_rate: float = _help("Dropout before the output layer (head), in [0, 1).",
                                default=0.0)
    conv_dropout_rate: float = _help("Dropout after each conv block (M4), in [0, 1).",
                                     default=0.0)
    image_size: int | None = _help(
        "Model input size in pixels (M5: 64, M7: 96; the 32-px images are resized per batch). "
        "None = the model's native 32 px.", default=None)
    augment_rotation: float = _help("Random rotation, as a fraction of a full turn (0 = off).",
                                    default=0.0)
    augment_shift: float = _help("Random width/height shift, as a fraction of size (0 = off).",
                                 default=0.0)
    augment_contrast: float = _help("Random contrast factor (0 = off).", default=0.0)
    augment_flip: bool = _help("Random horizontal flips.", default=False)
    backbone_weights: str = _help(
        "M5/M7 backbone weights: 'imagenet' (Keras download, cached), 'none' (random init), "
        "a local weights file (.h5) or an s3:// URI of one.", default="imagenet")
    backbone_alpha: float = _help(
        "MobileNetV2 width multiplier (M7); 1.0 is the seed's, smaller values are for tests.",
        default=1.0)
    fine_tune_epochs: int = _help("M7 phase-2 epochs (last layers unfrozen); 0 = no phase 2.",
                                  default=0)
    fine_tune_learning_rate: float = _help("M7 phase-2 learning rate.", default=1e-5)
    fine_tune_layers: int = _help("M7 phase 2: how many of the last backbone layers train.",
                                  default=50)
    early_stopping_patience: int = _help(
        "Stop a phase after this many epochs without a better val_accuracy, restoring the best "
        "weights (0 = off).", default=0)
    reduce_lr_patience: int = _help(
        "Multiply the learning rate by reduce_lr_factor after this many epochs without a lower "
        "val_loss (0 = off).", default=0)
    reduce_lr_factor: float = _help("Factor for reduce-LR-on-plateau, in (0, 1).", default=0.3)
    precision: str = _help(
        "Keras dtype policy: 'float32', 'mixed_float16' (GPUs with tensor cores) or "
        "'mixed_bfloat16' (CPUs with AVX-512 BF16 or AMX, and A100-class GPUs); the mixed "
        "policies keep variables, softmax and M8's whitening and GELUs in float32.",
        default="float32")
    xla: bool = _help("Compile the train step with XLA (jit_compile).", default=False)
    label_smoothing: float = _help("Label smoothing of the cross-entropy, in [0, 1) (0 = off).",
                                   default=0.0)
    weight_decay: float = _help(
        "Decoupled weight decay (Keras optimizers' weight_decay: each step w -= lr * wd * w); "
        "0 = off. With SGD momentum m it matches PyTorch's coupled decay wd * (1 - m).",
        default=0.0)
    learning_rate_schedule: str = _help(
        "'constant', or 'linear': after the warm-up, decay linearly to 0 at the phase's last "
        "step.", default="constant")
    warmup_fraction: float = _help(
        "Fraction of each phase's steps spent warming the rate up linearly from 0, in [0, 1).",
        default=0.0)
    ema_decay: float = _help(
        "Exponential moving average of the weights, per step, in [0, 1) (0 = off); validation, "
        "checkpoints and the test evaluation use the averaged weights.", default=0.0)
    widths: str = _help("M8: channels of its conv groups, comma-separated (e.g. '64,256,256'); "
                        "'' for models with fixed widths.", default="")
    whitening: bool = _help(
        "M8: a frozen 2x2 patch-whitening first conv computed from the training images "
        "(false: the same conv, trainable, randomly initialised).", default=False)
    dirac_init: bool = _help("M8: identity (Dirac) initialisation of its 3x3 convs.",
                             default=False)
    tta_level: int = _help(
        "Test-time augmentation inside the model: 0 none, 1 horizontal flip (2 views), 2 flip "
        "and 1-pixel shifts (6 views); the mean of the views' probabilities is the prediction "
        "in validation, test evaluation, scoring and serving alike.", default=0)

    # ------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "Settings":
        """Build from a (Tune, CLI or JSON) dict: the model's seed defaults, then ``config``.

        Keys whose value is None are treated as "not given", so CLI flags left unset keep the
        model's defaults.
        """
        if not isinstance(config, dict):
            raise SettingsError(f"settings must be an object of field: value pairs, got "
                                f"{type(config).__name__} {str(config)[:80]!r}")
        config = upgrade_legacy_fields({k: v for k, v in config.items() if v is not None})
        unknown = sorted(set(config) - set(cls.field_names()))
        if unknown:
            raise SettingsError(
                f"unknown settings field(s) {unknown}; valid fields: {cls.field_names()}")
        model = config.get("model", cls.__dataclass_fields__["model"].default)
        if model not in LADDER:
            raise SettingsError(
                f"model={model!r} is not a known model; valid models: {list(MODEL_IDS)}")
        return cls(**{**LADDER[model].seed_settings, **config, "model": model})

    @classmethod
    def from_json(cls, text: str) -> "Settings":
        try:
            config = json.loads(text)
        except ValueError as error:
            raise SettingsError(f"settings are not valid JSON ({error})") from error
        return cls.from_dict(config)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> "Settings":
        return Settings.from_dict({**self.to_dict(), **changes})

    # ------------------------------------------------------------------ derived values
    @property
    def input_size(self) -> int:
        """Side of the square image the model takes, in pixels."""
        return self.image_size or 32

    @property
    def width_list(self) -> tuple[int, ...]:
        """``widths`` as integers (empty for models with fixed widths)."""
        return tuple(int(part) for part in self.widths.split(",")) if self.widths else ()

    @property
    def total_epochs(self) -> int:
        """Epochs of all phases together (M7: phase 1 + phase 2)."""
        return self.num_epochs + self.fine_tune_epochs

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        if self.model not in LADDER:
            raise SettingsError(
                f"model={self.model!r} is not a known model; valid: {list(MODEL_IDS)}")
        self._check_types()
        for name in ("learning_rate", "fine_tune_learning_rate"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise SettingsError(f"{name}={value!r} must be a finite number > 0")
        for name in ("dropout_rate", "conv_dropout_rate", "momentum", "validation_fraction"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value < 1):
                raise SettingsError(f"{name}={value!r} must be in [0, 1)")
        if self.validation_fraction <= 0:
            raise SettingsError(
                f"validation_fraction={self.validation_fraction!r} must be > 0: the test set is "
                "never used for model selection, so a validation split is required")
        for name in ("num_epochs", "batch_size", "dense_units"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name}={getattr(self, name)!r} must be >= 1")
        for name in ("fine_tune_epochs", "fine_tune_layers", "early_stopping_patience",
                     "reduce_lr_patience", "seed", "split_seed"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name}={getattr(self, name)!r} must be >= 0")
        for name in ("augment_rotation", "augment_shift", "augment_contrast"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value <= 1):
                raise SettingsError(f"{name}={value!r} must be in [0, 1]")
        if not (0 < self.reduce_lr_factor < 1):
            raise SettingsError(f"reduce_lr_factor={self.reduce_lr_factor!r} must be in (0, 1)")
        if not (math.isfinite(self.backbone_alpha) and self.backbone_alpha > 0):
            raise SettingsError(f"backbone_alpha={self.backbone_alpha!r} must be > 0")
        if self.optimizer not in OPTIMIZERS:
            raise SettingsError(f"optimizer={self.optimizer!r} must be one of {OPTIMIZERS}")
        if self.limit is not None and self.limit < len(CLASS_NAMES):
            raise SettingsError(
                f"limit={self.limit!r} is smaller than the number of classes "
                f"({len(CLASS_NAMES)}): a stratified subset needs at least one image per class")
        if self.image_size is not None and self.image_size < 32:
            raise SettingsError(f"image_size={self.image_size!r} must be >= 32 (or None)")
        if self.fine_tune_epochs and LADDER[self.model].backbone is None:
            backbones = [m for m, r in LADDER.items() if r.backbone]
            raise SettingsError(
                f"fine_tune_epochs={self.fine_tune_epochs!r}: only {backbones} have a "
                "backbone to fine-tune")
        self._check_recipe()
        self._check_weights()
        if isinstance(self.data, str) and self.data != "keras" and not self.data.startswith("s3://"):
            object.__setattr__(self, "data", os.path.abspath(self.data))  # as for the weights

    def _check_types(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = f.type.replace(" ", "")
            if expected == "bool":
                ok = isinstance(value, bool)
            elif expected in ("int", "int|None"):
                ok = (isinstance(value, int) and not isinstance(value, bool)) or (
                    value is None and expected.endswith("None"))
                # Tune's grid values come back as numpy ints; accept integral numbers.
                if not ok and hasattr(value, "__index__") and not isinstance(value, bool):
                    object.__setattr__(self, f.name, int(value))
                    ok = True
            elif expected == "float":
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                if ok:
                    object.__setattr__(self, f.name, float(value))
                elif hasattr(value, "__float__") and not isinstance(value, (bool, str)):
                    object.__setattr__(self, f.name, float(value))
                    ok = True
            else:  # str
                ok = isinstance(value, str)
            if not ok:
                raise SettingsError(
                    f"{f.name}={value!r} has type {type(value).__name__}, expected {f.type}")

    def _check_recipe(self) -> None:
        """The fast-training recipe's fields (M8's, most of them usable by any model)."""
        for name in ("label_smoothing", "warmup_fraction", "ema_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value < 1):
                raise SettingsError(f"{name}={value!r} must be in [0, 1)")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise SettingsError(
                f"weight_decay={self.weight_decay!r} must be a finite number >= 0")
        if self.learning_rate_schedule not in LEARNING_RATE_SCHEDULES:
            raise SettingsError(f"learning_rate_schedule={self.learning_rate_schedule!r} must be "
                                f"one of {LEARNING_RATE_SCHEDULES}")
        scheduled = self.learning_rate_schedule != "constant" or self.warmup_fraction > 0
        if scheduled and self.reduce_lr_patience:
            raise SettingsError(
                f"reduce_lr_patience={self.reduce_lr_patience!r} cannot be combined with "
                f"learning_rate_schedule={self.learning_rate_schedule!r}/warmup_fraction="
                f"{self.warmup_fraction!r}: both would set the learning rate")
        if self.ema_decay and self.early_stopping_patience:
            raise SettingsError(
                f"ema_decay={self.ema_decay!r} cannot be combined with early_stopping_patience="
                f"{self.early_stopping_patience!r}: both restore weights at the end of training")
        if self.precision not in PRECISIONS:
            raise SettingsError(f"precision={self.precision!r} must be one of {PRECISIONS}")
        shifts = {n: getattr(self, n) for n in ("augment_rotation", "augment_shift")
                  if getattr(self, n)}
        if self.xla and shifts:
            # RandomRotation/RandomTranslation run ImageProjectiveTransformV3, which has no XLA
            # kernel: fit fails at its first step ("Detected unsupported operations ... on
            # XLA_CPU_JIT: ImageProjectiveTransformV3", TF 2.21).
            raise SettingsError(
                f"xla=True cannot compile the random {'/'.join(sorted(shifts))} augmentation "
                f"({', '.join(f'{n}={v!r}' for n, v in sorted(shifts.items()))}): TensorFlow "
                "has no XLA kernel for ImageProjectiveTransformV3; set them to 0 or xla=False")
        if self.tta_level not in TTA_LEVELS:
            raise SettingsError(f"tta_level={self.tta_level!r} must be one of {TTA_LEVELS}")
        try:
            widths = self.width_list
        except ValueError:
            widths = (0,)
        if any(width < 1 for width in widths):
            raise SettingsError(f"widths={self.widths!r} must be positive integers separated "
                                "by commas, e.g. '64,256,256'")
        reads = LADDER[self.model].architecture_settings
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in ("widths", "whitening", "dirac_init", "tta_level"):
            if getattr(self, name) != defaults[name] and name not in reads:
                readers = [m for m, r in LADDER.items() if name in r.architecture_settings]
                raise SettingsError(f"{name}={getattr(self, name)!r}: only {readers} read "
                                    f"{name}; model {self.model} has no such option")
        if "widths" in reads and not widths:
            raise SettingsError(f"widths={self.widths!r}: model {self.model} needs its conv "
                                "widths, e.g. '64,256,256'")

    def _check_weights(self) -> None:
        weights = self.backbone_weights
        if weights in ("imagenet", "none") or weights.startswith("s3://"):
            return  # an s3:// object is checked when it is fetched, on the machine that trains
        if not os.path.isfile(weights) or not os.access(weights, os.R_OK):
            raise SettingsError(
                f"backbone_weights={weights!r} is not 'imagenet', 'none', an s3:// URI or a "
                "readable file")
        # Ray workers run in other folders: a relative path would point elsewhere there.
        object.__setattr__(self, "backbone_weights", os.path.abspath(weights))


def add_settings_arguments(parser: Any, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--field-name`` flag per settings field to an argparse parser.

    Flags default to None so that ``Settings.from_dict`` keeps each model's seed defaults
    for anything not given on the command line.
    """
    for f in dataclasses.fields(Settings):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = f.type.replace(" ", "")
        help_text = f.metadata.get("help", "")
        if kind == "bool":
            parser.add_argument(flag, dest=f.name, default=None, help=help_text,
                                type=_parse_bool, metavar="{true,false}")
        elif kind.startswith("int"):
            parser.add_argument(flag, dest=f.name, type=int, default=None, help=help_text)
        elif kind == "float":
            parser.add_argument(flag, dest=f.name, type=float, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=help_text)


def check_global_batch(settings: Settings, replicas: int) -> None:
    """The global batch must split evenly, or replicas would weight their examples unequally."""
    if settings.batch_size % replicas:
        raise SettingsError(
            f"batch_size={settings.batch_size} (the global batch) does not divide evenly over "
            f"{replicas} replicas; use a multiple of {replicas}")


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def settings_from_args(args: Any) -> Settings:
    """The ``Settings`` named by an argparse namespace built with ``add_settings_arguments``."""
    names = set(Settings.field_names())
    return Settings.from_dict({k: v for k, v in vars(args).items() if k in names})
