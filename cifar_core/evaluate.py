"""Test-set evaluation: loss, accuracy, confusion matrix, per-class precision and recall.

Only ever called after training, on the model selected by val_accuracy: the test set plays no
part in model selection.
"""

from __future__ import annotations

import numpy as np

from cifar_core.data import Cifar10, make_dataset
from cifar_core.settings import CLASS_NAMES, Settings


def classification_summary(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Accuracy, confusion matrix (rows = true class) and per-class metrics, JSON-ready."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    labels = list(range(len(CLASS_NAMES)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "class_names": list(CLASS_NAMES),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]),
                   "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(CLASS_NAMES)
        },
    }


def evaluate(model, data: Cifar10, settings: Settings) -> dict:
    """Evaluate ``model`` on ``data``'s test split; Keras metric names with a ``test_`` prefix.

    Test-time augmentation (``tta_level``, M8) lives inside the saved model, so what is
    evaluated here is what ``cifar score`` and ``cifar serve`` predict; the summary says which.
    """
    from cifar_core.fast import describe_tta  # TensorFlow: only once there is a model

    test_data = make_dataset(data.x_test, data.y_test, settings, training=False)
    test_loss, test_accuracy = model.evaluate(test_data, verbose=0)
    probabilities = model.predict(test_data, verbose=0)
    summary = classification_summary(data.y_test, probabilities.argmax(axis=1))
    return {"test_loss": float(test_loss), "test_accuracy": float(test_accuracy),
            "test_images": int(len(data.y_test)),
            "test_time_augmentation": describe_tta(settings.tta_level), **summary}


def label_summary(collected: dict[str, list]) -> dict:
    """Accuracy and confusion matrix over the files whose label is known and which scored ok."""
    index = {name: i for i, name in enumerate(CLASS_NAMES)}
    pairs = [(index[label], index[predicted]) for label, predicted, status in zip(
        collected["label"], collected["predicted_class"], collected["status"])
        if label and status == "ok"]
    labelled = sum(1 for label in collected["label"] if label)
    if not pairs:
        return {"labelled_files": labelled, "scored": 0, "accuracy": None}
    y_true, y_pred = (np.array(values) for values in zip(*pairs))
    return {"labelled_files": labelled, "scored": len(pairs),
            **classification_summary(y_true, y_pred)}
