"""The run's folder: every path in it, and one run at a time in it.

Every file and folder a run writes is named here, once. Before any data or
model work, `claim` decides what a run in `--model_dir` should do: start
fresh, resume an interrupted run of the same flags, or stop because the run is
complete, another process is using the folder, or it holds a different
unfinished run.
"""

import contextlib
import dataclasses
import fcntl
import os
import shutil
import socket

from tl_keras import flagfile
from tl_keras.errors import UsageError

LOCK_FILE = "run.lock"
COMPLETE_FILE = "COMPLETE"
FLAGS_FILE = "flags.txt"
PROGRESS_FILE = "progress.json"
CLASS_NAMES_FILE = "class_names.json"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"
BACKUP_DIR = "backup"
FEATURES_DIR = "features"
# Each self-training round's pseudo-labels, round_N.json (tl_keras.training.self_training).
SELF_TRAINING_DIR = "self_training"
PLOTS_DIR = "plots"
EVALUATION_DIR = "evaluation"
# In EVALUATION_DIR: --mode=evaluate's Grad-CAM grid.
GRADCAM_FILE = "gradcam.png"
# --mode=predict --explain's Grad-CAM overlays.
EXPLANATIONS_DIR = "explanations"
SAVED_MODEL_DIR = "saved_model"
KERAS_MODEL_FILE = "model.keras"
TFLITE_FILE = "model.tflite"
ONNX_FILE = "model.onnx"
# The class names of model.tflite and model.onnx, one per line, beside them.
LABELS_FILE = "labels.txt"
# The suffixes of the model files --mode=predict takes instead of a run folder.
MODEL_FILE_SUFFIXES = (".tflite", ".onnx")
BACKBONE_WEIGHTS_FILE = "backbone.weights.h5"
# Under the chief's --model_dir, the other workers' own folders.
WORKERS_DIR = "workers"
# What --mode=find_lr and --mode=audit write, beside a run or before one; a
# run's claim of the folder passes them by, and --overwrite keeps them.
FIND_LR_DIR = "find_lr"
# What --mode=probe writes, beside a run or before one, as find_lr/ is.
PROBE_DIR = "probe"
AUDIT_DIR = "audit"
# Where Keras' BackupAndRestore keeps the epoch it restores to, in its folder.
BACKUP_METADATA_FILE = "training_metadata.json"

FRESH, RESUME, COMPLETE = "fresh", "resume", "complete"

# The first line of every flags.txt, and the whole of every COMPLETE file: a
# folder holding either is a run's, and only such a folder is resumed or,
# with --overwrite, cleared. Their text, not just their names, is checked,
# since a folder of the user's may well hold a flags.txt of its own. (A run
# writes flags.txt before anything else; a worker's folder keeps only
# COMPLETE once the run is done.)
FLAGS_HEADER = "# The effective flags of this run; rerun with --flagfile=THIS_FILE."
_COMPLETE_TEXT = "This run finished; rerunning it does nothing without --overwrite.\n"
# Everything a run writes at the top of its folder. --overwrite deletes these
# and nothing else, so a file of the user's beside a run survives.
RUN_OUTPUTS = frozenset({
    FLAGS_FILE, COMPLETE_FILE, PROGRESS_FILE, PROGRESS_FILE + ".tmp", CLASS_NAMES_FILE,
    METRICS_FILE, HISTORY_FILE, TENSORBOARD_DIR, CHECKPOINTS_DIR, BACKUP_DIR,
    FEATURES_DIR, SELF_TRAINING_DIR, PLOTS_DIR, EVALUATION_DIR, EXPLANATIONS_DIR,
    SAVED_MODEL_DIR, KERAS_MODEL_FILE, TFLITE_FILE, ONNX_FILE, LABELS_FILE,
    BACKBONE_WEIGHTS_FILE,
})
# Temporary folders of atomic writes (tl_keras.outputs.export), left by a kill.
TEMPORARY_PREFIX = ".export-"
# How many entries of a folder that holds no run the refusal names.
_ENTRIES_SHOWN = 5


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """Where a run writes inside `--model_dir`."""

    model_dir: str

    def _in(self, *parts):
        return os.path.join(self.model_dir, *parts)

    flags = property(lambda self: self._in(FLAGS_FILE))
    class_names = property(lambda self: self._in(CLASS_NAMES_FILE))
    metrics = property(lambda self: self._in(METRICS_FILE))
    history = property(lambda self: self._in(HISTORY_FILE))
    progress = property(lambda self: self._in(PROGRESS_FILE))
    tensorboard = property(lambda self: self._in(TENSORBOARD_DIR))
    features = property(lambda self: self._in(FEATURES_DIR))
    evaluation = property(lambda self: self._in(EVALUATION_DIR))
    gradcam_grid = property(lambda self: self._in(EVALUATION_DIR, GRADCAM_FILE))
    explanations = property(lambda self: self._in(EXPLANATIONS_DIR))
    saved_model = property(lambda self: self._in(SAVED_MODEL_DIR))
    keras_model = property(lambda self: self._in(KERAS_MODEL_FILE))
    tflite = property(lambda self: self._in(TFLITE_FILE))
    onnx = property(lambda self: self._in(ONNX_FILE))
    labels = property(lambda self: self._in(LABELS_FILE))
    backbone_weights = property(lambda self: self._in(BACKBONE_WEIGHTS_FILE))
    training_curves = property(lambda self: self._in(PLOTS_DIR, "training_curves.png"))
    best_checkpoint = property(lambda self: self._in(CHECKPOINTS_DIR, "best.weights.h5"))
    # Where a new best epoch's weights are written, until progress.json has
    # recorded which epoch they are (see `tl_keras.training.runstate`).
    pending_best_checkpoint = property(
        lambda self: self._in(CHECKPOINTS_DIR, "best.pending.weights.h5"))
    backups = property(lambda self: self._in(BACKUP_DIR))
    find_lr_tensorboard = property(lambda self: self._in(FIND_LR_DIR, TENSORBOARD_DIR))
    audit = property(lambda self: self._in(AUDIT_DIR))

    probe_csv = property(lambda self: self._in(PROBE_DIR, "depths.csv"))
    probe_plot = property(lambda self: self._in(PROBE_DIR, "depths.png"))
    probe_features = property(lambda self: self._in(PROBE_DIR, "features"))

    def find_lr_plot(self, phase):
        return self._in(FIND_LR_DIR, f"{phase}.png")

    def find_lr_csv(self, phase):
        return self._in(FIND_LR_DIR, f"{phase}.csv")

    def backup_dir(self, phase):
        return self._in(BACKUP_DIR, phase)

    def pseudo_labels(self, round_number):
        return self._in(SELF_TRAINING_DIR, f"round_{round_number}.json")

    def phase_end_weights(self, phase):
        return self._in(CHECKPOINTS_DIR, f"{phase}_end.weights.npz")


