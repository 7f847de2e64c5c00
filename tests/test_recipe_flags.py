"""The fine-tuning controls' flags: checked when parsed, and written to
flags.txt, so that a rerun resumes only with the same ones."""

import pytest
from absl import flags as absl_flags

from conftest import parse_config
from tl_keras import rundir
from tl_keras.errors import UsageError


@pytest.mark.parametrize("flag, expected", [
    ("--layer_decay=0", r"must be in \(0, 1\], e.g. 0.75"),
    ("--layer_decay=1.5", r"must be in \(0, 1\], e.g. 0.75"),
    ("--ema=1", r"must be in \[0, 1\), e.g. 0.999"),
    ("--ema=-0.1", r"must be in \[0, 1\), e.g. 0.999"),
    ("--early_stopping=-1", r"must be 0 \(off\) or a number of epochs"),
])
def test_a_bad_value_is_refused_with_the_fix(flag, expected):
    with pytest.raises(absl_flags.Error, match=expected):
        parse_config(flag)


@pytest.mark.parametrize("flag, field, value", [
    ("--layer_decay=0.75", "layer_decay", 0.75),
    ("--ema=0.999", "ema", 0.999),
    ("--early_stopping=3", "early_stopping", 3),
])
def test_each_reaches_flags_txt_and_a_resume_needs_the_same(tmp_path, flag, field, value):
    config, flagfile_text = parse_config(flag)
    assert getattr(config, field) == value
    assert flag in flagfile_text.splitlines()

    # An unfinished run with the flag: rerun without it, it is refused.
    (tmp_path / rundir.FLAGS_FILE).write_text(flagfile_text)
    _, without = parse_config()
    with pytest.raises(UsageError, match=f"stored {flag}"):
        with rundir.claim(str(tmp_path), without, overwrite=False):
            pass
