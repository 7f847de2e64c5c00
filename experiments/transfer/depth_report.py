"""The structure experiment's report: for each target, the probe's table
beside arm (c) fine-tuned at some of its depths, and whether the probe's best
depth is also the best one to fine-tune at.
"""

import dataclasses


@dataclasses.dataclass
class DepthStudy:
    """What one target's runs measured.

    Attributes:
        title: the target, in words.
        probed: its `depths.ProbedDepth`s, from the stem up.
        probe_seconds: the probe's wall time.
        suggested: the block the probe suggests.
        fine_tuned: block -> (test top-1, seconds) of arm (c) cut there.
        flip: block -> its test top-1 with `--tta=flip`, or None.
        scratch: (test top-1, seconds, top-1 with flip) of the scratch arm,
            or None where the target has none.
    """

    title: str
    probed: list
    probe_seconds: float
    suggested: int
    fine_tuned: dict = dataclasses.field(default_factory=dict)
    flip: dict = dataclasses.field(default_factory=dict)
    scratch: tuple = None

    def best_fine_tuned(self):
        """The fine-tuned block with the best test top-1, the deepest on a
        tie, as the probe breaks its own ties."""
        return max(sorted(self.fine_tuned, reverse=True),
                   key=lambda block: self.fine_tuned[block][0])


def _top1(top1, mirrored):
    return f"{top1:.1f}%" + (f" / {mirrored:.1f}%" if mirrored is not None else "")


def study_table(study):
    """One target's table as Markdown: a row per probed depth, with arm (c)'s
    figures where it was fine-tuned there, then the verdict."""
    best = study.best_fine_tuned()
    lines = [
        f"{study.title}. The probe's command took {study.probe_seconds:.0f} s.",
        "",
        "| block | from top | features | probe: train / val top-1 | arm (c) cut there: "
        "test top-1 / with flip (time) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for depth in study.probed:
        # Train beside validation: a probe on many features and few images
        # can fit its training images and still validate poorly.
        probe_cell = f"{depth.train_top1:.1f}% / {depth.validation_top1:.1f}%" + (
            " (probe's best)" if depth.block == study.suggested else "")
        if depth.block in study.fine_tuned:
            top1, seconds = study.fine_tuned[depth.block]
            tuned_cell = (f"{_top1(top1, study.flip.get(depth.block))} ({seconds:.0f} s)"
                          + (" (best)" if depth.block == best else ""))
        else:
            tuned_cell = "-"
        lines.append(f"| {depth.block} | {depth.from_top} | {depth.features} | "
                     f"{probe_cell} | {tuned_cell} |")
    lines.append("")
    if study.scratch:
        top1, seconds, mirrored = study.scratch
        lines += [f"Scratch (arm (a), random weights, the whole network): "
                  f"{_top1(top1, mirrored)} ({seconds:.0f} s).", ""]
    verdict = "same" if best == study.suggested else "different"
    lines.append(f"Probe's best depth: block {study.suggested}; best fine-tuned depth of "
                 f"blocks {', '.join(map(str, sorted(study.fine_tuned)))}: block {best}. "
                 f"{verdict.capitalize()}.")
    return "\n".join(lines)


def verdict_line(name, study):
    """`NAME_probe_matches_fine_tuning=same` (or `different`), for scripts."""
    same = study.best_fine_tuned() == study.suggested
    return f"{name}_probe_matches_fine_tuning={'same' if same else 'different'}"
