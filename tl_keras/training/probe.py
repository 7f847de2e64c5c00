"""`--mode=probe`: a linear classifier on the features at each depth of the
backbone, its validation top-1, and the `--cut_at` it suggests.

A linear probe (Alain and Bengio, 2016) measures how much of the target
task the features at one depth already separate. It is a multinomial
logistic regression, fitted here in numpy by full-batch Adam on standardised
features: small, deterministic, and no new dependency.
"""

import csv
import dataclasses
import os

import numpy as np

from tl_keras.outputs import plots

STEPS = 300
LEARNING_RATE = 0.05
L2 = 1e-3
CSV_FIELDS = ("block", "from_top", "layer", "features", "train_top1", "validation_top1")


@dataclasses.dataclass(frozen=True)
class DepthResult:
    """One depth's probe: its `tl_keras.model.depth_features.Depth` and top-1s."""

    depth: object
    train_top1: float
    validation_top1: float


def fit_linear(features, labels, num_classes, steps=STEPS):
    """Fits a multinomial logistic regression; returns a function from
    features to predicted classes."""
    mean = features.mean(axis=0)
    scale = features.std(axis=0) + 1e-6  # standardised by the training features
    x = (np.asarray(features, np.float32) - mean) / scale
    one_hot = np.eye(num_classes, dtype=np.float32)[labels]
    parameters = [np.zeros((x.shape[1], num_classes), np.float32),
                  np.zeros(num_classes, np.float32)]
    moments = [[np.zeros_like(p), np.zeros_like(p)] for p in parameters]
    for step in range(1, steps + 1):
        error = _softmax(x @ parameters[0] + parameters[1]) - one_hot
        gradients = [x.T @ error / len(x) + L2 * parameters[0], error.mean(axis=0)]
        for parameter, gradient, (first, second) in zip(parameters, gradients, moments):
            first[:] = 0.9 * first + 0.1 * gradient
            second[:] = 0.999 * second + 0.001 * gradient**2
            corrected = (first / (1 - 0.9**step)) / (np.sqrt(second / (1 - 0.999**step)) + 1e-8)
            parameter -= LEARNING_RATE * corrected
    weights, bias = parameters
    return lambda values: np.argmax(((values - mean) / scale) @ weights + bias, axis=1)


def _softmax(logits):
    exponentials = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def probe_depths(depths, computed, num_classes):
    """A `DepthResult` per depth, from `depth_features.compute`'s features."""
    (train, train_labels), (validation, validation_labels) = (
        computed["train"], computed["validation"])
    results = []
    for index, depth in enumerate(depths):
        classify = fit_linear(train[index], train_labels, num_classes)
        results.append(DepthResult(
            depth=depth,
            train_top1=float(np.mean(classify(train[index]) == train_labels)),
            validation_top1=float(np.mean(classify(validation[index]) == validation_labels))))
    return results


def suggestion(results):
    """The result with the best validation top-1; on a tie the deepest, as
    the whole backbone is what a run uses without `--cut_at`."""
    return max(reversed(results), key=lambda result: result.validation_top1)


def summary(results, seconds):
    """The table and the suggestion, as lines to print."""
    best = suggestion(results)
    lines = ["Linear probe at each depth (validation top-1):",
             "  block  from top  features  train top-1  val top-1  layer"]
    for result in results:
        depth = result.depth
        mark = "  <- best" if result is best else ""
        lines.append(f"  {depth.block:>5}  {depth.from_top:>8}  {depth.dimensions:>8}  "
                     f"{result.train_top1:>11.1%}  {result.validation_top1:>9.1%}  "
                     f"{depth.layer}{mark}")
    if best.depth.from_top == -1:
        lines.append(f"The top is best ({best.validation_top1:.1%}): keep the whole "
                     f"backbone (no --cut_at), as on a domain near the backbone's source.")
    else:
        top = results[-1]
        lines.append(f"Suggested: --cut_at={best.depth.block} (--cut_at={best.depth.from_top} "
                     f"from the top), {best.validation_top1:.1%} against the top's "
                     f"{top.validation_top1:.1%}.")
        # Measured (docs/results.md): on neither target tried did the probe's
        # best depth also fine-tune best, so the suggestion says what it is.
        lines.append("That is the best depth for a frozen backbone under a linear head. "
                     "Fine-tuned, a deeper cut can do better: compare a run at this "
                     "--cut_at with one without.")
    lines.append(f"The probe took {seconds:.0f} s.")
    return lines


def write(results, csv_path, png_path, title):
    """Writes the table to `csv_path` and validation top-1 against depth to `png_path`."""
    os.makedirs(os.path.dirname(csv_path), exist_ok=True)
    with open(csv_path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(CSV_FIELDS)
        for result in results:
            depth = result.depth
            writer.writerow([depth.block, depth.from_top, depth.layer, depth.dimensions,
                             f"{result.train_top1:.4f}", f"{result.validation_top1:.4f}"])
    best = suggestion(results)
    label = ("the top is best: no --cut_at" if best.depth.from_top == -1
             else f"suggested --cut_at={best.depth.block}")
    with open(png_path, "wb") as file:
        file.write(plots.probe_depths(
            [result.depth.block for result in results],
            [result.validation_top1 for result in results],
            [result.train_top1 for result in results], best.depth.block, label, title))