@contextlib.contextmanager
def claim(model_dir, flagfile_text, overwrite, flag_defaults=""):
    """Locks `model_dir` for this process and says how the run should go.

    Args:
        model_dir: the run's folder (created if missing).
        flagfile_text: this run's effective flags, as `flags.txt` holds them.
        overwrite: start afresh, deleting what an earlier run wrote.
        flag_defaults: every flag at its default, as flags.txt writes it: a
            flag an older version's flags.txt lacks may be given at its
            default (`tl_keras.flagfile.differences`).

    Yields:
        FRESH, RESUME or COMPLETE.

    Raises:
        UsageError: when another live process holds the lock, the folder
            holds a run (complete or not) with other flags, or it is not empty
            and holds no run (with or without `overwrite`).
    """
    with _claimed(model_dir):
        yield _decide(model_dir, flagfile_text, overwrite, flag_defaults)


@contextlib.contextmanager
def claim_beside_run(model_dir):
    """Locks `model_dir` for a learning-rate range test (`--mode=find_lr`), a
    probe of the backbone's depths (`--mode=probe`) or an audit
    (`--mode=audit`).

    Each writes into its own folder alone (`FIND_LR_DIR`, `PROBE_DIR`, `AUDIT_DIR`), so
    `model_dir` may be new, empty, or a run's (complete or not): a run's files
    are left as they are, and holding the lock keeps a training run out while
    the mode reads them.

    Raises:
        UsageError: when another live process holds the lock, or the folder
            is not empty and holds no run.
    """
    with _claimed(model_dir):
        entries = _entries(model_dir)
        if entries and not holds_a_run(model_dir):
            raise UsageError(_not_a_run_message(model_dir, entries))
        yield


@contextlib.contextmanager
def _claimed(model_dir):
    """Creates and locks `model_dir`; removes it again if nothing was written."""
    created = not os.path.exists(model_dir)
    os.makedirs(model_dir, exist_ok=True)
    try:
        with _locked(model_dir):
            yield
    finally:
        if created and not os.listdir(model_dir):
            os.rmdir(model_dir)  # A run that stopped before writing anything.


def mark_complete(model_dir):
    """Writes the COMPLETE marker: a rerun of a complete run does nothing."""
    with open(os.path.join(model_dir, COMPLETE_FILE), "w") as file:
        file.write(_COMPLETE_TEXT)


def worker_dir(model_dir, worker_name):
    """Where a multi-worker run's non-chief worker writes: TensorFlow's
    multi-worker guide has every worker save what the chief saves, the others
    to places of their own. It stays until the run completes, so that a rerun
    after a kill resumes every worker from the same epoch."""
    return os.path.join(model_dir, WORKERS_DIR, worker_name)


