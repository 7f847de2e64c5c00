"""Shared test setup: two logical CPU devices, mock TFDS data, configs from flags."""

import contextlib
import dataclasses
import fcntl
import io
import os
import pickle
import shutil
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf
from absl import flags as absl_flags
from absl.testing import flagsaver

# Two logical CPUs, so MirroredStrategy can run two replicas on one machine.
# This must happen before TensorFlow initialises its devices.
_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import sliced_mock  # noqa: E402
from tl_keras.cli import flags  # noqa: E402  (after the device setup above)

SMOKE_FLAGS = os.path.join(REPO_ROOT, "configs", "smoke.flags")
# In-process training runs use a backbone quick to trace, compile and save:
# a smoke run on VGG16 (19 layers) took 15 s where ResNet50's took 45 s. It has
# no BatchNormalization, so from random weights its outputs depend on the image
# (MobileNet's, as quick, saturate to one value for every image), and the
# export parity checks on these runs can fail. A test that needs a network
# that learns from random weights passes --backbone=resnet50 itself; the
# BatchNormalization tests build MobileNet.
TEST_BACKBONE = "--backbone=vgg16"


def pytest_addoption(parser):
    parser.addoption(
        "--slow", action="store_true",
        help="also run the tests marked slow; the README's test command and CI do")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: a whole run in processes of its own (killed and resumed, a cluster, "
        "another backend), a large network, or a run that repeats what a faster test "
        "checks for another setting; skipped without --slow")


# The files that take longest with --slow, longest first. pytest-xdist hands
# each worker a whole file at a time (--dist=loadfile, so a module fixture is
# built once) in collection order (--no-loadscope-reorder): these start at
# once, and the short files fill the workers' last minutes.
LONGEST_FILES = ("test_multi_worker.py", "test_faults.py", "test_backends.py",
                 "test_console.py", "test_self_training.py", "test_export_weights.py",
                 "test_phases.py", "test_run.py")


