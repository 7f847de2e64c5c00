"""Evaluation: metrics from predictions, a per-class report, and their files.

Metrics are computed here from the predicted probabilities, so the final
evaluation of a training run and `--mode=evaluate` on its SavedModel report the
same numbers the same way.
"""

import csv
import dataclasses
import json
import os

import numpy as np

from tl_keras.outputs import plots


def keras_predictor(model):
    """A Keras model's probabilities for one batch, as NumPy; see
    `tl_keras.outputs.predict.serving_predictor` for a SavedModel's."""
    return lambda images: model.predict(images, verbose=0)


def predictions_and_labels(batches, predict_batch, on_batch=None):
    """Predicts every batch, in one pass over the data.

    Args:
        batches: (images, one-hot labels) batches, every example once.
        predict_batch: a function from an image batch to class probabilities
            (`keras_predictor`, or `tl_keras.outputs.predict.serving_predictor`).
        on_batch: optionally called with each batch's (images, probabilities,
            labels) as NumPy arrays, to keep some of it without a second pass.

    Returns:
        (probabilities `[examples, classes]`, labels `[examples]`).
    """
    probabilities, labels = [], []
    for images, one_hot in batches:
        probabilities.append(np.asarray(predict_batch(images)))
        labels.append(np.argmax(np.asarray(one_hot), axis=1))
        if on_batch:
            on_batch(np.asarray(images), probabilities[-1], labels[-1])
    return np.concatenate(probabilities), np.concatenate(labels)


def mirrored(images):
    """Each image of a batch `[batch, height, width, channels]` mirrored left
    to right: what `--tta=flip` predicts besides the image."""
    return np.ascontiguousarray(np.asarray(images)[:, :, ::-1])


def reports(batches, predict_batch, class_names, tta="none", on_batch=None):
    """The classification report of `predict_batch` on every batch and, with
    `--tta=flip`, that of each image's probabilities averaged with its mirror
    image's; in one pass over the data.

    Args:
        batches, predict_batch, on_batch: as for `predictions_and_labels`;
            `on_batch` sees the plain probabilities.
        class_names: the class names, by label.
        tta: `none` or `flip`.

    Returns:
        (the plain report, the `flip` report or None), each from
        `classification_report`.
    """
    averaged = []

    def each_batch(images, probabilities, labels):
        if on_batch:
            on_batch(images, probabilities, labels)
        if tta == "flip":
            mirror = np.asarray(predict_batch(mirrored(images)))
            averaged.append((probabilities + mirror) / 2)

    probabilities, labels = predictions_and_labels(batches, predict_batch, each_batch)
    plain = classification_report(probabilities, labels, class_names)
    if not averaged:
        return plain, None
    return plain, classification_report(np.concatenate(averaged), labels, class_names)


def classification_report(probabilities, labels, class_names, top_k=5):
    """Top-1, top-k, cross-entropy, the confusion matrix and per-class scores.

    Args:
        probabilities: float `[examples, classes]`.
        labels: int `[examples]`, the true classes.
        class_names: the class names, by label.
        top_k: k for the top-k accuracy (at most the number of classes).

    Returns:
        A dict: `top1`, `top5` (the top-k accuracy), `nll` (the mean negative
        log-likelihood of the true class: cross-entropy without label
        smoothing), `examples`, `confusion` (int `[true, predicted]`),
        and `per_class`, a list of dicts with `class`, `precision`, `recall`,
        `f1` and `support`, in label order.
    """
    probabilities = np.asarray(probabilities, np.float64)
    labels = np.asarray(labels, np.int64)
    num_classes = len(class_names)
    predicted = probabilities.argmax(axis=1)
    k = min(top_k, num_classes)
    top = np.argsort(-probabilities, axis=1)[:, :k]
    true_probability = probabilities[np.arange(len(labels)), labels]
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, predicted), 1)

    per_class = []
    for label, name in enumerate(class_names):
        hits = confusion[label, label]
        predicted_count = confusion[:, label].sum()
        support = confusion[label].sum()
        precision = hits / predicted_count if predicted_count else 0.0
        recall = hits / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append({"class": name, "precision": float(precision),
                          "recall": float(recall), "f1": float(f1), "support": int(support)})
    return {
        "top1": float(np.mean(predicted == labels)),
        "top5": float(np.mean((top == labels[:, None]).any(axis=1))),
        "nll": float(np.mean(-np.log(np.clip(true_probability, 1e-7, 1.0)))),
        "examples": int(len(labels)),
        "confusion": confusion,
        "per_class": per_class,
    }


def summary(report):
    """The headline numbers of a report: `{"top1", "top5", "nll"}`."""
    return {name: report[name] for name in ("top1", "top5", "nll")}


def headline(metrics):
    """`top-1 X%, top-5 Y%, NLL Z` of a report or its `summary`."""
    return (f"top-1 {metrics['top1']:.2%}, top-5 {metrics['top5']:.2%}, "
            f"NLL {metrics['nll']:.4f}")


def format_report(report, split, worst=20, tta_report=None):
    """A readable report: headline metrics (with `tta_report`, those of
    `--tta=flip` too), then per-class scores of the plain predictions, worst
    first."""
    lines = [f"{split}: {report['examples']:,} examples, {headline(report)}"]
    if tta_report:
        lines.append(f"{split} with --tta=flip (each image averaged with its mirror): "
                     f"{headline(tta_report)}")
    lines += [
        "",
        f"{'class':<24} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}",
    ]
    ranked = sorted(report["per_class"], key=lambda row: (row["f1"], row["class"]))
    for row in ranked[:worst]:
        lines.append(f"{row['class'][:24]:<24} {row['precision']:>9.3f} "
                     f"{row['recall']:>9.3f} {row['f1']:>9.3f} {row['support']:>8,}")
    if len(ranked) > worst:
        lines.append(f"... {len(ranked) - worst} more classes in per_class.csv")
    return "\n".join(lines)