def discard_worker_outputs(model_dir):
    """Deletes what a non-chief worker wrote, once the run is complete, but for
    the COMPLETE marker, which tells a rerun there is nothing to do, and
    flags.txt, which lets this worker refuse a rerun with other flags as the
    chief does, rather than wait for a chief that stopped."""
    for name in set(os.listdir(model_dir)) - {COMPLETE_FILE, FLAGS_FILE, LOCK_FILE}:
        path = os.path.join(model_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _entries(model_dir):
    """What the folder holds that says whether, and which, run it holds: not
    the lock, the other workers' folders (theirs to decide about), nor what
    --mode=find_lr, --mode=probe and --mode=audit wrote."""
    return set(os.listdir(model_dir)) - {LOCK_FILE, WORKERS_DIR, FIND_LR_DIR, PROBE_DIR,
                                         AUDIT_DIR}


def _decide(model_dir, flagfile_text, overwrite, flag_defaults=""):
    entries = _entries(model_dir)
    if not entries:
        return FRESH
    if not holds_a_run(model_dir):
        raise UsageError(_not_a_run_message(model_dir, entries))
    if overwrite:
        _delete_run_outputs(model_dir, entries)
        return FRESH
    complete = COMPLETE_FILE in entries
    if FLAGS_FILE not in entries:
        # A worker's folder of a complete cluster run keeps no flags.txt of
        # its own when an older version wrote it; the chief's is checked.
        return COMPLETE if complete else FRESH
    differences = flag_differences(model_dir, flagfile_text, defaults_text=flag_defaults)
    if differences:
        if complete:
            # Saying "nothing to do" here would pass the earlier run's results
            # off as these flags'.
            raise UsageError(
                f"{model_dir} holds a complete run made with other flags "
                f"({differences}): its results are those flags', not these. Pick "
                f"another --model_dir for these flags, or pass --overwrite to train "
                f"again there with them.")
        raise UsageError(
            f"{model_dir} holds an unfinished run with other flags "
            f"({differences}). Rerun it with its own flags "
            f"(--flagfile={os.path.join(model_dir, FLAGS_FILE)}) to resume it, pick "
            f"another --model_dir, or pass --overwrite to start afresh there."
        )
    return COMPLETE if complete else RESUME


def _not_a_run_message(model_dir, entries):
    shown = sorted(entries)[:_ENTRIES_SHOWN]
    more = f" and {len(entries) - len(shown)} more" if len(entries) > len(shown) else ""
    return (
        f"--model_dir={model_dir} is not empty and holds no tl_keras run (no "
        f"{FLAGS_FILE} or {COMPLETE_FILE} written by one): it holds "
        f"{', '.join(shown)}{more}. A run "
        f"writes only into an empty folder or its own; --overwrite deletes only "
        f"what a run wrote, so it doesn't apply here. Pick a new --model_dir, "
        f"such as {os.path.join(model_dir, 'run')}."
    )


def holds_a_run(model_dir):
    """Whether `model_dir` holds a tl_keras run's flags.txt or COMPLETE marker."""
    def starts_with(name, text):
        try:
            with open(os.path.join(model_dir, name)) as file:
                return file.read(len(text)) == text
        except (OSError, UnicodeDecodeError):
            return False

    return (starts_with(FLAGS_FILE, FLAGS_HEADER + "\n")
            or starts_with(COMPLETE_FILE, _COMPLETE_TEXT))


def _delete_run_outputs(model_dir, entries):
    """Deletes what an earlier run wrote, and nothing else."""
    kept = []
    for name in sorted(entries):
        path = os.path.join(model_dir, name)
        if name in RUN_OUTPUTS or name.startswith(TEMPORARY_PREFIX):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        else:
            kept.append(name)
    if kept:
        print(f"--overwrite deleted the earlier run in {model_dir} and kept what "
              f"no run writes: {', '.join(kept)}.", flush=True)


def flag_differences(model_dir, flagfile_text, ignored=frozenset(), defaults_text=""):
    """How the flags.txt of the run in `model_dir` differs from `flagfile_text`
    (`stored --seed=1, given --seed=2`, flag by flag), but for the flags named
    in `ignored`; empty when they match (`tl_keras.flagfile.differences`)."""
    with open(os.path.join(model_dir, FLAGS_FILE)) as file:
        return flagfile.differences(file.read(), flagfile_text, ignored, defaults_text)


@contextlib.contextmanager
def _locked(model_dir):
    """Holds `model_dir/run.lock` with `fcntl.flock`, which the kernel lets go
    of when the process ends, however it ends: a killed run's lock file is
    simply taken over. The file names the holder, for the refusal."""
    path = os.path.join(model_dir, LOCK_FILE)
    while True:
        file = open(path, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip()
            file.close()
            raise UsageError(
                f"Another run is using {model_dir}: its lock file {path} is held by "
                f"process {holder}. Wait for it to finish, or pick another "
                f"--model_dir.") from None
        # The holder before us deletes the file as it lets go; a lock on a
        # deleted file would hold nothing, so take the new one instead.
        if _is_same_file(file, path):
            break
        file.close()
    try:
        file.truncate(0)
        file.write(f"{socket.gethostname()} {os.getpid()}\n")
        file.flush()
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        file.close()


def _is_same_file(file, path):
    try:
        return os.stat(path).st_ino == os.fstat(file.fileno()).st_ino
    except FileNotFoundError:
        return False