def pytest_collection_modifyitems(config, items):
    """Puts `LONGEST_FILES` first; skips, and so names in the summary, the
    slow tests unless --slow."""
    def file_rank(item):
        name = item.path.name
        return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)

    items.sort(key=file_rank)  # stable: each file keeps its own order
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow, as the README's test command does")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def run_once(tmp_path_factory, name, make):
    """Returns `make(folder)`, made once per test session, whichever pytest-xdist
    worker asks first; the others wait for it and read it back.

    Its result must pickle; `folder` is a fresh directory for it to write into.
    Without xdist this is a session fixture's usual `mktemp`."""
    base = _session_folder(tmp_path_factory)
    folder, result_file = base / f"shared-{name}", base / f"shared-{name}.pickle"
    with open(base / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if result_file.exists():
            return pickle.loads(result_file.read_bytes())
        shutil.rmtree(folder, ignore_errors=True)  # a worker's failed attempt
        folder.mkdir()
        result = make(folder)
        result_file.write_bytes(pickle.dumps(result))
        return result


def _session_folder(tmp_path_factory):
    """The test session's temporary folder, above each pytest-xdist worker's own."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def parse_config(*args, flagfile=SMOKE_FLAGS):
    """Parses a command line as run.py would and returns (Config, flags.txt text).

    Flags are restored afterwards, so tests never leak flag values.
    """
    with flagsaver.flagsaver():
        absl_flags.FLAGS.unparse_flags()
        argv = ["run.py"] + ([f"--flagfile={flagfile}"] if flagfile else []) + list(args)
        absl_flags.FLAGS(argv)
        return flags.to_config(), flags.to_flagfile()


def run_job(tmp_path, *args):
    """Trains the smoke configuration on `TEST_BACKBONE` (plus `args`) into `tmp_path/run`."""
    from tl_keras.cli import job

    config, flagfile_text = parse_config(TEST_BACKBONE, f"--model_dir={tmp_path / 'run'}",
                                         *args)
    metrics = job.run_training(config, flagfile_text=flagfile_text, verbose=0)
    return config, metrics


@contextlib.contextmanager
def training_only():
    """Runs within stop after training: no test evaluation, export or summary,
    for a run read only for what training writes (history.csv, backups)."""
    from tl_keras.cli import finish

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(finish, "evaluate_and_export", lambda *args: {})
        yield


# finished_run's flags beyond run_job's, which a test rerunning it passes again.
FINISHED_RUN_FLAGS = ("--head_epochs=1", "--finetune_epochs=2", "--profile_batches=1,1")


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """One smoke run on mock CIFAR-10: one head epoch, two fine-tuning epochs."""
    def train(tmp_path):
        with sliced_mock.mock_data(num_examples=64):
            return run_job(tmp_path, *FINISHED_RUN_FLAGS)

    return run_once(tmp_path_factory, "smoke", train)


@pytest.fixture
def finished_run_alone(finished_run, tmp_path_factory):
    """`finished_run`, for this test alone while it runs: no test on another
    pytest-xdist worker uses it meanwhile. For a test that writes into the
    run's folder (--mode=evaluate, --explain), locks it (a rerun, find_lr) or
    checks that nothing else wrote there; a test that only reads it needn't."""
    with open(_session_folder(tmp_path_factory) / "shared-smoke.alone.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield finished_run


@pytest.fixture
def mock_tfds():
    """Mocks every TFDS dataset with random examples: 64 in each split, sliced as TFDS slices."""
    with sliced_mock.mock_data(num_examples=64):
        yield


@pytest.fixture(autouse=True)
def _float32_policy():
    """Each test starts from the default dtype policy, whatever a run set."""
    import keras

    yield
    keras.config.set_dtype_policy("float32")


# An imbalanced folder: ten times more training images of one class. The two
# classes differ in brightness under heavy noise, so a model can tell them apart
# but, trained briefly without class weights, predicts mostly the common one.
IMBALANCED_TRAIN = {"common": 40, "rare": 4}
_BRIGHTNESS = {"common": 112, "rare": 144}


def write_imbalanced_folder(root):
    """Writes `root/{train,val,test}/{common,rare}/*.png`, 32 px; balanced
    validation and test splits. Returns `folder:root`."""
    from PIL import Image

    rng = np.random.default_rng(0)
    counts = {"train": IMBALANCED_TRAIN, "val": {"common": 4, "rare": 4},
              "test": {"common": 8, "rare": 8}}
    for split, by_class in counts.items():
        for name, count in by_class.items():
            folder = os.path.join(root, split, name)
            os.makedirs(folder)
            for index in range(count):
                pixels = rng.normal(_BRIGHTNESS[name], 40, (32, 32, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                    os.path.join(folder, f"{index}.png"))
    return f"folder:{root}"


@pytest.fixture(scope="session")
def imbalanced_run(tmp_path_factory):
    """A cheap run on the imbalanced folder with --class_weight=balanced and
    --tta=flip, its head trained on cached features; (config, metrics, stdout)."""
    def train(tmp_path):
        dataset = write_imbalanced_folder(str(tmp_path / "images"))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            config, metrics = run_job(
                tmp_path, f"--dataset={dataset}", "--class_weight=balanced", "--tta=flip",
                "--cache_features", "--head_epochs=1", "--finetune_epochs=0",
                "--batch_size=22")
        return config, metrics, printed.getvalue()

    return run_once(tmp_path_factory, "imbalanced", train)


# Each class a colour: even a network with random weights tells them apart, so
# the head learns them in a few cheap epochs, and a test can tell a model that
# learned from one that names a class at random or the same class for all.
COLOURS = {"blue": (40, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40),
           "white": (225, 225, 225)}
# The colour folder's train and test splits hold this many examples each; a
# run keeps every test image.
COLOUR_EXAMPLES = 40


def write_colours(root, count, seed):
    """Writes `root/<colour>/<i>.png`: `count` noisy 32 px images of each colour."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for index in range(count):
            pixels = np.clip(rng.normal(colour, 30, (32, 32, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{index}.png")
    return root


@pytest.fixture(scope="session")
def deploy_run(tmp_path_factory):
    """A run that learned the colours, its head trained on cached features in
    seconds, exported in every format: the SavedModel, an int8 model.tflite
    and model.onnx; (config, metrics, stdout).

    TensorFlow's own tf.lite.Interpreter raises throughout: with LiteRT
    installed, the export's checks must not construct it."""
    return run_once(tmp_path_factory, "deploy", _train_deploy_run)


def _train_deploy_run(tmp_path):
    from tl_keras.cli import job

    per_class = COLOUR_EXAMPLES // len(COLOURS)
    write_colours(tmp_path / "colours" / "train", per_class, seed=0)
    write_colours(tmp_path / "colours" / "test", per_class, seed=1)
    config, flagfile_text = parse_config(
        TEST_BACKBONE, f"--model_dir={tmp_path / 'run'}", "--finetune_epochs=0",
        "--batch_size=16", f"--dataset=folder:{tmp_path / 'colours'}", "--cache_features",
        "--head_epochs=10", "--head_learning_rate=0.1", "--export_tflite",
        "--tflite_quantization=int8", "--export_onnx")
    # A threshold below any drop, so the TFLite drop warning must appear; no
    # command line can set one.
    config = dataclasses.replace(config, tflite_max_drop=-1.0)
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(tf.lite, "Interpreter", refuse_tf_lite_interpreter)
        metrics = job.run_training(config, flagfile_text=flagfile_text, verbose=0)
    return config, metrics, printed.getvalue()


def refuse_tf_lite_interpreter(*args, **kwargs):
    """Stands in for tf.lite.Interpreter, which LiteRT replaces."""
    raise AssertionError("tf.lite.Interpreter was constructed although LiteRT is installed")


@pytest.fixture(scope="session")
def messy_folder_run(tmp_path_factory):
    """A run on photos of many sizes, two files broken, with --augment=basic,
    --mixup=0.2 and --resize=crop, and a float32 model.tflite
    (tests/messy_folder.py); (config, metrics, stdout)."""
    import messy_folder

    return run_once(tmp_path_factory, "messy", messy_folder.train)
