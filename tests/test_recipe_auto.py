"""--recipe=auto: the schedule, augmentation and MixUp chosen from the number of
training images, explicit flags kept, the choices printed and in flags.txt."""

import os

import pytest
from absl import flags as absl_flags
from absl.testing import flagsaver

from conftest import SMOKE_FLAGS, TEST_BACKBONE
from tl_keras import flagfile
from tl_keras import rundir
from tl_keras.cli import flags
from tl_keras.cli import job
from tl_keras.errors import UsageError
from tl_keras.training import auto_recipe

SMALL, LARGE = 1_000, 1_200_000


def _parse(*args, flagfile=None):
    """(Config, flags.txt text, the options given explicitly), as run.py gets them."""
    with flagsaver.flagsaver():
        absl_flags.FLAGS.unparse_flags()
        absl_flags.FLAGS(["run.py"] + ([f"--flagfile={flagfile}"] if flagfile else [])
                         + list(args))
        return flags.to_config(), flags.to_flagfile(), flags.given_flags()


def test_a_small_and_a_large_dataset_get_bits_choices_for_their_size():
    config, _, given = _parse("--recipe=auto")
    small = auto_recipe.auto_recipe(SMALL, config, given).values
    large = auto_recipe.auto_recipe(LARGE, config, given).values
    # BiT: 100 steps of 512 under 5,000 images, 20,000 steps from 500,000 on.
    # At --batch_size=64, 1,000 images are 15 steps (960 images) an epoch.
    assert small == {"finetune_epochs": 54, "head_epochs": 6, "warmup_epochs": 5.4,
                     "augment": "basic", "mixup": 0.0}
    assert large == {"finetune_epochs": 9, "head_epochs": 1, "warmup_epochs": 0.23,
                     "augment": "basic", "mixup": 0.1}


def test_a_tiny_dataset_gets_at_most_the_epoch_cap():
    config, _, given = _parse("--recipe=auto")
    chosen = auto_recipe.auto_recipe(200, config, given)
    assert chosen.values["finetune_epochs"] == auto_recipe.AUTO_MAX_EPOCHS
    assert f"at most {auto_recipe.AUTO_MAX_EPOCHS}" in "\n".join(chosen.lines)


def test_the_choices_are_printed_with_their_reasons():
    config, _, given = _parse("--recipe=auto")
    lines = auto_recipe.auto_recipe(SMALL, config, given).lines
    assert lines[0] == ("Recipe auto, for 1,000 training images (BiT's HyperRule: "
                        "under 5,000 images):")
    assert ("  --finetune_epochs=54: BiT fine-tunes on 51,200 examples (100 steps of 512) "
            "at this size, 54 epochs of 960.") in lines
    assert "  --mixup=0: BiT uses no MixUp below 20,000 images." in lines


def test_an_explicit_flag_wins_also_from_a_flagfile(tmp_path):
    flagfile = tmp_path / "mine.flags"
    flagfile.write_text("--finetune_epochs=7\n")
    config, _, given = _parse("--recipe=auto", "--augment=randaugment", "--mixup=0",
                              flagfile=str(flagfile))
    chosen = auto_recipe.auto_recipe(LARGE, config, given)
    assert {"finetune_epochs", "augment", "mixup"}.isdisjoint(chosen.values)
    # What depends on a kept value follows it.
    assert chosen.values["head_epochs"] == 1 and chosen.values["warmup_epochs"] == 0.18
    assert "  --finetune_epochs=7: given, kept." in chosen.lines
    assert "  --augment=randaugment: given, kept." in chosen.lines


def test_cache_features_keeps_the_images_unaugmented():
    config, _, given = _parse("--recipe=auto", "--cache_features")
    chosen = auto_recipe.auto_recipe(LARGE, config, given).values
    assert chosen["augment"] == "none" and chosen["mixup"] == 0.0


def test_a_given_cutmix_gets_no_mixup_beside_it():
    config, _, given = _parse("--recipe=auto", "--cutmix=1.0")
    assert auto_recipe.auto_recipe(LARGE, config, given).values["mixup"] == 0.0


def test_a_given_warmup_longer_than_the_chosen_fine_tuning_is_refused():
    # A warmup the default --finetune_epochs=10 would take, which auto shortens.
    config, _, given = _parse("--recipe=auto", "--warmup_epochs=9.5")
    with pytest.raises(UsageError, match=r"--warmup_epochs=9.5 leaves no fine-tuning "
                                         r"after warmup in the --finetune_epochs=9"):
        auto_recipe.auto_recipe(LARGE, config, given)


