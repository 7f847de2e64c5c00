"""What `--mode=audit` writes and prints: the CSV files, the image grids, the
list of training images to leave out, and the summary.

Examples are named as `--exclude_files` lists them: a folder dataset's by
their paths, a TFDS dataset's by their index in their split.
"""

import csv
import dataclasses
import os

import numpy as np

from tl_keras.outputs import copies
from tl_keras.outputs import label_issues
from tl_keras.outputs import plots

LABEL_ISSUES_FILE = "label_issues.csv"
LEAKS_FILE = "leaks.csv"
DUPLICATES_FILE = "duplicates.csv"
OUTLIERS_FILE = "outliers.csv"
EXCLUDE_FILE = "exclude.txt"
LABEL_ISSUES_GRID = "label_issues.png"
LEAKS_GRID = "leaks.png"
DUPLICATES_GRID = "duplicates.png"
# The most label issues, and pairs, a grid shows.
_GRID_ISSUES = 24
_GRID_PAIRS = 12
HELD_OUT_SPLITS = ("validation", "test")


@dataclasses.dataclass(frozen=True)
class Findings:
    """What an audit found.

    Attributes:
        names: each split's example names, by split.
        labels: each split's int labels, by split.
        class_names: the class names, by label.
        label_issues: `tl_keras.outputs.label_issues.LabelIssues` of train.
        leaks: `copies.Pair`s (held-out position, training position), by
            held-out split.
        duplicates: `copies.Pair`s of training positions.
        outliers: (training positions, mean neighbour distances).
        threshold: the `copies.Threshold`.
        excluded_before: the examples the audited flags' `--exclude_files`
            already leaves out.
    """

    names: dict
    labels: dict
    class_names: tuple
    label_issues: object
    leaks: dict
    duplicates: list
    outliers: tuple
    threshold: object
    excluded_before: tuple = ()

    def to_exclude(self):
        """The training examples to leave out, each once, with why, in the
        order exclude.txt lists them: (reason, names)."""
        train = self.names["train"]
        groups = [
            ("label issues (label_issues.csv)",
             [train[p] for p in self.label_issues.positions]),
            ("training copies of validation and test images (leaks.csv)",
             [train[pair.second] for split in HELD_OUT_SPLITS
              for pair in self.leaks.get(split, ())]),
            ("the later image of each duplicate pair (duplicates.csv)",
             [train[pair.second] for pair in self.duplicates]),
            ("left out already by the audited flags' --exclude_files",
             list(self.excluded_before)),
        ]
        seen, ordered = set(), []
        for reason, names in groups:
            fresh = [name for name in dict.fromkeys(names) if name not in seen]
            seen.update(fresh)
            ordered.append((reason, fresh))
        return ordered


def write_tables(directory, findings):
    """Writes the CSV files and exclude.txt into `directory`."""
    os.makedirs(directory, exist_ok=True)
    names, labels, classes = findings.names, findings.labels, findings.class_names
    issues = findings.label_issues
    _write_csv(os.path.join(directory, LABEL_ISSUES_FILE),
               ["rank", "example", "given_label", "suggested_label", "label_quality",
                "suggested_probability"],
               [[rank, names["train"][p], classes[labels["train"][p]], classes[suggested],
                 f"{quality:.4f}", f"{probability:.4f}"]
                for rank, (p, suggested, quality, probability) in enumerate(zip(
                    issues.positions, issues.suggested, issues.quality,
                    issues.suggested_probability), start=1)])
    _write_csv(os.path.join(directory, LEAKS_FILE),
               ["kind", "split", "example", "label", "train_example", "train_label",
                "distance"],
               [[pair.kind, split, names[split][pair.first],
                 classes[labels[split][pair.first]], names["train"][pair.second],
                 classes[labels["train"][pair.second]], f"{pair.distance:.4f}"]
                for split in HELD_OUT_SPLITS for pair in findings.leaks.get(split, ())])
    _write_csv(os.path.join(directory, DUPLICATES_FILE),
               ["kind", "example", "label", "duplicate", "duplicate_label", "distance"],
               [[pair.kind, names["train"][pair.first], classes[labels["train"][pair.first]],
                 names["train"][pair.second], classes[labels["train"][pair.second]],
                 f"{pair.distance:.4f}"] for pair in findings.duplicates])
    positions, distances = findings.outliers
    _write_csv(os.path.join(directory, OUTLIERS_FILE),
               ["example", "label", "mean_neighbour_distance"],
               [[names["train"][p], classes[labels["train"][p]], f"{distance:.4f}"]
                for p, distance in zip(positions, distances)])
    with open(os.path.join(directory, EXCLUDE_FILE), "w") as file:
        file.write("# Training images --mode=audit suggests leaving out; pass this file "
                   "as --exclude_files.\n# Look at the grids first, and delete the line of "
                   "any image you want kept.\n")
        for reason, group in findings.to_exclude():
            if group:
                file.write(f"# {len(group)} {reason}\n" + "".join(f"{n}\n" for n in group))


