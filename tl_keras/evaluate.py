"""The final evaluation on the test split, and the run's metrics file."""

import json
import os


def evaluate(model, batches, verbose="auto"):
    """Evaluates a compiled model on every batch once.

    Returns:
        `{"top1": ..., "top5": ..., "loss": ...}` as floats.
    """
    results = model.evaluate(batches, return_dict=True, verbose=verbose)
    return {name: float(results[name]) for name in ("top1", "top5", "loss")}


def write_metrics(path, validation_by_phase, test):
    """Writes `metrics.json`: validation metrics per phase, and the test metrics."""
    with open(path, "w") as file:
        json.dump({"validation": validation_by_phase, "test": test}, file, indent=2)
        file.write("\n")
