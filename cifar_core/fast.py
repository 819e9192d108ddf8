"""M8's fast-training pieces: patch whitening from data, test-time augmentation layers, the
weight average and the warm-up/linear-decay learning rate.

Read to learn, written anew for tf_keras: airbench (Keller Jordan, github.com/KellerJordan/
cifar10-airbench) and David Page's "How to train your ResNet" (myrtle.ai, 2018). The builder
is ``models.build_m8``; ``train.train`` adds the callbacks from the settings. The two TTA
layers are registered Keras objects (``models.ALLOWED_KERAS_OBJECTS`` lists them), so a saved
M8 predicts with its test-time augmentation wherever it is loaded: evaluation, ``cifar score``
and ``cifar serve`` all call the model with ``training=False`` and get the same mean of views.
No Ray here.
"""

from __future__ import annotations

import numpy as np

import cifar_core  # noqa: F401  (selects tf_keras before TensorFlow loads)
import tensorflow as tf
import tf_keras as keras

#: Name of M8's whitening conv; ``initialise_whitening`` finds it by this name.
WHITENING_LAYER = "whitening"
#: Side of the whitening patches (airbench: 2x2, so 2*2*3 = 12 eigenvectors, 24 filters as +/-).
PATCH_SIZE = 2
#: Training images the patch covariance is estimated from (airbench uses 5,000).
WHITENING_IMAGES = 5000
#: Added to the eigenvalues before 1/sqrt: airbench's 5e-4 for inputs normalised to unit std,
#: rescaled to our [0, 1] inputs (CIFAR-10's pixel std is ~0.25, so variances are ~16x smaller).
WHITENING_EPS = 5e-4 * 0.25 ** 2


# ---------------------------------------------------------------------------- whitening
def whitening_weights(images: np.ndarray, eps: float = WHITENING_EPS):
    """(kernel (2, 2, C, 2*2*2*C), bias) of a conv that whitens 2x2 patches of ``images``.

    ``images`` are float (N, H, W, C) as the model sees them. Filters are the patch
    covariance's eigenvectors scaled by 1/sqrt(eigenvalue + eps), largest first, each also
    negated (airbench's +/- pair, so a following GELU keeps both signs). The bias subtracts the
    mean patch (airbench's inputs are already centred; ours are in [0, 1]).
    """
    images = np.asarray(images, np.float32)
    channels = images.shape[-1]
    dim = PATCH_SIZE * PATCH_SIZE * channels
    total, outer, count = np.zeros(dim), np.zeros((dim, dim)), 0
    for start in range(0, len(images), 500):  # chunks: all patches of 5,000 images are ~0.5 GB
        windows = np.lib.stride_tricks.sliding_window_view(
            images[start:start + 500], (PATCH_SIZE, PATCH_SIZE), axis=(1, 2))
        # (n, h, w, C, kh, kw) -> rows in the (kh, kw, C) order of a Keras conv kernel.
        patches = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, dim).astype(np.float64)
        total += patches.sum(axis=0)
        outer += patches.T @ patches
        count += len(patches)
    mean = total / count
    covariance = outer / count - np.outer(mean, mean)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)  # ascending
    order = np.argsort(eigenvalues)[::-1]
    filters = eigenvectors[:, order] / np.sqrt(np.maximum(eigenvalues[order], 0) + eps)
    filters = np.concatenate([filters, -filters], axis=1)  # (dim, 2 * dim)
    kernel = filters.reshape(PATCH_SIZE, PATCH_SIZE, channels, 2 * dim)
    return kernel.astype(np.float32), (-(mean @ filters)).astype(np.float32)


def initialise_whitening(model: keras.Model, images: np.ndarray) -> bool:
    """Set a frozen whitening layer of ``model`` from ``images`` (the first
    ``WHITENING_IMAGES``); False when the model has none (or it trains, whitening off)."""
    try:
        layer = model.get_layer(WHITENING_LAYER)
    except ValueError:
        return False
    if layer.trainable:
        return False
    layer.set_weights(list(whitening_weights(images[:WHITENING_IMAGES])))
    return True


