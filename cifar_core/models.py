"""The Keras side of the model ladder: a builder per model id, and the one safe loader.

``MODELS`` maps a model id to a builder returning an uncompiled Keras model; ``build_model``
adds the optimizer, loss and metrics. Exact architectures of M1-M7 are in
../shared/docs/model-ladder.md; M8 (not in the notebook) is ``build_m8`` with its pieces in
``fast.py``; everything else about a model (seed settings and accuracy,
default grid, GPU share, smoke settings) is data in ``ladder.py``. ``load_checkpoint_model``
is the only way a checkpoint is loaded. No Ray here.
"""

from __future__ import annotations

import os
from typing import Callable

import cifar_core  # noqa: F401  (selects tf_keras before TensorFlow loads)
import tf_keras as keras
from tf_keras import layers

from cifar_core import fast
from cifar_core.keras_archive import ModelError, check_keras_archive
from cifar_core.ladder import LADDER
from cifar_core.settings import CLASS_NAMES, Settings, SettingsError

NUM_CLASSES = len(CLASS_NAMES)
BACKBONE_NAME = "backbone"


def _inputs_and_augmentation(settings: Settings, shift_interpolation: str = "bilinear"):
    """The input layer and the random augmentation layers the settings ask for.

    Keras preprocessing layers are inactive at inference, so a saved model scores unaugmented.
    Order as the seed's M6: contrast, flip, rotation; then shifts (M7; M8 shifts by whole
    pixels with ``shift_interpolation="nearest"``, as airbench's translations are). They run
    in float32 under any policy: cheap, and the first layer then sees unrounded pixels.
    """
    size = settings.input_size
    inputs = keras.Input(shape=(size, size, 3), name="image")
    x = inputs
    exact = {"seed": settings.seed, "dtype": "float32"}
    if settings.augment_contrast:
        x = layers.RandomContrast(settings.augment_contrast, **exact)(x)
    if settings.augment_flip:
        x = layers.RandomFlip("horizontal", **exact)(x)
    if settings.augment_rotation:
        x = layers.RandomRotation(settings.augment_rotation, **exact)(x)
    if settings.augment_shift:
        x = layers.RandomTranslation(settings.augment_shift, settings.augment_shift,
                                     interpolation=shift_interpolation, **exact)(x)
    return inputs, x


def _classifier(x, units: int):
    # float32 output keeps softmax and the loss numerically safe under mixed precision.
    return layers.Dense(units, activation="softmax", dtype="float32", name="predictions")(x)


def _conv(filters: int, padding: str = "same"):
    return layers.Conv2D(filters, 3, padding=padding, activation="relu")


def build_m1(settings: Settings) -> keras.Model:
    """M1: baseline small CNN, one valid 3x3 conv, max-pool, Dense100."""
    inputs, x = _inputs_and_augmentation(settings)
    x = _conv(32, padding="valid")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(settings.dense_units, activation="relu")(x)
    x = layers.Dropout(settings.dropout_rate)(x) if settings.dropout_rate else x
    return keras.Model(inputs, _classifier(x, NUM_CLASSES), name="M1")