def test_manual_still_checks_warmup_against_fine_tuning_when_parsed():
    with pytest.raises(absl_flags.Error, match="leaves no fine-tuning after warmup"):
        _parse("--warmup_epochs=10")
    config, _, _ = _parse("--recipe=auto", "--finetune_epochs=1")
    assert config.warmup_epochs == 1.0  # for the recipe to replace


def test_given_flags_are_those_set_on_the_command_line_or_in_a_flagfile():
    _, _, given = _parse("--seed=3", flagfile=SMOKE_FLAGS)
    assert {"seed", "dataset", "head_epochs"} <= given
    assert "augment" not in given and "recipe" not in given


def test_flags_txt_holds_the_choices_and_reruns_them(tmp_path):
    config, flagfile_text, given = _parse("--recipe=auto", f"--model_dir={tmp_path}")
    chosen = auto_recipe.auto_recipe(SMALL, config, given)
    written = flagfile.with_flag_values(flagfile_text, chosen.values)
    # Just as the flags would write it had they been given so.
    _, explicit, _ = _parse("--recipe=auto", f"--model_dir={tmp_path}",
                            *(f"--{name}={value}" for name, value in chosen.values.items()))
    assert written == explicit
    (tmp_path / "flags.txt").write_text(written)
    rerun, _, rerun_given = _parse(flagfile=str(tmp_path / "flags.txt"))
    assert rerun.recipe == "auto" and rerun.finetune_epochs == 54
    assert rerun.augment == "basic" and rerun.warmup_epochs == 5.4
    # Every option of flags.txt is given: rerun, the recipe changes nothing.
    assert auto_recipe.auto_recipe(SMALL, rerun, rerun_given).values == {}


def test_run_training_decides_before_claiming_the_folder(tmp_path, mock_tfds, monkeypatch,
                                                        capsys):
    # The folder holds an unfinished run of the same command, whose flags.txt
    # has the recipe's choices: a rerun that decided only after the claim
    # would find other flags there, and refuse to resume.
    model_dir = tmp_path / "run"
    config, flagfile_text, given = _parse("--recipe=auto", TEST_BACKBONE,
                                          f"--model_dir={model_dir}", flagfile=SMOKE_FLAGS)
    stored = flagfile.with_flag_values(flagfile_text, {"augment": "basic", "mixup": 0.0})
    model_dir.mkdir()
    (model_dir / "flags.txt").write_text(stored)
    seen = {}

    def train_evaluate_export(config, strategy, role, backbone, flagfile_text, state,
                              verbose, splits):
        seen.update(config=config, flagfile_text=flagfile_text, state=state, splits=splits)
        return {}

    monkeypatch.setattr(job, "_train_evaluate_export", train_evaluate_export)
    job.run_training(config, flagfile_text=flagfile_text, verbose=0, given_flags=given)
    assert seen["state"] == rundir.RESUME
    assert seen["flagfile_text"] == stored and seen["config"].augment == "basic"
    assert seen["splits"] is not None  # read once, before the claim
    out = capsys.readouterr().out
    assert "Recipe auto, for 58 training images" in out
    assert "  --augment=basic: BiT's random crop and horizontal flip, at every size." in out
    assert "  --warmup_epochs=0.5: given, kept." in out  # smoke.flags gives it


@pytest.mark.slow
def test_an_auto_run_trains_with_its_choices_and_records_them(tmp_path, mock_tfds, capsys):
    config, flagfile_text, given = _parse(
        "--recipe=auto", TEST_BACKBONE, f"--model_dir={tmp_path / 'run'}",
        "--head_epochs=1", "--finetune_epochs=1", flagfile=SMOKE_FLAGS)
    job.run_training(config, flagfile_text=flagfile_text, verbose=0, given_flags=given)
    with open(os.path.join(config.model_dir, "flags.txt")) as file:
        written = file.read().splitlines()
    assert {"--recipe=auto", "--augment=basic", "--mixup=0.0"} <= set(written)
    # The same command again finds its run complete: it decided the same.
    job.run_training(config, flagfile_text=flagfile_text, verbose=0, given_flags=given)
    assert "holds a complete run; nothing to do" in capsys.readouterr().out