def write_evaluation(directory, report, split, tta_report=None):
    """Writes `metrics.json` (with `tta_report`, its headline metrics under
    `tta_flip`), and the plain report's `per_class.csv` and
    `confusion_matrix.png`."""
    os.makedirs(directory, exist_ok=True)
    metrics = {"split": split, "examples": report["examples"], **summary(report)}
    if tta_report:
        metrics["tta_flip"] = summary(tta_report)
    with open(os.path.join(directory, "metrics.json"), "w") as file:
        json.dump(metrics, file, indent=2)
        file.write("\n")
    with open(os.path.join(directory, "per_class.csv"), "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["class", "precision", "recall", "f1",
                                                  "support"])
        writer.writeheader()
        writer.writerows(sorted(report["per_class"], key=lambda row: row["f1"]))
    with open(os.path.join(directory, "confusion_matrix.png"), "wb") as file:
        file.write(plots.confusion_matrix(
            report["confusion"], [row["class"] for row in report["per_class"]],
            title=f"Confusion matrix ({split})"))


class MostConfident:
    """The most confident predictions seen so far, either the wrong or the
    right ones, with their images, most confident first: kept while the data
    streams past once.

    Args:
        count: how many to keep. Defaults to 16.
        correct: keep right predictions instead of wrong ones. Defaults to
            False.

    Attributes:
        kept: `Prediction`s, most confident first.
    """

    def __init__(self, count=16, correct=False):
        self.count = count
        self.correct = correct
        self.kept = []
        self._seen = 0

    def add(self, images, probabilities, labels):
        predicted = probabilities.argmax(axis=1)
        for offset in np.flatnonzero((predicted == labels) == self.correct):
            self.kept.append(Prediction(
                confidence=float(probabilities[offset, predicted[offset]]),
                position=self._seen + offset,
                # A copy, so that the kept image doesn't keep its whole batch.
                image=images[offset].copy(),
                label=int(labels[offset]), predicted=int(predicted[offset])))
        self.kept = sorted(self.kept, key=lambda kept: (-kept.confidence,
                                                        kept.position))[:self.count]
        self._seen += len(labels)


class ExamplesToShow:
    """What the Grad-CAM grid shows: the most confident mistakes, then a few
    of the most confident right predictions for comparison, kept in one pass.

    Args:
        mistakes: how many mistakes to keep. Defaults to 12.
        correct: how many right predictions to keep. Defaults to 4.
    """

    def __init__(self, mistakes=12, correct=4):
        self.mistakes = MostConfident(mistakes)
        self.correct = MostConfident(correct, correct=True)

    def add(self, images, probabilities, labels):
        self.mistakes.add(images, probabilities, labels)
        self.correct.add(images, probabilities, labels)

    @property
    def kept(self):
        """The kept `Prediction`s: mistakes first, each kind most confident first."""
        return self.mistakes.kept + self.correct.kept


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One prediction kept with its image: its confidence, its place in the
    split, the image, the true and the predicted class."""

    confidence: float
    position: int
    image: object
    label: int
    predicted: int


def write_metrics(path, validation_by_phase, test, exported, test_tta=None):
    """Writes `metrics.json`: validation metrics per phase, which weights were
    exported, and the test metrics of those weights (with `test_tta`, those of
    `--tta=flip` under `test_tta_flip`)."""
    metrics = {"validation": validation_by_phase, "exported": exported, "test": test}
    if test_tta:
        metrics["test_tta_flip"] = test_tta
    with open(path, "w") as file:
        json.dump(metrics, file, indent=2)
        file.write("\n")


@dataclasses.dataclass(frozen=True)
class TestResults:
    """The test split's report (and its `--tta=flip` report, or None), the
    `ExamplesToShow` in the Grad-CAM grid, and its first images with their true
    and predicted classes."""

    report: dict
    tta_report: dict | None
    examples: object
    first_images: list
    first_labels: list
    first_predicted: list


def evaluate_test_split(model, batches, class_names, keep_images, tta="none"):
    """Evaluates on the test split in one pass, keeping what the Grad-CAM grid
    and the TFLite checks need, so neither reads it again; with `tta="flip"`,
    reports the mirror-averaged predictions too."""
    examples = ExamplesToShow()
    first_images, first_labels, first_predicted = [], [], []

    def keep(images, probabilities, labels):
        examples.add(images, probabilities, labels)
        wanted = keep_images - len(first_images)
        first_images.extend(images[:wanted])
        first_labels.extend(labels[:wanted])
        first_predicted.extend(probabilities[:wanted].argmax(axis=1))

    report, tta_report = reports(batches, keras_predictor(model), class_names, tta=tta,
                                 on_batch=keep)
    return TestResults(
        report=report, tta_report=tta_report, examples=examples,
        first_images=first_images, first_labels=first_labels,
        first_predicted=first_predicted)


def add_to_metrics(path, name, entry):
    """Adds `entry` to `metrics.json` under `name`, keeping what it holds."""
    with open(path) as file:
        metrics = json.load(file)
    metrics[name] = entry
    with open(path, "w") as file:
        json.dump(metrics, file, indent=2)
        file.write("\n")
