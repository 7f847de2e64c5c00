"""How `--mode=find_lr` sets up the phase it tests, as training would: which
head phase 2's test starts from (only one trained with these flags), what
trains, and at which rates."""

from tl_keras import config as config_lib
from tl_keras import rundir
from tl_keras.errors import UsageError
from tl_keras.model import layer_decay
from tl_keras.training import finetune
from tl_keras.training import recipe
from tl_keras.training import runstate


def trained_head(paths, phase, head_epochs, flagfile_text, flag_defaults=""):
    """The run whose head phase the range test of `phase` starts from, as
    training's phase 2 would, or None for the model as built; says which.

    Args:
        paths: the `tl_keras.rundir.RunPaths` of `--model_dir`.
        phase: `head` or `finetune`.
        head_epochs: `--head_epochs`; with 0, phase 2 starts from the model
            as built.
        flagfile_text: the given flags, as `tl_keras.cli.flags.to_flagfile`
            writes them (with `--recipe=auto`'s choices).
        flag_defaults: every flag at its default, as `flags.txt` writes it, so
            that a run made before a flag existed matches it at its default
            (as `tl_keras.rundir.claim` compares a resumed run).

    Raises:
        UsageError: when the run's head phase is complete but its flags
            differ from these in one the head phase depends on: its head is
            not the one these flags' phase 2 would start from.
    """
    if phase != recipe.FINETUNE_PHASE or not head_epochs:
        return None
    if runstate.Progress(paths.progress).phase_complete(recipe.HEAD_PHASE):
        differences = rundir.flag_differences(paths.model_dir, flagfile_text,
                                              ignored=config_lib.NOT_IN_THE_HEAD_PHASE,
                                              defaults_text=flag_defaults)
        if differences:
            raise UsageError(
                f"--find_lr_phase=finetune starts from the head phase's end weights of "
                f"the run in {paths.model_dir}, but that run's head was trained with "
                f"other flags ({differences}), so it is not the head these flags train. "
                f"Give --mode=find_lr the run's flags (--flagfile={paths.flags}; the "
                f"options of phase 2 alone, such as --unfreeze and --layer_decay, may "
                f"differ), or pick another --model_dir to start from an untrained head.")
        print(f"Starting from the head phase's end weights of the run in "
              f"{paths.model_dir}, as its fine-tuning does.", flush=True)
        return paths
    print(f"Note: {paths.model_dir} holds no finished head phase, so the head is "
          f"untrained, as fastai's lr_find takes it when run before fine_tune "
          f"has trained it. A random head sends larger gradients into the backbone "
          f"than a trained one; for phase 2's own curve, test again once the run "
          f"there has finished its head phase.", flush=True)
    return None


def set_up_phase(model, backbone, phase, *, unfreeze, train_batchnorm,
                 trained_head=None, decay=1.0):
    """Sets the weights, what trains and at which rates, as training's `phase`
    starts.

    Args:
        model, backbone: as for `tl_keras.training.train.train_two_phases`.
        phase: `head` or `finetune`.
        unfreeze, train_batchnorm: `--unfreeze`, `--batchnorm=train`.
        trained_head: for `finetune`, the `tl_keras.rundir.RunPaths` of a run
            whose head phase finished, to start from its end weights; None
            starts from the model as built.
        decay: `--layer_decay`, which fine-tuning trains the backbone's
            blocks with; 1, the default, for none.

    Returns:
        (what trains, in words; the `tl_keras.model.layer_decay.LayerRates` the
        sweep scales each block's rate by, or None).

    Raises:
        UsageError: when the run's weights are of another model.
    """
    if phase == recipe.HEAD_PHASE:
        finetune.freeze_backbone(backbone)
        return "the head", None
    if trained_head:
        weights = trained_head.phase_end_weights(recipe.HEAD_PHASE)
        try:
            runstate.load_weights(model, weights)
        except ValueError as error:
            raise UsageError(
                f"The head phase's weights in {weights} are of another model "
                f"({error}). Give --mode=find_lr the run's own flags, "
                f"--flagfile={trained_head.flags}.") from None
    unfrozen = finetune.unfreeze_backbone(backbone, unfreeze, train_batchnorm)
    rates = layer_decay.layer_rates(backbone, decay) if decay < 1 else None
    return f"the head and {len(unfrozen)} backbone layers (--unfreeze={unfreeze})", rates


def describe_optimizer(rates, ema):
    """What the sweep does with `--layer_decay` (`rates`, from `set_up_phase`)
    and `--ema`: a line for each that is on."""
    lines = []
    if rates:
        blocks = len(rates.blocks)
        lines.append(
            f"Layer-wise learning-rate decay {rates.decay:g}, as fine-tuning trains: the "
            f"head at the rate swept, the backbone's {blocks} blocks at {rates.decay:g} "
            f"(the top one) down to {rates.decay ** blocks:.3g} (the stem) times it. The "
            f"suggestion is the head's rate, as --finetune_learning_rate is.")
    if ema:
        # Keras' `use_ema` keeps the average beside the weights it trains (no
        # `ema_overwrite_frequency` here): each step's update, and so each
        # loss, is the same with it or without.
        lines.append(
            f"--ema={ema:g} is left out: the moving average changes no training step, "
            f"only the weights each epoch validates and saves, so the training loss "
            f"this test records is the same without it.")
    return lines
