"""Where to cut a transferred backbone: is the linear probe's best depth
(`--mode=probe`) also the best depth to fine-tune at (`--cut_at`)?

    python experiments/structure_transfer.py --data=../shared/data/cifar10-jpg \\
        [--work_dir=DIR] [--targets=near,distant]

DATA is CIFAR-10 as image folders, DATA/{train,test}/<class>/*.jpg.

1. Source: the transfer experiment's quick source (experiments/cifar10_transfer.py
   --quick): MobileNetV3Small at 128 px trained from scratch for 3 epochs on
   airplane, automobile, bird, cat and deer. Its flags are that experiment's, so a
   source trained by either in the same work folder serves both.
2. Two targets, each with the source's weights:
   - near: the transfer experiment's default split, dog, frog, horse, ship and
     truck, at N=100 images per class;
   - distant: procedural textures at 128 px in five classes (stripes, checks,
     dots, rings, clouds; `transfer/textures.py`), 100 train, 100 validation
     and 300 test images per class, written once to WORK_DIR/textures/.
   For each: `run.py --mode=probe` with arm (c)'s flags fits a linear probe at
   every block of the backbone; then arm (c) (10 head epochs, then 20 of
   fine-tuning every layer) runs at three depths: the probe's suggestion, the
   whole backbone, and a third between them (`transfer/depths.py` says
   which). The distant target also runs arm (a), scratch, first, with the
   same schedule and augmentation.
3. It prints, for each target, the probe's table beside the fine-tuned test
   top-1 (and with `--tta=flip`) at each depth it ran, with every run's wall
   time; writes them to WORK_DIR/results.md; and ends with
   `near_probe_matches_fine_tuning=same` (or `different`), and the same for
   distant: whether the probe's best depth is the best fine-tuned one.

Every run is a `run.py` command, printed before it starts; the experiment has no
training code of its own. Each run's output goes to WORK_DIR/<run>.log, and its
model or probe to WORK_DIR/<run>/. Rerun the same command after an
interruption: finished runs are kept.
"""

import os

from absl import app, flags

from transfer import REPOSITORY
from transfer import arms as arms_lib
from transfer import depth_report, depths, report, textures
from transfer.runner import Runner

_DATA = flags.DEFINE_string(
    "data", None, "CIFAR-10 as image folders: DATA/{train,test}/<class>/*.jpg.")
_WORK_DIR = flags.DEFINE_string(
    "work_dir", os.path.join(REPOSITORY, "runs", "structure_transfer"),
    "Where runs, logs, the textures and results.md go.")
TARGETS = ("near", "distant")
_TARGETS = flags.DEFINE_list(
    "targets", list(TARGETS),
    "Targets to study, of near (CIFAR-10's other five classes) and distant (textures).")

# Every target run has N images per class and the quick schedule, as
# cifar10_transfer.py --quick's arm (c) at N=100.
SIZE = arms_lib.GAIN_SIZE
SCHEDULE = arms_lib.QUICK
DEPTHS_PER_TARGET = 3


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    unknown = sorted(set(_TARGETS.value) - set(TARGETS))
    if unknown or not _TARGETS.value:
        raise app.UsageError(
            f"--targets={','.join(_TARGETS.value)}: choose from {', '.join(TARGETS)}.")
    targets = [name for name in TARGETS if name in _TARGETS.value]
    data = _checked_data()
    work_dir = os.path.abspath(_WORK_DIR.value)
    os.makedirs(work_dir, exist_ok=True)
    runs_per_target = {"near": 1 + DEPTHS_PER_TARGET, "distant": 2 + DEPTHS_PER_TARGET}
    runner = Runner(work_dir, total=1 + sum(runs_per_target[name] for name in targets))
    runner.run("source", f"source, {len(arms_lib.SOURCE_CLASSES)} classes from scratch",
               arms_lib.source_flags(data, SCHEDULE))
    source_weights = os.path.join(work_dir, "source", "backbone.weights.h5")
    studies = {}
    if "near" in targets:
        studies["near"] = _study(
            runner, "near", "Near target: CIFAR-10 "
            f"{', '.join(arms_lib.TARGET_CLASSES)}, N={SIZE}",
            lambda arm: arms_lib.target_flags(data, SIZE, arm, SCHEDULE, source_weights))
    if "distant" in targets:
        folder = textures.write_textures(os.path.join(work_dir, "textures"))
        # The folder's val/ and test/ are the splits; --val_fraction, in
        # every target's flags, only carves splits a folder lacks.
        studies["distant"] = _study(
            runner, "distant", f"Distant target: textures at 128 px "
            f"({', '.join(textures.CLASSES)}), N={SIZE}",
            lambda arm: arms_lib.target_flags(folder, SIZE, arm, SCHEDULE, source_weights,
                                              textures.CLASSES),
            with_scratch=True)
    _report(work_dir, studies)


def _checked_data():
    """--data as an absolute path, checked to hold the classes' folders."""
    data = os.path.abspath(_DATA.value)
    missing = arms_lib.missing_class_folders(
        data, arms_lib.SOURCE_CLASSES + arms_lib.TARGET_CLASSES)
    if missing:
        raise app.UsageError(missing)
    return data


def _study(runner, name, title, arm_flags, with_scratch=False):
    """Runs scratch if `with_scratch`, probes one target, then fine-tunes
    arm (c) at the chosen depths.

    Args:
        runner: the `Runner`.
        name: the target's name, which prefixes its runs' names.
        title: the target in words.
        arm_flags: a function from an arm of `arms.ARMS` to its run.py flags.
        with_scratch: whether to run arm (a) too.

    Returns:
        A `depth_report.DepthStudy`.
    """
    # Scratch first: it needs no probe, and shows at once whether the task
    # is hard enough for depths to differ.
    scratch = None
    if with_scratch:
        top1, seconds = runner.run(f"{name}_scratch",
                                   f"{name} target, {arms_lib.ARMS['scratch']}",
                                   arm_flags("scratch"))
        scratch = (top1, seconds,
                   report.flip_top1(os.path.join(runner.work_dir, f"{name}_scratch")))
    both = arm_flags("both")
    probe_seconds = runner.probe(f"{name}_probe", f"{name} target, probe at every depth",
                                 both)
    probed = depths.read_probe(os.path.join(runner.work_dir, f"{name}_probe", "probe"))
    study = depth_report.DepthStudy(title=title, probed=probed, probe_seconds=probe_seconds,
                                    suggested=depths.suggested_block(probed),
                                    scratch=scratch)
    top = probed[-1].block
    for block in depths.fine_tuned_blocks([depth.block for depth in probed], study.suggested):
        # The top is the whole backbone: arm (c) exactly, without --cut_at.
        run_name, cut = ((f"{name}_both_full", []) if block == top
                         else (f"{name}_both_cut{block}", [f"--cut_at={block}"]))
        study.fine_tuned[block] = runner.run(
            run_name, f"{name} target, {arms_lib.ARMS['both']}, "
            + ("the whole backbone" if block == top else f"cut at block {block}"),
            both + cut)
        study.flip[block] = report.flip_top1(os.path.join(runner.work_dir, run_name))
    return study


def _report(work_dir, studies):
    """Writes results.md, prints it, and ends with each target's verdict."""
    text = "\n\n".join(depth_report.study_table(study) for study in studies.values())
    with open(os.path.join(work_dir, "results.md"), "w") as file:
        file.write(text + "\n")
    print()
    print(text)
    for name, study in studies.items():
        print(depth_report.verdict_line(name, study))


if __name__ == "__main__":
    flags.mark_flag_as_required("data")
    app.run(main)
