"""The structure experiment's depths: a probe's table as the experiment reads
it from `probe/depths.csv`, and the blocks arm (c) is fine-tuned at.
"""

import csv
import dataclasses
import os
import sys

from transfer import REPOSITORY


@dataclasses.dataclass(frozen=True)
class ProbedDepth:
    """One row of `probe/depths.csv`, top-1s in percent."""

    block: int
    from_top: int
    layer: str
    features: int
    train_top1: float
    validation_top1: float


def read_probe(probe_dir):
    """The probe's rows in `probe_dir/depths.csv`, from the stem up."""
    with open(os.path.join(probe_dir, "depths.csv"), newline="") as file:
        return [ProbedDepth(block=int(row["block"]), from_top=int(row["from_top"]),
                            layer=row["layer"], features=int(row["features"]),
                            train_top1=100 * float(row["train_top1"]),
                            validation_top1=100 * float(row["validation_top1"]))
                for row in csv.DictReader(file)]


def suggested_block(probed):
    """The block the probe suggests: the tool's own rule (best validation
    top-1, the deepest on a tie), so the experiment and `--mode=probe` never
    disagree on what was suggested."""
    sys.path.insert(0, REPOSITORY)
    from tl_keras.training import probe

    return probe.suggestion(probed).block


def fine_tuned_blocks(probed_blocks, suggested, count=3):
    """The blocks arm (c) is fine-tuned at: the probe's suggestion, the top
    (the whole backbone), and then, until there are `count`, the probed
    block nearest the middle of the widest stretch of the backbone the
    chosen ones leave untried, counting from the stem.

    Three depths are the fewest that can tell whether the fine-tuned top-1
    follows the probe's ranking rather than merely agreeing at one point;
    putting each added depth into the widest gap tries the depth most unlike
    those chosen. When the probe suggests the top, the others fall halfway
    down the backbone and halfway from there to the top. Ties go to the
    deeper block, as the probe's own suggestion does.

    Args:
        probed_blocks: the blocks the probe measured.
        suggested: the block it suggests, one of them.
        count: how many blocks to choose, at most all probed. Default: 3.

    Returns:
        The chosen blocks, sorted from the stem up.
    """
    probed_blocks = sorted(probed_blocks)
    if suggested not in probed_blocks:
        raise ValueError(f"Suggested block {suggested} is not one of the probed blocks "
                         f"{probed_blocks}.")
    chosen = {suggested, probed_blocks[-1]}
    untried = [block for block in probed_blocks if block not in chosen]
    while len(chosen) < count and untried:
        bounds = sorted(chosen | {probed_blocks[0]})
        start, end = max(zip(bounds, bounds[1:]), key=lambda pair: (pair[1] - pair[0], pair[0]))
        middle = (start + end) / 2
        added = min(untried, key=lambda block: (abs(block - middle), -block))
        chosen.add(added)
        untried.remove(added)
    return sorted(chosen)
