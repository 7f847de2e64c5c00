"""`python tests/mock_run.py FLAGS...` runs run.py with every TFDS dataset mocked
(64 random examples a split, sliced as TFDS slices), for tests that need the job in its own process.

With MOCK_RUN_STEP_PAUSE=SECONDS in the environment, each training step ends
with that pause, before the run looks for a SIGTERM: a test that kills the run
in a given epoch gets epochs long enough to land in, however quick the model's
steps, and a pause costs the machine no CPU.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402

import run  # noqa: E402  (first: it quiets the libraries before TensorFlow loads)
import sliced_mock  # noqa: E402
from tl_keras.cli import flags  # noqa: E402
from tl_keras.training import resume  # noqa: E402


def _pause_after_each_step(seconds):
    watch = resume.PreemptionWatcher.on_train_batch_end

    def paused(self, batch, logs=None):
        time.sleep(seconds)
        return watch(self, batch, logs)

    resume.PreemptionWatcher.on_train_batch_end = paused


if __name__ == "__main__":
    if os.environ.get("MOCK_RUN_STEP_PAUSE"):
        _pause_after_each_step(float(os.environ["MOCK_RUN_STEP_PAUSE"]))
    with sliced_mock.mock_data(num_examples=64):
        app.run(run.main, flags_parser=flags.parse)
