"""The experiment's report: the table of test top-1 by N and arm, arm (d)'s
table by the number of unlabelled images, and the figures they read from each
run's folder.
"""

import json
import os

from transfer.arms import ARMS


def results_table(source, results, sizes, arms=tuple(ARMS), flip=None):
    """The results as a Markdown table, one row per N and one column per arm.

    Args:
        source: (test top-1, seconds) of the source run.
        results: (size, arm) -> (test top-1, seconds).
        sizes: the rows.
        arms: the columns, keys of ARMS.
        flip: optional (size, arm) -> test top-1 with `--tta=flip`, shown after
            the plain figure.
    """
    lines = [
        f"Source (from scratch): test top-1 {source[0]:.1f}% in {source[1]:.0f} s.",
        "",
        "| Train images per class | " + " | ".join(ARMS[arm] for arm in arms) + " |",
        "|---:|" + "---:|" * len(arms),
    ]
    for size in sizes:
        cells = []
        for arm in arms:
            if (size, arm) not in results:
                cells.append("-")
                continue
            top1, seconds = results[size, arm]
            mirrored = (flip or {}).get((size, arm))
            shown = f"{top1:.1f}%" + (f" / {mirrored:.1f}%" if mirrored is not None else "")
            cells.append(f"{shown} ({seconds:.0f} s)")
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    if flip:
        lines += ["", "Each cell: test top-1 / with `--tta=flip` (wall time of the run)."]
    return "\n".join(lines)


def pool_table(size, both, by_pool):
    """Arm (d) at N=`size` against the number of unlabelled images.

    Args:
        size: N.
        both: arm (c)'s (test top-1, seconds) at N.
        by_pool: pool size (None for the whole pool) -> (test top-1, seconds,
            top-1 with `--tta=flip`, pool images, pseudo-labels kept, percent
            of them right).
    """
    lines = [
        f"Arm (d) at N={size} by the number of unlabelled images:",
        "",
        "| Unlabelled images | Pseudo-labels kept (right) | Test top-1 (with flip) | Wall time |",
        "|---:|---:|---:|---:|",
        f"| none: arm (c) | - | {both[0]:.1f}% | {both[1]:.0f} s |",
    ]
    for count in sorted(by_pool, key=lambda count: count or float("inf")):
        top1, seconds, mirrored, pool_images, kept, right = by_pool[count]
        shown = f"{top1:.1f}%" + (f" ({mirrored:.1f}%)" if mirrored is not None else "")
        lines.append(f"| {pool_images:,}{'' if count else ' (all)'} | {kept:,} ({right:.1f}%) | "
                     f"{shown} | {seconds:.0f} s |")
    return "\n".join(lines)


def flip_top1(model_dir):
    """Test top-1 with `--tta=flip` in percent, or None if the run has none."""
    with open(os.path.join(model_dir, "metrics.json")) as file:
        mirrored = json.load(file).get("test_tta_flip")
    return None if mirrored is None else 100 * mirrored["top1"]


def pseudo_label_summary(model_dir):
    """(pool images, kept, percent right) of the run's last self-training
    round, right judged by the class subfolder each pool image's link sits in."""
    folder = os.path.join(model_dir, "self_training")
    last = max(os.listdir(folder), key=lambda name: int(name[len("round_"):-len(".json")]))
    with open(os.path.join(folder, last)) as file:
        record = json.load(file)
    kept = record["pseudo_labels"]
    with open(os.path.join(model_dir, "class_names.json")) as file:
        class_names = json.load(file)
    right = sum(os.path.basename(os.path.dirname(entry["image"])) == class_names[entry["label"]]
                for entry in kept)
    return record["pool_images"], len(kept), 100 * right / max(len(kept), 1)
