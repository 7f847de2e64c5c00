"""What a run prints: our lines and a summary; library chatter only when asked."""

import os
import re
import subprocess
import sys

import pytest
from absl import flags as absl_flags
from absl.testing import flagsaver

from conftest import REPO_ROOT, SMOKE_FLAGS
from tl_keras.cli import flags
from tl_keras.errors import UsageError
from tl_keras.outputs import predict

LAUNCHER = os.path.join(REPO_ROOT, "tests", "mock_run.py")
EPOCHS = 2
RUN_FLAGS = [f"--flagfile={SMOKE_FLAGS}", "--backbone=mobilenet",
             "--head_epochs=1", f"--finetune_epochs={EPOCHS - 1}", "--warmup_epochs=0.5",
             "--batch_size=8", "--steps_per_epoch=2", "--export_tflite",
             # What the run prints is under test, not XLA, whose compiling of
             # each phase's step cost more than the run's training.
             "--jit_compile=false"]
# TensorFlow's C++ logging and absl's: severity letter, month, day, then a space.
LIBRARY_LINE = re.compile(r"^[IWEF]\d{4} ", re.MULTILINE)

# A training run may print: the header (strategy, backbone, run folder, dataset:
# 4 lines); per phase, the line saying what trains, Keras' "Epoch N/M" line and
# one line per epoch (3 + 2 per further epoch); the line naming the exported
# weights and the test result (2); start and end lines of the export and of the
# TFLite check (4); and the summary (a blank line, test, exported weights, one
# line per phase, outputs, "Look further:" and four commands: 9 + phases).
PHASES = 2
MAX_TRAINING_LINES = 4 + PHASES * 3 + 2 * (EPOCHS - PHASES) + 2 + 4 + 9 + PHASES


def _run(*args):
    # conftest sets TF_CPP_MIN_LOG_LEVEL for the tests' own process; the
    # launched run must see what a user who never set it has.
    environment = {key: value for key, value in os.environ.items()
                   if key != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, LAUNCHER, *args], cwd=REPO_ROOT,
                            env=environment, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("console") / "run"
    return str(model_dir), _run(*RUN_FLAGS, f"--model_dir={model_dir}")


def _assert_quiet(output):
    assert not LIBRARY_LINE.search(output), output
    assert "Warning:" not in output, output


@pytest.mark.slow
def test_a_training_run_prints_its_lines_and_a_summary_only(trained):
    model_dir, output = trained
    _assert_quiet(output)
    lines = output.splitlines()
    assert len(lines) <= MAX_TRAINING_LINES, output
    for expected in (
            "Done. Test (test, 64 images): top-1 ",
            "Exported the weights of epoch ",
            "Phase head: ", "Phase finetune: ",
            f"Outputs in {model_dir}: saved_model/",
            f"  tensorboard --logdir {model_dir}/tensorboard",
            f"  python run.py --mode=evaluate --model_dir={model_dir}",
            f"  python run.py --mode=predict --model_dir={model_dir} --images=PATH",
            f"  saved_model_cli show --dir {model_dir}/saved_model --all"):
        assert any(line.startswith(expected) for line in lines), (expected, output)
    assert re.search(r"^Phase finetune: [\d.]+ s, training at [\d,]+ images/s\.$",
                     output, re.MULTILINE), output
    # The slow steps say when they start and how long they took.
    assert re.search(r"^Exporting saved_model/.*\.\.\.\nWrote saved_model/.* in [\d.]+ s\.$",
                     output, re.MULTILINE), output
    assert re.search(r"^Converting to a float32 model\.tflite and checking it\.\.\.\n"
                     r"Wrote float32 model\.tflite .* in [\d.]+ s\.$", output,
                     re.MULTILINE), output


@pytest.mark.slow
def test_evaluate_and_predict_print_no_library_lines(trained, tmp_path):
    model_dir, _ = trained
    evaluation = _run("--mode=evaluate", f"--model_dir={model_dir}")
    _assert_quiet(evaluation)
    assert "top-1" in evaluation and "Wrote metrics.json" in evaluation
    assert f"right predictions: {model_dir}/evaluation/gradcam.png" in evaluation

    # One process for --mode=predict: --explain loads the SavedModel as a plain
    # prediction does, then model.keras for Grad-CAM, so it quiets (or fails
    # to quiet) both. A plain prediction runs below, with --verbosity=1.
    image = tmp_path / "image.png"
    from PIL import Image
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    explained = _run("--mode=predict", f"--model_dir={model_dir}", f"--images={image}",
                     "--explain")
    _assert_quiet(explained)
    # The image's line, naming its overlay, a count, and where the overlays went.
    assert len(explained.splitlines()) <= 3, explained
    assert f"{image}: " in explained
    assert f"(Grad-CAM: {model_dir}/explanations/image.png.png)" in explained, explained


@pytest.mark.slow
def test_verbosity_brings_the_library_lines_back(trained, tmp_path):
    # --mode=predict: the cheapest process that loads a run's model, as
    # --mode=evaluate does, and quiets the libraries by the same code.
    model_dir, _ = trained
    image = tmp_path / "image.png"
    from PIL import Image
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    prediction = _run("--mode=predict", f"--model_dir={model_dir}", f"--images={image}",
                      "--verbosity=1")
    assert f"{image}: " in prediction
    assert LIBRARY_LINE.search(prediction), prediction


def test_helpshort_lists_the_tools_flags_by_group(capsys):
    with flagsaver.flagsaver(), pytest.raises(SystemExit) as exit_info:
        flags.parse(["run.py", "--helpshort"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    titles = [title for title, _ in flags.HELP_GROUPS]
    assert [line[:-1] for line in text.splitlines() if line[:-1] in titles] == titles
    assert "  --dataset=cifar100\n" in text and "  --head_epochs=3\n" in text
    assert "--verbosity=0" in text
    assert "--alsologtostderr" not in text and "--only_check_args" not in text


def test_every_flag_is_in_one_help_group():
    grouped = [holder.name for _, holders in flags.HELP_GROUPS for holder in holders]
    defined = [flag.name for flag in absl_flags.FLAGS.get_flags_for_module(flags.__name__)]
    assert sorted(grouped) == sorted(defined)


def test_a_flagfile_line_without_dashes_is_named(tmp_path, capsys):
    flagfile = tmp_path / "mine.flags"
    flagfile.write_text("# comment\n--batch_size=8\nimage_size=32\n")
    with flagsaver.flagsaver(), pytest.raises(SystemExit) as exit_info:
        flags.parse(["run.py", f"--flagfile={flagfile}"])
    assert exit_info.value.code == 2
    assert (f"error: {flagfile}, line 3: 'image_size=32' is not a flag: flags start "
            f"with --, as in --image_size=32.") in capsys.readouterr().err


def test_a_missing_flagfile_has_one_error_prefix(capsys):
    with flagsaver.flagsaver(), pytest.raises(SystemExit) as exit_info:
        flags.parse(["run.py", "--flagfile=no_such.flags"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith("error: Unable to open flagfile: "), message
    assert "ERROR" not in message


def test_images_that_do_not_exist_are_named_so(tmp_path):
    with pytest.raises(UsageError, match="no such file or folder"):
        predict.image_files(str(tmp_path / "missing"))
    with pytest.raises(UsageError, match="no image files there"):
        predict.image_files(str(tmp_path / "*.jpg"))