def build_m2(settings: Settings) -> keras.Model:
    """M2: two 3x3 conv layers, max-pool, Dense128."""
    inputs, x = _inputs_and_augmentation(settings)
    x = _conv(32)(x)
    x = _conv(32)(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(settings.dense_units, activation="relu")(x)
    x = layers.Dropout(settings.dropout_rate)(x) if settings.dropout_rate else x
    return keras.Model(inputs, _classifier(x, NUM_CLASSES), name="M2")


def build_m4(settings: Settings) -> keras.Model:
    """M4: two conv blocks (32, 64) with dropout after each, Dense128, dropout 0.5."""
    inputs, x = _inputs_and_augmentation(settings)
    for filters in (32, 64):
        x = _conv(filters)(x)
        x = _conv(filters)(x)
        x = layers.MaxPooling2D(2)(x)
        x = layers.Dropout(settings.conv_dropout_rate)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(settings.dense_units, activation="relu")(x)
    x = layers.Dropout(settings.dropout_rate)(x)
    return keras.Model(inputs, _classifier(x, NUM_CLASSES), name="M4")


def build_m5(settings: Settings) -> keras.Model:
    """M5: frozen VGG16 base at 64x64, Flatten, Dense256, dropout 0.5."""
    from tf_keras.applications import VGG16

    size = settings.input_size
    backbone = VGG16(include_top=False, weights=resolve_backbone_weights(settings),
                     input_shape=(size, size, 3))
    return _transfer_model(settings, backbone, layers.Flatten())


def build_m6(settings: Settings) -> keras.Model:
    """M6: VGG-style 64/128/256 conv blocks with BatchNorm, behind random augmentation."""
    inputs, x = _inputs_and_augmentation(settings)
    for filters in (64, 128, 256):
        x = _conv(filters)(x)
        x = _conv(filters)(x)
        x = layers.MaxPooling2D(2)(x)
        x = layers.BatchNormalization()(x)
    x = layers.Flatten()(x)
    x = layers.Dense(settings.dense_units, activation="relu")(x)
    x = layers.Dropout(settings.dropout_rate)(x)
    return keras.Model(inputs, _classifier(x, NUM_CLASSES), name="M6")


def build_m7(settings: Settings) -> keras.Model:
    """M7: MobileNetV2 at 96x96 (transfer learning), GAP, dropout, Dense256, dropout."""
    from tf_keras.applications import MobileNetV2

    size = settings.input_size
    backbone = MobileNetV2(include_top=False, weights=resolve_backbone_weights(settings),
                           input_shape=(size, size, 3), alpha=settings.backbone_alpha)
    return _transfer_model(settings, backbone, layers.GlobalAveragePooling2D(),
                           dropout_before_dense=True)


def _transfer_model(settings: Settings, backbone: keras.Model, pooling: layers.Layer,
                    dropout_before_dense: bool = False) -> keras.Model:
    """Backbone (frozen, BatchNorm in inference mode) + the seed's classification head."""
    backbone._name = BACKBONE_NAME  # a stable name: phases find the backbone by it
    backbone.trainable = False
    inputs, x = _inputs_and_augmentation(settings)
    # training=False keeps BatchNorm layers on their pretrained moving statistics even after
    # phase 2 unfreezes them: small fine-tuning batches would otherwise overwrite them.
    x = backbone(x, training=False)
    x = pooling(x)
    if dropout_before_dense:
        x = layers.Dropout(settings.dropout_rate)(x)
    x = layers.Dense(settings.dense_units, activation="relu")(x)
    x = layers.Dropout(settings.dropout_rate)(x)
    return keras.Model(inputs, _classifier(x, NUM_CLASSES), name=settings.model)


def _gelu():
    # float32 under any policy: TensorFlow's CPU GELU and its gradient run about half as fast
    # in bfloat16 as in float32 plus the casts (results/bench-throughput.md, "bf16 GELU").
    return layers.Activation("gelu", dtype="float32")


def build_m8(settings: Settings) -> keras.Model:
    """M8: fast from-scratch VGG (airbench-style): frozen patch whitening, 3 BN conv groups."""
    inputs, x = _inputs_and_augmentation(settings, shift_interpolation="nearest")
    if settings.tta_level:
        x = fast.TestTimeViews(settings.tta_level, dtype="float32", name="tta_views")(x)
    # Frozen when whitening is on: ``initialise_whitening`` sets it from the training images.
    # float32 under any policy: whitening filters of small-eigenvalue directions are large
    # and of mixed sign, so their sums cancel; bf16's 8-bit mantissa would leave noise.
    x = layers.Conv2D(2 * fast.PATCH_SIZE ** 2 * 3, fast.PATCH_SIZE, padding="valid",
                      trainable=not settings.whitening, dtype="float32",
                      name=fast.WHITENING_LAYER)(x)
    x = _gelu()(x)
    for width in settings.width_list:
        # airbench's ConvGroup: conv, pool, BN, GELU, conv, BN, GELU. BN momentum 0.9 (Keras
        # convention; PyTorch 0.1) as a short run has only a few hundred steps.
        x = layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
        x = layers.MaxPooling2D(2)(x)
        x = layers.BatchNormalization(momentum=0.9)(x)
        x = _gelu()(x)
        x = layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization(momentum=0.9)(x)
        x = _gelu()(x)
    x = layers.GlobalMaxPooling2D()(x)
    x = layers.Dense(NUM_CLASSES, use_bias=False)(x)
    x = layers.Rescaling(0.125)(x)  # Page's fixed logit scale: softer logits, steadier BN net
    x = layers.Activation("softmax", dtype="float32", name="predictions")(x)
    if settings.tta_level:
        x = fast.TestTimeMean(settings.tta_level, dtype="float32", name="tta_mean")(x)
    model = keras.Model(inputs, x, name="M8")
    if settings.dirac_init:
        fast.dirac_initialise(model)
    return model


MODELS: dict[str, Callable[[Settings], keras.Model]] = {
    "M1": build_m1,
    "M2": build_m2,
    "M4": build_m4,
    "M5": build_m5,
    "M6": build_m6,
    "M7": build_m7,
    "M8": build_m8,
}
assert list(MODELS) == list(LADDER), "the registry and the ladder must list the same ids"


def resolve_backbone_weights(settings: Settings) -> str | None:
    """What Keras applications take as ``weights``: 'imagenet', None or a local file path."""
    weights = settings.backbone_weights
    if weights == "none":
        return None
    if weights == "imagenet":
        return "imagenet"  # Keras downloads once into ~/.keras/models and reuses the file
    if weights.startswith("s3://"):
        from cifar_core.storage import download_s3_file

        return str(download_s3_file(weights))
    return weights


def make_optimizer(name: str, learning_rate: float, settings: Settings):
    # weight_decay only when asked for, so other models' optimizer configs stay as they were.
    decay = {"weight_decay": settings.weight_decay} if settings.weight_decay else {}
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=learning_rate, **decay)
    return keras.optimizers.SGD(learning_rate=learning_rate, momentum=settings.momentum,
                                nesterov=settings.nesterov, **decay)


