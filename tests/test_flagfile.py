"""What a resume compares in flags.txt: a run made before a flag existed
resumes with that flag at its default, and only then; --mode=find_lr starts
from its head on the same terms."""

import contextlib
import importlib
import sys

import pytest
from absl import flags as absl_flags
from absl.testing import flagsaver

from conftest import REPO_ROOT, parse_config
from tl_keras import flagfile
from tl_keras import rundir
from tl_keras.cli import flags
from tl_keras.errors import UsageError
from tl_keras.training import lr_finder_setup
from tl_keras.training import runstate

NEW_FLAG_AT_DEFAULT = "--noexport_onnx"


def _old_and_new_texts(*args):
    """(this run's flags.txt as a version before --export_onnx wrote it, and
    as this version writes it), for the same command line `args`."""
    _, text = parse_config(*args)
    old = "".join(line + "\n" for line in text.splitlines() if line != NEW_FLAG_AT_DEFAULT)
    assert old != text
    return old, text


@contextlib.contextmanager
def _parsed(*args):
    """The flags parsed from `run.py *args` within, restored after."""
    with flagsaver.flagsaver():
        absl_flags.FLAGS.unparse_flags()
        absl_flags.FLAGS(["run.py", *args])
        try:
            yield
        finally:
            absl_flags.FLAGS.unparse_flags()


def _defaults():
    with _parsed():
        return flags.defaults_flagfile()


def test_a_flag_the_stored_run_lacks_is_no_difference_at_its_default():
    old, new = _old_and_new_texts()
    assert flagfile.differences(old, new, defaults_text=_defaults()) == ""
    # Without the defaults, the old comparison: the run would not resume.
    assert flagfile.differences(old, new) == f"stored no --export_onnx, given {NEW_FLAG_AT_DEFAULT}"


def test_a_flag_the_stored_run_lacks_is_a_difference_away_from_its_default():
    old, _ = _old_and_new_texts()
    _, given = parse_config("--export_onnx")
    assert (flagfile.differences(old, given, defaults_text=_defaults())
            == "stored no --export_onnx, given --export_onnx")


def test_a_boolean_set_both_ways_is_named_once():
    _, stored = parse_config()
    _, given = parse_config("--export_tflite")
    assert (flagfile.differences(stored, given, defaults_text=_defaults())
            == "stored --noexport_tflite, given --export_tflite")


def test_no_flag_of_the_tools_starts_with_no():
    """flags.txt writes a false boolean NAME as --noNAME, and
    `flagfile._flag_name` reads the prefix as that negation."""
    with _parsed():
        names = [flag.name for flag in absl_flags.FLAGS.get_flags_for_module(flags.__name__)]
    assert names and not [name for name in names if name.startswith("no")]


def test_an_interrupted_run_from_before_a_flag_existed_resumes(tmp_path):
    old, new = _old_and_new_texts(f"--model_dir={tmp_path}")
    (tmp_path / rundir.FLAGS_FILE).write_text(old)
    with rundir.claim(str(tmp_path), new, overwrite=False, flag_defaults=_defaults()) as state:
        assert state == rundir.RESUME
    with pytest.raises(UsageError, match="holds an unfinished run with other flags"):
        with rundir.claim(str(tmp_path), new, overwrite=False):
            pass


# A flag that changes the head phase, as a later version might add one.
HEAD_FLAG_AT_DEFAULT = "--cutmix=0.0"


def test_find_lr_starts_from_a_head_trained_before_a_flag_existed(tmp_path):
    model_dir = tmp_path / "run"
    _, new = parse_config(f"--model_dir={model_dir}")
    assert HEAD_FLAG_AT_DEFAULT in new.splitlines()
    model_dir.mkdir()
    paths = rundir.RunPaths(str(model_dir))
    with open(paths.flags, "w") as file:
        file.write("".join(line + "\n" for line in new.splitlines()
                           if line != HEAD_FLAG_AT_DEFAULT))
    runstate.Progress(paths.progress).complete_phase("head", 0)
    assert lr_finder_setup.trained_head(paths, "finetune", 1, new, _defaults()) == paths
    with pytest.raises(UsageError, match="head was trained with other flags"):
        lr_finder_setup.trained_head(paths, "finetune", 1, new)


@pytest.mark.parametrize("mode, module, function", [
    ("train", "job", "run_training"), ("find_lr", "modes", "run_find_lr")])
def test_run_py_gives_the_defaults_on(monkeypatch, mode, module, function):
    """The command line is what users resume with: it must pass the defaults on."""
    sys.path.insert(0, REPO_ROOT)
    run = importlib.import_module("run")
    received = {}
    monkeypatch.setattr(getattr(run, module), function,
                        lambda *args, **kwargs: received.update(kwargs))
    with _parsed("--model_dir=unused", f"--mode={mode}"):
        run.main(["run.py"])
    assert HEAD_FLAG_AT_DEFAULT in received["flag_defaults"].splitlines()
