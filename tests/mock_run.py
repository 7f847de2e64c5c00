"""`python tests/mock_run.py FLAGS...` runs run.py with every TFDS dataset mocked
(64 random examples a split, sliced as TFDS slices), for tests that need the job in its own process."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402

import run  # noqa: E402  (first: it quiets the libraries before TensorFlow loads)
import sliced_mock  # noqa: E402
from tl_keras.cli import flags  # noqa: E402

if __name__ == "__main__":
    with sliced_mock.mock_data(num_examples=64):
        app.run(run.main, flags_parser=flags.parse)