def write_grids(directory, findings, images_of):
    """Writes the grids of the top label issues and of the copied pairs.

    Args:
        directory: where they go.
        findings: `Findings`.
        images_of: a function from a split's name and positions in it to
            {position: uint8 image}.

    Returns:
        The names of the files written.
    """
    classes, labels, issues = findings.class_names, findings.labels, findings.label_issues
    written = []
    shown = issues.positions[:_GRID_ISSUES]
    if len(shown):
        images = images_of("train", shown)
        _write_png(directory, LABEL_ISSUES_GRID, plots.image_grid(
            [images[p] for p in shown],
            [f"given {classes[labels['train'][p]]}\nsuggested {classes[s]}"
             for p, s in zip(shown, issues.suggested)], columns=6))
        written.append(LABEL_ISSUES_GRID)
    # Near pairs first, the farthest first: they are the ones to look at.
    leaked = sorted(((split, pair) for split in HELD_OUT_SPLITS
                     for pair in findings.leaks.get(split, ())),
                    key=lambda item: -item[1].distance)[:_GRID_PAIRS]
    if leaked:
        _write_png(directory, LEAKS_GRID, _pairs_grid(leaked, findings, images_of))
        written.append(LEAKS_GRID)
    doubled = sorted((("train", pair) for pair in findings.duplicates),
                     key=lambda item: -item[1].distance)[:_GRID_PAIRS]
    if doubled:
        _write_png(directory, DUPLICATES_GRID, _pairs_grid(doubled, findings, images_of))
        written.append(DUPLICATES_GRID)
    return written


def _pairs_grid(pairs, findings, images_of):
    """Each pair side by side: the first image (of its split), then the
    training image it copies."""
    wanted = {}
    for split, pair in pairs:
        wanted.setdefault(split, set()).add(pair.first)
        wanted.setdefault("train", set()).add(pair.second)
    images = {split: images_of(split, sorted(positions)) for split, positions in wanted.items()}
    cells, titles = [], []
    for split, pair in pairs:
        cells += [images[split][pair.first], images["train"][pair.second]]
        titles += [f"{split}: {_short(findings.names[split][pair.first])}",
                   f"train: {_short(findings.names['train'][pair.second])}\n"
                   f"{pair.kind}, distance {pair.distance:.3f}"]
    return plots.image_grid(cells, titles, columns=4)


def summary(findings, directory, grids, next_command):
    """The lines the audit ends by printing."""
    train = len(findings.names["train"])
    issues = findings.label_issues
    classes = findings.class_names
    lines = [f"Label issues: {len(issues.positions):,} of {train:,} training images "
             f"({len(issues.positions) / max(train, 1):.1%}) look mislabelled (cleanlab, on "
             f"{label_issues.FOLDS}-fold cross-validated probabilities of a logistic "
             f"regression on the features). Out of sample, that classifier agrees with "
             f"{issues.agreement:.1%} of the given labels: the fewer, the more of the "
             f"flagged images are its own mistakes rather than wrong labels."]
    if issues.skipped_classes:
        lines.append(f"Not audited for labels, with fewer than {label_issues.FOLDS} "
                     f"training images: {', '.join(classes[c] for c in issues.skipped_classes)}.")
    for split in HELD_OUT_SPLITS:
        pairs = findings.leaks.get(split, ())
        exact = sum(pair.kind == "exact" for pair in pairs)
        held_out = len({pair.first for pair in pairs})
        lines.append(f"Leaks: {held_out:,} of the {len(findings.names[split]):,} {split} "
                     f"images copy a training image ({exact} exact pairs, "
                     f"{len(pairs) - exact} near).")
    exact = sum(pair.kind == "exact" for pair in findings.duplicates)
    lines += [f"Duplicates within train: {exact} exact pairs, "
              f"{len(findings.duplicates) - exact} near.",
              f"Outliers: {len(findings.outliers[0]):,} training images far from all others "
              f"(cleanlab Datalab's rule, on their {copies.OUTLIER_NEIGHBOURS} nearest).",
              _classes_line(findings), findings.threshold.describe()]
    groups = [(reason, group) for reason, group in findings.to_exclude() if group]
    lines += [f"Wrote {', '.join([LABEL_ISSUES_FILE, LEAKS_FILE, DUPLICATES_FILE, OUTLIERS_FILE, *grids])} "
              f"and {EXCLUDE_FILE} to {directory}.",
              f"{EXCLUDE_FILE} lists {sum(len(g) for _, g in groups):,} training images"
              + (": " + "; ".join(f"{len(g)} {reason.split(' (')[0]}" for reason, g in groups)
                 if groups else "") + ".",
              "A leak is fixed by leaving out its training copy, never by moving the "
              "validation or test image. Look at the grids, delete from "
              f"{EXCLUDE_FILE} any image to keep, then train without the rest:",
              f"  {next_command}"]
    return lines


def _classes_line(findings):
    counts = np.bincount(findings.labels["train"], minlength=len(findings.class_names))
    rare = label_issues.imbalanced_classes(counts)
    line = (f"Classes: {len(counts)}, with {counts.min():,} to {counts.max():,} training "
            f"images each")
    if rare:
        return line + (f"; imbalanced (cleanlab Datalab's rule): "
                       f"{', '.join(findings.class_names[c] for c in rare)}.")
    return line + "."


def _short(name):
    return os.path.basename(name) if os.sep in name else f"#{name}"


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)


def _write_png(directory, name, png):
    with open(os.path.join(directory, name), "wb") as file:
        file.write(png)