def compile_model(model: keras.Model, settings: Settings, learning_rate: float) -> None:
    loss = ("categorical_crossentropy" if not settings.label_smoothing else
            keras.losses.CategoricalCrossentropy(label_smoothing=settings.label_smoothing))
    model.compile(optimizer=make_optimizer(settings.optimizer, learning_rate, settings),
                  loss=loss, metrics=["accuracy"], jit_compile=settings.xla)


def use_precision(settings: Settings) -> None:
    """Set Keras' global dtype policy to ``settings.precision`` before building or resuming a
    model: layers take it at construction, and compile wraps the optimizer for loss scaling
    under mixed_float16 only when the policy is set."""
    keras.mixed_precision.set_global_policy(settings.precision)


def build_model(settings: Settings, compile: bool = True,
                train_images=None) -> keras.Model:
    """Build (and compile, at the phase-1 learning rate) the model ``settings.model`` names.

    ``train_images`` (uint8, as ``Cifar10.x_train``): layers computed from the training data
    are set from them (M8's frozen whitening). Training always passes them; without them such
    a layer keeps its random initial values (only fit for shape checks)."""
    if settings.model not in MODELS:
        raise ModelError(f"unknown model {settings.model!r}; valid models: {sorted(MODELS)}")
    use_precision(settings)
    keras.utils.set_random_seed(settings.seed)
    model = MODELS[settings.model](settings)
    if train_images is not None and settings.whitening:
        from cifar_core.data import preprocess_images  # the inputs exactly as the model sees them

        fast.initialise_whitening(model, preprocess_images(
            train_images[:fast.WHITENING_IMAGES], settings.input_size).numpy())
    if compile:
        compile_model(model, settings, settings.learning_rate)
    return model


def backbone_of(model: keras.Model) -> keras.Model | None:
    try:
        return model.get_layer(BACKBONE_NAME)
    except ValueError:
        return None


def set_trainable_backbone_layers(model: keras.Model, count: int) -> None:
    """Freeze the backbone except its last ``count`` layers (0: all frozen). Head stays trainable.

    Call ``compile_model`` afterwards: Keras only picks up ``trainable`` changes on compile.
    """
    backbone = backbone_of(model)
    if backbone is None:
        if count:
            raise SettingsError(f"model {model.name} has no backbone to unfreeze")
        return
    backbone.trainable = count > 0
    if count:
        for index, layer in enumerate(backbone.layers):
            layer.trainable = index >= len(backbone.layers) - count


def load_checkpoint_model(path: str | os.PathLike, compile: bool = True) -> keras.Model:
    """The one way this project loads a model: ``check_keras_archive``, then Keras with
    ``safe_mode=True``. ``compile=False`` for inference (no optimizer rebuilt)."""
    check_keras_archive(path)
    try:
        return keras.models.load_model(str(path), safe_mode=True, compile=compile)
    except Exception as error:
        raise ModelError(f"{path}: cannot load model safely ({error})") from error
