"""Figures people would rather look at than read, as PNG bytes.

Matplotlib with the non-interactive Agg backend, so it runs on servers with no
display.
"""

import csv
import io
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# Beyond this many classes, tick labels would overlap into a black bar.
_MAX_LABELLED_CLASSES = 30


def confusion_matrix(confusion, class_names, title="Confusion matrix"):
    """A heat map of counts, rows true classes, columns predicted, row-normalised colour."""
    size = min(4 + 0.35 * len(class_names), 20)
    figure, axes = plt.subplots(figsize=(size, size))
    rows = confusion.sum(axis=1, keepdims=True)
    axes.imshow(confusion / np.maximum(rows, 1), cmap="Blues", vmin=0, vmax=1)
    if len(class_names) <= _MAX_LABELLED_CLASSES:
        ticks = np.arange(len(class_names))
        axes.set_xticks(ticks, class_names, rotation=90)
        axes.set_yticks(ticks, class_names)
        if len(class_names) <= 15:
            for (row, column), count in np.ndenumerate(confusion):
                share = count / max(rows[row, 0], 1)
                axes.text(column, row, int(count), ha="center", va="center",
                          color="white" if share > 0.5 else "black", fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    return _png(figure)


def image_grid(images, titles, columns=4):
    """A grid of uint8 images, each titled."""
    rows = math.ceil(len(images) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.8 * rows),
                                squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index < len(images):
            axis.imshow(images[index])
            axis.set_title(titles[index], fontsize=8)
    return _png(figure)


def heatmap_overlay(image, heatmap, opacity=0.4):
    """A heatmap in colour over an image of the same size, as uint8.

    Args:
        image: `[height, width, 3]`, values 0-255.
        heatmap: `[height, width]`, values 0-1: blue for 0, red for 1.
        opacity: the heatmap's share of each pixel. Defaults to 0.4.
    """
    colours = matplotlib.colormaps["jet"](np.clip(heatmap, 0, 1))[..., :3] * 255
    blended = (1 - opacity) * np.asarray(image, np.float32) + opacity * colours
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def training_curves(rows, head_epochs):
    """Loss and top-1 over epochs, train and validation, the phase boundary marked.

    Args:
        rows: `history.csv` rows as dicts.
        head_epochs: the number of head-phase epochs, where the line goes.
    """
    epochs = [int(row["epoch"]) for row in rows]
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(11, 4))
    for axes, metric, label in ((loss_axes, "loss", "loss"),
                                (accuracy_axes, "top1", "top-1 accuracy")):
        for prefix, name in (("", "train"), ("val_", "validation")):
            values = [float(row[prefix + metric]) for row in rows]
            axes.plot(epochs, values, marker="o", label=name)
        if 0 < head_epochs < len(rows):
            axes.axvline(head_epochs + 0.5, color="grey", linestyle="--",
                         label="fine-tuning starts")
        for epoch, phase in _self_training_starts(rows):
            axes.axvline(epoch - 0.5, color="tab:purple", linestyle=":",
                         label=f"{phase} starts")
        axes.set_xlabel("epoch")
        axes.set_ylabel(label)
        axes.legend()
    figure.tight_layout()
    return _png(figure)


def _self_training_starts(rows):
    """(epoch, phase) of the first row of each self-training round."""
    return [(int(row["epoch"]), row["phase"]) for index, row in enumerate(rows)
            if row["phase"].startswith("self_training_")
            and (index == 0 or rows[index - 1]["phase"] != row["phase"])]


def learning_rate_range_test(rates, losses, smoothed, suggestion, rule, title):
    """Loss against learning rate (log scale) of a range test, the suggestion marked.

    Args:
        rates, losses, smoothed: each step's learning rate, loss and smoothed loss.
        suggestion: the suggested learning rate; `rule` says how it was chosen.
        title: the figure's title.
    """
    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.plot(rates, losses, color="lightgrey", label="loss")
    axes.plot(rates, smoothed, label="smoothed loss")
    axes.axvline(suggestion, color="tab:red", linestyle="--",
                 label=f"suggested {suggestion:.1e}\n({rule})")
    axes.set_xscale("log")
    finite = np.asarray(smoothed)[np.isfinite(smoothed)]
    if finite.size:
        # The last steps' loss explodes; keep the part of the curve that matters.
        low, first = finite.min(), finite[0]
        axes.set_ylim(low - 0.1 * (first - low) - 1e-3, first * 1.5 + 1e-3)
    axes.set_xlabel("learning rate")
    axes.set_ylabel("training loss")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    return _png(figure)


def probe_depths(blocks, validation_top1, train_top1, suggested_block, suggestion, title):
    """A linear probe's top-1 against the block it was fitted at, the
    suggested block marked and `suggestion` saying what it suggests."""
    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.plot(blocks, validation_top1, marker="o", label="validation top-1")
    axes.plot(blocks, train_top1, color="lightgrey", marker=".", label="train top-1")
    axes.axvline(suggested_block, color="tab:red", linestyle="--",
                 label=suggestion)
    axes.set_xlabel("block (0 is the stem; the last is the whole backbone)")
    axes.set_ylabel("top-1")
    axes.set_ylim(0, 1.02)
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    return _png(figure)


def _png(figure):
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def write_training_curves(history_path, png_path, head_epochs):
    """Draws history.csv's `training_curves` into `png_path`, if there is a history."""
    if not os.path.exists(history_path):
        return
    with open(history_path, newline="") as file:
        rows = list(csv.DictReader(file))
    os.makedirs(os.path.dirname(png_path), exist_ok=True)
    with open(png_path, "wb") as file:
        file.write(training_curves(rows, head_epochs))
