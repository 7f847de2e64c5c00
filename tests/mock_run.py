"""`python tests/mock_run.py FLAGS...` runs run.py with every TFDS dataset mocked
(64 random examples a split), for tests that need the job in its own process."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow_datasets as tfds  # noqa: E402
from absl import app  # noqa: E402

import run  # noqa: E402
from tl_keras import flags  # noqa: E402

if __name__ == "__main__":
    with tfds.testing.mock_data(num_examples=64):
        app.run(run.main, flags_parser=flags.parse)
