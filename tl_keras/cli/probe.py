"""`--mode=probe`: where to cut the backbone, and how deep to unfreeze, from a
linear probe at each depth, in one pass over the data a run would train on."""

import os
import shutil
import time

from tl_keras import rundir
from tl_keras.cli import assembly
from tl_keras.data import pipeline
from tl_keras.model import depth_features
from tl_keras.training import probe


def run_probe(config, every=None):
    """Probes the backbone's depths on `config`'s train and validation splits
    and writes `--model_dir/probe/` (depths.csv, depths.png, summary.txt).

    It holds the folder's lock and writes nothing but `probe/`, so a run there
    keeps its files as they were.

    Args:
        config: the run's `Config`; `--cut_at` probes within what it keeps.
        every: probe every `every`-th block from the top; None chooses (see
            `tl_keras.model.depth_features.probed_blocks`).

    Returns:
        The `tl_keras.training.probe.DepthResult`s, from the stem up.
    """
    started = time.monotonic()
    strategy, backbone = assembly.strategy_and_backbone(config)
    paths = rundir.RunPaths(config.model_dir)
    with rundir.claim_beside_run(config.model_dir):
        splits = assembly.load_splits(config)
        with strategy.scope():
            extractor, depths = depth_features.depth_extractor(
                backbone, config.backbone, config.image_size, config.resize, every)
        computed = depth_features.compute(
            extractor, depths, sizes=splits.sizes, directory=paths.probe_features,
            batches_of=lambda split: pipeline.split_batches(config, splits, split))
        results = probe.probe_depths(depths, computed, splits.num_classes)
        # Features too large for memory were only needed for the fit.
        shutil.rmtree(paths.probe_features, ignore_errors=True)
        probe.write(results, paths.probe_csv, paths.probe_plot, title=(
            f"Linear probe by depth: {config.backbone}, weights {config.weights}"))
        lines = probe.summary(results, time.monotonic() - started)
        with open(os.path.join(os.path.dirname(paths.probe_csv), "summary.txt"), "w") as file:
            file.write("\n".join(lines) + "\n")
    print("\n".join([*lines, f"Wrote depths.csv, depths.png and summary.txt to "
                             f"{os.path.dirname(paths.probe_csv)}."]), flush=True)
    return results
