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
    classes = len(CLASS_NAMES)
    pairs = np.asarray(y_true, dtype=np.int64) * classes + np.asarray(y_pred, dtype=np.int64)
    return confusion_summary(np.bincount(pairs, minlength=classes * classes).reshape(
        classes, classes))


def confusion_summary(matrix: np.ndarray) -> dict:
    """``classification_summary`` from a confusion matrix (rows = true class), so a job can
    count predictions as they stream by. Precision, recall and F1 as scikit-learn's
    ``precision_recall_fscore_support(zero_division=0)`` computes them."""
    matrix = np.asarray(matrix, dtype=np.int64)
    true_positives = np.diag(matrix).astype(np.float64)
    predicted, support = matrix.sum(axis=0), matrix.sum(axis=1)

    def ratio(top, bottom):
        return np.divide(top, bottom, out=np.zeros_like(top), where=bottom > 0)

    precision, recall = ratio(true_positives, predicted), ratio(true_positives, support)
    f1 = ratio(2 * true_positives, (predicted + support).astype(np.float64))
    total = int(matrix.sum())
    return {
        "accuracy": float(true_positives.sum() / total) if total else 0.0,
        "class_names": list(CLASS_NAMES),
        "confusion_matrix": matrix.tolist(),
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
