"""What a ``.keras`` checkpoint archive may hold, checked before Keras (or TensorFlow) is
loaded: ``check_keras_archive`` is the first half of the one safe loader
(``models.load_checkpoint_model``), and cheap enough for a job to run before it starts Ray.
No TensorFlow, no Ray.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any


class ModelError(ValueError):
    """A model id is unknown or a checkpoint cannot be loaded safely."""


#: The only Keras objects a checkpoint may name, by (module, class_name) as tf_keras writes them
#: into a ``.keras`` archive's config.json: what this project's models are made of. tf_keras
#: resolves a config's ``module`` with ``importlib.import_module`` and calls ``from_config`` on
#: whatever class it finds there, so a hand-made config could reach far beyond Lambda layers
#: (which ``safe_mode`` alone refuses). A model that needs another layer adds it here; the
#: registry test saves and reloads every model, so a missing entry fails at once.
ALLOWED_KERAS_OBJECTS: dict[str, frozenset[str]] = {
    "keras.layers": frozenset({
        "InputLayer", "Conv2D", "DepthwiseConv2D", "Dense", "Dropout", "Flatten",
        "MaxPooling2D", "AveragePooling2D", "GlobalAveragePooling2D", "GlobalMaxPooling2D",
        "BatchNormalization", "ReLU", "Activation", "Add", "Multiply", "Concatenate",
        "ZeroPadding2D", "Rescaling", "Resizing", "RandomContrast", "RandomFlip",
        "RandomRotation", "RandomTranslation"}),
    # M8's test-time augmentation (cifar_core/fast.py), registered as "cifar_fleet>Name".
    "cifar_core.fast": frozenset({
        "TestTimeViews", "TestTimeViews (registered as cifar_fleet>TestTimeViews)",
        "TestTimeMean", "TestTimeMean (registered as cifar_fleet>TestTimeMean)"}),
    "keras.initializers": frozenset({
        "Constant", "GlorotNormal", "GlorotUniform", "HeNormal", "HeUniform", "Identity",
        "LecunNormal", "LecunUniform", "Ones", "Orthogonal", "RandomNormal", "RandomUniform",
        "TruncatedNormal", "VarianceScaling", "Zeros"}),
    "keras.optimizers": frozenset({"Adam", "AdamW", "SGD"}),
    "keras.optimizers.schedules": frozenset({"CosineDecay", "PiecewiseConstantDecay",
                                             "PolynomialDecay"}),
    "keras.regularizers": frozenset({"L1", "L2", "L1L2"}),
    "keras.losses": frozenset({"CategoricalCrossentropy"}),
    "keras.mixed_precision": frozenset({"Policy"}),
    "tf_keras.src.engine.functional": frozenset({"Functional"}),
}
#: Plain values tf_keras serialises as tagged dicts (no module, nothing to import or call).
VALUE_TAGS = frozenset({"__tensor__", "__numpy__", "__bytes__"})
#: What a tf_keras ``.keras`` archive holds; anything else in the zip is refused.
ARCHIVE_MEMBERS = frozenset({"config.json", "metadata.json", "model.weights.h5"})
#: config.json of the largest model here (M7) is ~150 kB; a cap keeps a zip bomb out.
MAX_CONFIG_BYTES = 16 * 2**20


def check_keras_archive(path: str | os.PathLike) -> None:
    """Refuse anything but a tf_keras ``.keras`` zip archive naming only allowed objects.

    Runs *before* Keras sees the file: tf_keras applies ``safe_mode`` only to zip archives;
    an HDF5 file or a SavedModel folder at ``model.keras`` goes to its legacy loader, which
    runs a Lambda layer's marshalled bytecode. Raises ``ModelError`` naming the problem.
    """
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"{path}: is a folder (a SavedModel?), not a .keras archive; only "
                         "zip-format .keras checkpoints are loaded")
    if not zipfile.is_zipfile(path):
        raise ModelError(f"{path}: not a zip-format .keras archive (HDF5 and SavedModel "
                         "checkpoints are refused: their loader can run code from the file)")
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename: info for info in archive.infolist()}
            unexpected = sorted(set(members) - ARCHIVE_MEMBERS)
            if unexpected or "config.json" not in members:
                found = unexpected or "(no config.json)"
                raise ModelError(f"{path}: unexpected archive contents {found}; a .keras "
                                 f"checkpoint holds {sorted(ARCHIVE_MEMBERS)}")
            if members["config.json"].file_size > MAX_CONFIG_BYTES:
                raise ModelError(f"{path}: config.json is {members['config.json'].file_size} "
                                 f"bytes, over the {MAX_CONFIG_BYTES}-byte cap")
            config = json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise ModelError(f"{path}: unreadable .keras archive ({error})") from error
    for module, name in _named_objects(config):
        if name in VALUE_TAGS and module is None:
            continue
        if name not in ALLOWED_KERAS_OBJECTS.get(module, ()):
            raise ModelError(
                f"{path}: refused: it names {name!r} (module {module!r}), which is not among "
                "the Keras objects cifar-fleet models are built from; anything else (Lambda "
                "layers, custom objects, other modules) could mean arbitrary code execution "
                "on load")


def _named_objects(node: Any):
    """(module, class_name) of every serialised object in a Keras config, depth first."""
    if isinstance(node, dict):
        if "class_name" in node:
            registered = node.get("registered_name")
            if registered not in (None, node["class_name"]):
                yield node.get("module"), f"{node['class_name']} (registered as {registered})"
            yield node.get("module"), node["class_name"]
        for value in node.values():
            yield from _named_objects(value)
    elif isinstance(node, list):
        for value in node:
            yield from _named_objects(value)
