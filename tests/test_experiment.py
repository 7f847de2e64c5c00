"""The CIFAR-10 transfer experiment compares like with like, and checks its data."""

import dataclasses
import importlib.util
import os
import subprocess
import sys

import pytest

from tl_keras import config
from tl_keras import options

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPOSITORY, "experiments", "cifar10_transfer.py")
# The script's parts import one another as the package `transfer`, as they do
# when the script runs from experiments/.
sys.path.insert(0, os.path.dirname(SCRIPT))

from transfer import arms as arms_lib  # noqa: E402
from transfer import report  # noqa: E402
from transfer.runner import Runner, continue_finished_run  # noqa: E402


@pytest.fixture(scope="module")
def experiment():
    """The script, loaded as a module: its flags are defined."""
    spec = importlib.util.spec_from_file_location("cifar10_transfer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flag_values(flags_):
    return dict(flag.lstrip("-").split("=", 1) for flag in flags_)


@pytest.mark.parametrize("mode", ["FULL", "QUICK"])
def test_the_arms_differ_only_in_weights_and_what_trains(mode):
    schedule = getattr(arms_lib, mode)
    arms = {arm: _flag_values(arms_lib.target_flags("DATA", 100, arm, schedule, "SRC.h5",
                                                    unlabeled="POOL"))
            for arm in arms_lib.ARMS}

    for arm, values in arms.items():
        epochs = int(values["head_epochs"]) + int(values["finetune_epochs"])
        assert epochs == schedule.target_epochs, f"arm {arm} trains for another length"
        for shared in ("dataset", "classes", "train_examples_per_class", "val_fraction",
                       "batch_size"):
            assert values[shared] == arms["scratch"][shared], (arm, shared)
    assert arms["scratch"]["weights"] == "none"
    assert arms["scratch"]["batchnorm"] == "train"
    assert arms["head"]["weights"] == arms["both"]["weights"] == "SRC.h5"
    assert arms["head"]["finetune_epochs"] == "0"
    assert int(arms["both"]["head_epochs"]) > 0 and int(arms["both"]["finetune_epochs"]) > 0
    assert set(arms["both"]["classes"].split(",")).isdisjoint(arms_lib.SOURCE_CLASSES)


@pytest.mark.parametrize("mode", ["FULL", "QUICK"])
def test_the_self_training_arm_is_both_phases_then_a_round_on_the_pool(mode):
    schedule = getattr(arms_lib, mode)
    both = arms_lib.target_flags("DATA", 100, "both", schedule, "SRC.h5")
    self_training = arms_lib.target_flags("DATA", 100, "self", schedule, "SRC.h5",
                                          unlabeled="POOL")
    assert self_training[:len(both)] == both
    added = _flag_values(self_training[len(both):])
    assert added == {"unlabeled": "POOL",
                     "self_training_epochs": str(schedule.self_training_epochs),
                     **_flag_values(arms_lib.SELF_TRAINING_FLAGS)}
    assert schedule.self_training_epochs > 0
    with pytest.raises(ValueError, match="unlabelled"):
        arms_lib.target_flags("DATA", 100, "self", schedule, "SRC.h5")


def test_full_modes_round_is_the_tools_default_round():
    """docs/results.md presents arm (d) as a round with the tool's defaults."""
    default = {field.name: options.flag_spec(field).default
               for field in dataclasses.fields(config.Config)}
    assert arms_lib.FULL.self_training_epochs == default["self_training_epochs"]
    assert arms_lib.QUICK.self_training_epochs < arms_lib.FULL.self_training_epochs


def test_self_training_flags_come_last_so_they_win_and_name_their_run():
    changed = ["--self_training_epochs=5", "--pseudo_labels_per_class=1000"]
    self_training = arms_lib.target_flags("DATA", 100, "self", arms_lib.FULL, "SRC.h5",
                                          unlabeled="POOL", self_training=changed)
    assert self_training[-2:] == changed
    assert arms_lib.run_name_suffix(changed) == (
        "__self_training_epochs=5__pseudo_labels_per_class=1000")
    assert arms_lib.run_name_suffix([]) == ""


def test_the_unlabelled_pool_holds_the_target_images_no_run_trains_or_validates_on(tmp_path):
    """The pool must keep out the run's validation images, which --unlabeled
    refuses, and leaves out its labelled ones."""
    from PIL import Image

    from tl_keras.data import folder, unlabeled

    for split, count in (("train", 50), ("test", 2)):
        for name in ("cat", "dog", "frog"):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            for index in range(count):
                colour = (index, len(name), 0 if split == "train" else 200)
                Image.new("RGB", (8, 8), colour).save(
                    tmp_path / "data" / split / name / f"{index}.png")
    data = str(tmp_path / "data")
    pool = arms_lib.write_unlabeled_pool(data, str(tmp_path / "pool"), 5, ("dog", "frog"))
    splits = folder.load_folder(
        f"folder:{data}", image_size=32, resize="stretch",
        val_fraction=arms_lib.TARGET_VAL_FRACTION, seed=arms_lib.TARGET_SEED,
        strict=False, classes=("dog", "frog"), train_examples_per_class=5)

    assert sorted(os.listdir(pool)) == ["dog", "frog"]
    # 50 a class, less 1 validation image (2%) and 5 labelled ones.
    assert [len(os.listdir(os.path.join(pool, name))) for name in ("dog", "frog")] == [44, 44]
    checked = unlabeled.load_pool(pool, splits, dataset=f"folder:{data}", data_dir=None,
                                  image_size=32, resize="stretch", strict=False)
    assert len(checked) == 88 and (checked.hidden_labels >= 0).all()


def test_a_pool_subset_is_a_seeded_random_choice_of_the_pools_images(tmp_path):
    pool = tmp_path / "pool"
    for name in ("dog", "frog"):
        (pool / name).mkdir(parents=True)
        for index in range(30):
            image = tmp_path / "images" / name / f"{index}.png"
            image.parent.mkdir(parents=True, exist_ok=True)
            image.write_bytes(b"x")
            (pool / name / f"{index}.png").symlink_to(image)

    subset = arms_lib.write_pool_subset(str(pool), str(tmp_path / "subset"), 12)
    again = arms_lib.write_pool_subset(str(pool), str(tmp_path / "again"), 12)

    chosen = sorted(os.path.join(name, file_name) for name in os.listdir(subset)
                    for file_name in os.listdir(os.path.join(subset, name)))
    assert len(chosen) == 12
    assert {name.split(os.sep)[0] for name in chosen} == {"dog", "frog"}  # both, by chance
    for link in chosen:  # each links to the pool image's file, under its class
        assert os.path.realpath(subset + "/" + link) == str(tmp_path / "images" / link)
    assert chosen == sorted(os.path.join(name, file_name) for name in os.listdir(again)
                            for file_name in os.listdir(os.path.join(again, name)))
    with pytest.raises(ValueError, match="fewer than 61"):
        arms_lib.write_pool_subset(str(pool), str(tmp_path / "too_many"), 61)


def test_arm_d_continues_arm_cs_finished_run_which_run_py_then_resumes(tmp_path):
    """Arm (d)'s folder starts as a copy of arm (c)'s, unfinished, with the
    flags.txt run.py writes for arm (d)'s flags: run.py must take it as the
    same run interrupted and resume it, not refuse it or start afresh."""
    from conftest import parse_config

    from tl_keras import rundir

    finished = tmp_path / "target_n100_both"
    finished.mkdir()
    (finished / rundir.COMPLETE_FILE).write_text("")
    (finished / rundir.PROGRESS_FILE).write_text('{"phases": {}}')
    (finished / rundir.CHECKPOINTS_DIR).mkdir()
    (finished / rundir.CHECKPOINTS_DIR / "finetune_end.weights.npz").write_bytes(b"w")
    model_dir = tmp_path / "target_n100_self"
    source_weights = tmp_path / "backbone.weights.h5"  # run.py checks it exists
    source_weights.write_bytes(b"")
    run_flags = arms_lib.target_flags("DATA", 100, "self", arms_lib.FULL,
                                      str(source_weights), unlabeled="POOL")

    continue_finished_run(str(finished), str(model_dir), run_flags)

    assert (finished / rundir.COMPLETE_FILE).exists(), "arm (c)'s run must stay as it was"
    assert not (model_dir / rundir.COMPLETE_FILE).exists()
    assert (model_dir / rundir.CHECKPOINTS_DIR / "finetune_end.weights.npz").read_bytes() == b"w"
    _, run_py_flags = parse_config(*arms_lib.COMMON_FLAGS, *run_flags,
                                   f"--model_dir={model_dir}", flagfile=None)
    with rundir.claim(str(model_dir), run_py_flags, overwrite=False) as state:
        assert state == rundir.RESUME
    (model_dir / "progress.json").write_text("changed")
    continue_finished_run(str(finished), str(model_dir), run_flags)
    assert (model_dir / "progress.json").read_text() == "changed", "made once, then kept"


def test_the_pool_table_has_arm_c_then_a_row_per_pool_size():
    table = report.pool_table(100, (77.8, 444.0), {
        None: (81.0, 900.0, 82.0, 24_000, 5_000, 95.1),
        1000: (78.5, 600.0, None, 1_000, 1_000, 80.2)})
    rows = [line for line in table.splitlines() if line.startswith("| ") and "%" in line]
    assert rows == ["| none: arm (c) | - | 77.8% | 444 s |",
                    "| 1,000 | 1,000 (80.2%) | 78.5% | 600 s |",
                    "| 24,000 (all) | 5,000 (95.1%) | 81.0% (82.0%) | 900 s |"]


def test_source_trains_every_layer_from_scratch():
    values = _flag_values(arms_lib.source_flags("DATA", arms_lib.FULL))
    assert values["weights"] == "none"
    assert values["batchnorm"] == "train"
    assert values["unfreeze"] == "all"
    assert values["classes"] == ",".join(arms_lib.SOURCE_CLASSES)


def test_results_table_has_a_row_per_size_and_a_column_per_arm():
    results = {(size, arm): (10.0 * i, 60.0)
               for i, (size, arm) in enumerate((s, a) for s in (20, 100) for a in arms_lib.ARMS)}
    del results[20, "self"]  # arm (d) runs at some sizes only
    table = report.results_table((70.0, 300.0), results, [20, 100])
    assert "| 20 | 0.0% (60 s) | 10.0% (60 s) | 20.0% (60 s) | - |" in table
    assert "| 100 | 40.0% (60 s) | 50.0% (60 s) | 60.0% (60 s) | 70.0% (60 s) |" in table
    assert "test top-1 70.0% in 300 s" in table


def test_missing_class_folders_are_named_before_any_run(tmp_path):
    (tmp_path / "train" / "airplane").mkdir(parents=True)
    result = subprocess.run(
        [sys.executable, SCRIPT, f"--data={tmp_path}", f"--work_dir={tmp_path / 'work'}"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "lacks train/automobile" in result.stderr
    assert not (tmp_path / "work").exists(), "nothing should start on bad data"


def test_source_and_target_classes_can_be_swapped():
    source = _flag_values(arms_lib.source_flags("DATA", arms_lib.FULL,
                                                arms_lib.TARGET_CLASSES))
    target = _flag_values(arms_lib.target_flags("DATA", 100, "both", arms_lib.FULL,
                                                "SRC.h5", arms_lib.SOURCE_CLASSES))
    assert source["classes"] == ",".join(arms_lib.TARGET_CLASSES)
    assert target["classes"] == ",".join(arms_lib.SOURCE_CLASSES)


def test_a_class_in_both_source_and_target_is_refused(tmp_path):
    result = subprocess.run(
        [sys.executable, SCRIPT, f"--data={tmp_path}", f"--work_dir={tmp_path / 'work'}",
         "--source_classes=cat,dog", "--target_classes=dog,frog"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "share dog" in result.stderr
    assert not (tmp_path / "work").exists()


def test_a_finished_run_made_by_another_command_is_not_reported(tmp_path):
    """After a recipe change, a rerun in the same folder must not pass the old
    run's figures off as the new recipe's."""
    import json

    (tmp_path / "source").mkdir()
    (tmp_path / "source" / "COMPLETE").write_text("")
    (tmp_path / "source" / "metrics.json").write_text(json.dumps({"test": {"top1": 0.5}}))
    (tmp_path / "times.json").write_text(json.dumps({"source": 10.0}))
    old_flags = [*arms_lib.COMMON_FLAGS, "--augment=none"]
    (tmp_path / "commands.json").write_text(json.dumps({"source": old_flags}))
    runner = Runner(str(tmp_path), total=1)

    assert runner.run("source", "source", ["--augment=none"]) == (50.0, 10.0)
    with pytest.raises(SystemExit, match="--augment=basic --augment=none"):
        runner.run("source", "source", ["--augment=basic"])


def test_every_target_arm_gets_the_same_augmentation():
    """The scratch arm must not lose to transfer for want of the augmentation
    the transferred arms get."""
    for size in (20, 100):
        augments = {arm: _flag_values(arms_lib.target_flags(
            "DATA", size, arm, arms_lib.FULL, "SRC.h5", unlabeled="POOL"))["augment"]
            for arm in arms_lib.ARMS}
        assert set(augments.values()) == {"basic"}, augments


def test_results_table_shows_the_mirrored_figure_beside_the_plain_one():
    results = {(100, "both"): (77.8, 180.0)}
    table = report.results_table((84.7, 4087.0), results, [100], ["both"],
                                 flip={(100, "both"): 79.16})
    assert "| Train images per class | (c) both phases |" in table
    assert "| 100 | 77.8% / 79.2% (180 s) |" in table


def test_an_unknown_arm_is_refused_before_any_run(tmp_path):
    result = subprocess.run(
        [sys.executable, SCRIPT, f"--data={tmp_path}", f"--work_dir={tmp_path / 'work'}",
         "--arms=both,teacher"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "--arms=both,teacher: choose from scratch, head, both, self" in result.stderr
    assert not (tmp_path / "work").exists()


def test_every_arm_runs_by_default(experiment):
    """Arm (d) is measured (docs/results.md), so the default command runs it."""
    from absl import flags

    assert flags.FLAGS["arms"].default == list(arms_lib.ARMS)


def test_the_other_class_probe_names_the_missing_teacher_runs_before_any_work(tmp_path):
    script = os.path.join(REPOSITORY, "experiments", "other_class_pool.py")
    result = subprocess.run(
        [sys.executable, script, f"--data={tmp_path}", f"--work_dir={tmp_path / 'work'}",
         "--sizes=20"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert f"Missing {tmp_path / 'work' / 'target_n20_both' / 'model.keras'}" in result.stderr
    assert "run experiments/cifar10_transfer.py (full mode)" in result.stderr
    assert not (tmp_path / "work").exists()


def test_two_experiments_sharing_a_work_folder_keep_each_others_runs(tmp_path):
    """Each process loads times.json and commands.json when it starts; the
    one that finishes last must not write back a copy without the other's run."""
    sizes_20 = Runner(str(tmp_path), total=1)
    sizes_100 = Runner(str(tmp_path), total=1)
    sizes_20.record("target_n20_self", 2628.0, ["--train_examples_per_class=20"])
    sizes_100.record("target_n100_self", 2783.0, ["--train_examples_per_class=100"])
    reread = Runner(str(tmp_path), total=1)
    assert reread.times == {"target_n20_self": 2628.0, "target_n100_self": 2783.0}
    assert reread.commands == {"target_n20_self": ["--train_examples_per_class=20"],
                               "target_n100_self": ["--train_examples_per_class=100"]}
    assert sorted(os.listdir(tmp_path)) == ["commands.json", "times.json"]