def dirac_initialise(model: keras.Model) -> None:
    """Identity-initialise every 3x3 conv (airbench: ``dirac_`` on the first C_in filters), so
    each starts by passing its input through; the remaining filters keep their random init."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D) and layer.kernel_size == (3, 3):
            kernel, *rest = layer.get_weights()
            n = min(kernel.shape[2], kernel.shape[3])
            kernel[:, :, :, :n] = 0
            kernel[1, 1, np.arange(n), np.arange(n)] = 1
            layer.set_weights([kernel, *rest])


# ------------------------------------------------------------------ test-time augmentation
def tta_views(images, level: int):
    """The views TTA averages, concatenated along the batch axis (view-major).

    Level 1: the image and its mirror. Level 2: those, plus both shifted by one pixel up-left
    and down-right with reflect padding (airbench's level 2; it weights the views unequally,
    we take the plain mean)."""
    views = [images]
    if level >= 2:
        padded = tf.pad(images, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="REFLECT")
        height, width = tf.shape(images)[1], tf.shape(images)[2]
        views += [padded[:, :height, :width], padded[:, 2:height + 2, 2:width + 2]]
    return tf.concat([view for image in views for view in (image, tf.reverse(image, [2]))], 0)


def tta_view_count(level: int) -> int:
    return {0: 1, 1: 2, 2: 6}[level]


def describe_tta(level: int) -> str:
    """What the evaluation summary says about test-time augmentation."""
    return {0: "none", 1: "horizontal flip: mean of 2 views",
            2: "horizontal flip x 1-pixel shifts: mean of 6 views"}[level]


@keras.saving.register_keras_serializable(package="cifar_fleet")
class TestTimeViews(keras.layers.Layer):
    """At inference, replace each image by its TTA views (batch grows by the view count);
    while training, pass the batch through untouched."""

    def __init__(self, level: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.level = int(level)

    def call(self, images, training=None):
        if training is None:
            training = keras.backend.learning_phase()
        # smart_cond picks a branch at trace time when ``training`` is a Python bool, as
        # fit/evaluate/predict and model(x, training=False) pass it.
        return tf.__internal__.smart_cond.smart_cond(
            training, lambda: images, lambda: tta_views(images, self.level))

    def get_config(self) -> dict:
        return {**super().get_config(), "level": self.level}


@keras.saving.register_keras_serializable(package="cifar_fleet")
class TestTimeMean(keras.layers.Layer):
    """At inference, the mean over ``TestTimeViews``' views of each image's probabilities."""

    def __init__(self, level: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.level = int(level)

    def call(self, probabilities, training=None):
        if training is None:
            training = keras.backend.learning_phase()
        views = tta_view_count(self.level)

        def mean_of_views():
            grouped = tf.reshape(probabilities, [views, -1, tf.shape(probabilities)[-1]])
            return tf.reduce_mean(grouped, axis=0)

        return tf.__internal__.smart_cond.smart_cond(
            training, lambda: probabilities, mean_of_views)

    def get_config(self) -> dict:
        return {**super().get_config(), "level": self.level}


# ---------------------------------------------------------------------------- callbacks
class WarmupLinearDecay(keras.callbacks.Callback):
    """Per-step learning rate: linear warm-up from 0 over ``warmup_fraction`` of the phase's
    steps, then constant or (``decay``) linear down to 0 at its last step.

    The step is the optimizer's own ``iterations``, which a checkpoint restores, so a resumed
    phase continues the schedule where it stopped; a new phase compiles a new optimizer and
    starts its own schedule. A callback rather than a ``LearningRateSchedule`` object: the
    saved optimizer config then names no custom class."""

    def __init__(self, peak: float, epochs: int, warmup_fraction: float, decay: bool):
        super().__init__()
        self.peak, self.epochs = peak, epochs
        self.warmup_fraction, self.decay = warmup_fraction, decay
        self.total_steps = 0

    def rate(self, step: int) -> float:
        warmup = round(self.warmup_fraction * self.total_steps)
        if step < warmup:
            return self.peak * (step + 1) / warmup
        if not self.decay:
            return self.peak
        return self.peak * max(0.0, (self.total_steps - step) / max(1, self.total_steps - warmup))

    def on_train_begin(self, logs=None):
        self.total_steps = int(self.params["steps"]) * self.epochs

    def on_epoch_begin(self, epoch, logs=None):
        self.on_train_batch_begin(0)  # so the epoch's recorded learning_rate is its first step's

    def on_train_batch_begin(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        self.model.optimizer.learning_rate.assign(self.rate(step))


class WeightAverage(keras.callbacks.Callback):
    """An exponential moving average of all model weights (BatchNorm statistics included),
    updated after every step; validation, the epoch's checkpoints and whatever follows
    training see the average, while the optimizer keeps stepping the raw weights.

    Swaps the average in when validation starts (``on_test_begin``) and the raw weights back
    after the epoch's checkpoint (so put this callback after ``train.EpochCheckpoint``); at the
    end of training the model keeps the average. A resumed run restarts the average from the
    checkpoint's (averaged) weights. The decay warms up as min(decay, (1 + t) / (10 + t)) so
    the first steps' random weights fade fast."""

    def __init__(self, decay: float):
        super().__init__()
        self.decay = decay
        self.average: list[tf.Variable] = []
        self.raw: list[np.ndarray] | None = None
        self._steps, self._swapped = 0, False

    def on_train_begin(self, logs=None):
        self.average = [tf.Variable(w, trainable=False) for w in self.model.weights]
        self._steps, self._swapped, self.raw = 0, False, None
        self._update = _average_update(self.average, list(self.model.weights))

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1
        decay = min(self.decay, (1 + self._steps) / (10 + self._steps))
        self._update(tf.constant(decay, tf.float32))

    def on_test_begin(self, logs=None):
        self._swap_in_average()

    def on_epoch_end(self, epoch, logs=None):
        if self._swapped:
            for weight, raw in zip(self.model.weights, self.raw):
                weight.assign(raw)
            self._swapped = False

    def on_train_end(self, logs=None):
        self._swap_in_average()

    def _swap_in_average(self) -> None:
        if self._swapped or not self.average:
            return
        self.raw = [weight.numpy() for weight in self.model.weights]
        for weight, average in zip(self.model.weights, self.average):
            weight.assign(tf.cast(average, weight.dtype))
        self._swapped = True


def _average_update(average: list, weights: list):
    """One traced step ``average <- decay * average + (1 - decay) * weights``.

    The variables are captured, not passed: under a mixed-precision policy the model's weights
    are AutoCastVariables, and a tf.function given them as arguments traces again on every
    call (measured: one trace per step, epochs slowing 23 s -> 112 s over four)."""
    @tf.function
    def update(decay):
        for mean, weight in zip(average, weights):
            mean.assign(decay * mean + (1 - decay) * tf.cast(weight, mean.dtype))
    return update
