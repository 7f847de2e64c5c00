"""`KERAS_BACKEND=jax python tests/jax_self_training_round.py FLAGS...`: a run's
phases, self-training rounds included, trained as `tl_keras.cli.job` trains
them (the same splits, training and validation batches, pool, phase plan and
`self_training.Rounds`) but on `tiny_training`'s classifier, with no export.

For test_self_training's check that a round trains every epoch under JAX,
which needs a process of its own to choose the backend; a whole run.py run on
MobileNet, whose traced steps and SavedModel JAX compiles for a minute, would
check nothing more about the rounds."""

import contextlib
import os
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [TESTS, os.path.dirname(TESTS)]

import keras  # noqa: E402
from absl import flags as absl_flags  # noqa: E402

import tiny_training  # noqa: E402
from tl_keras import rundir  # noqa: E402
from tl_keras.cli import assembly  # noqa: E402
from tl_keras.cli import flags  # noqa: E402
from tl_keras.cli import job  # noqa: E402
from tl_keras.data import pipeline  # noqa: E402
from tl_keras.training import recipe  # noqa: E402
from tl_keras.training import self_training  # noqa: E402
from tl_keras.training import train  # noqa: E402


def main(argv):
    absl_flags.FLAGS(argv)
    config = flags.to_config()
    print(f"Backend: {keras.backend.backend()}.", flush=True)
    splits = assembly.load_splits(config)
    steps = recipe.training_steps_per_epoch(splits.sizes["train"], config.batch_size,
                                            config.steps_per_epoch)
    train_batches = assembly.training_batches(config, splits,
                                              repeat=config.steps_per_epoch is not None)
    validation_batches = pipeline.split_batches(config, splits, "validation")
    pool = job._unlabeled_pool(config, splits)
    model, backbone = tiny_training.build(splits.num_classes, image_size=None)
    paths = rundir.RunPaths(config.model_dir)
    rounds = self_training.Rounds(model=model, pool=pool, splits=splits, paths=paths,
                                  config=config)
    train.train_two_phases(
        model, backbone, train_batches=train_batches, validation_batches=validation_batches,
        steps_per_epoch=steps, phases=job._plan_phases(config), unfreeze=config.unfreeze,
        optimizer=config.optimizer, weight_decay=config.weight_decay,
        label_smoothing=config.label_smoothing, num_classes=splits.num_classes,
        jit_compile=assembly.jit_compile(config.jit_compile), scope=contextlib.nullcontext,
        paths=paths, phase_inputs=rounds, verbose=2)


if __name__ == "__main__":
    main(sys.argv)
