"""cifar-fleet core library: data, the M1–M7 model ladder, one training function, evaluation.

The Keras switch lives here, in one place. cifar-fleet runs on ``tf_keras`` (Keras 2, selected
through ``TF_USE_LEGACY_KERAS=1``) rather than Keras 3, because Keras 3 with
``MultiWorkerMirroredStrategy`` and ``fit`` is broken upstream (keras-team/keras#20585,
ray-project/ray#47464) and the same Keras must serve single-process trials and multi-worker
Ray Train runs. The variable only takes effect if it is set before TensorFlow is first imported,
so importing ``cifar_core`` sets it, and ``ray_glue.connect_ray`` carries it to every Ray
worker (``KERAS_ENV_VARS``).
"""

import os
import sys

#: Environment every process that touches Keras needs; ``ray_glue.connect_ray`` passes it on.
KERAS_ENV_VARS = {"TF_USE_LEGACY_KERAS": "1"}

for _name, _value in KERAS_ENV_VARS.items():
    os.environ.setdefault(_name, _value)

if "tensorflow" in sys.modules and os.environ.get("TF_USE_LEGACY_KERAS") != "1":
    # TensorFlow already chose Keras 3; training would silently use the wrong Keras.
    raise ImportError(
        "cifar_core must be imported before tensorflow, or TF_USE_LEGACY_KERAS=1 must be set "
        "in the environment: cifar-fleet runs on tf_keras (see README, 'Keras choice')."
    )

# Quieter TensorFlow start-up logs (C++ INFO lines); a user's own setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

__version__ = "0.1.0"
