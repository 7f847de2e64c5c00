"""A run on a messy image folder: photos of many sizes, landscape and
portrait, two of them broken, trained with --augment=basic, --mixup=0.2 and
--resize=crop, and exported as a float32 model.tflite too. conftest's session
fixture `messy_folder_run` trains it once for the tests that read it:
tests/test_run.py (the folder), tests/test_parity.py (crop) and
tests/test_serving.py (model.tflite)."""

import contextlib
import io

import numpy as np
from PIL import Image

from conftest import run_job

CLASS_NAMES = ("cat", "dog")
# The files no decoder reads; the run skips them and names them.
BROKEN_FILES = ("train/cat/broken.jpg", "train/dog/empty.png")


def write_messy_folder(root):
    """Writes `root/{train,test}/{cat,dog}/*.jpg` of random sizes, 20 to 60 px,
    and the two broken files. Returns `folder:root`."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 4)):
        for name in CLASS_NAMES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
                Image.fromarray(rng.integers(0, 256, (*size, 3), np.uint8)).save(
                    folder / f"{index}.jpg")
    (root / BROKEN_FILES[0]).write_bytes(b"\xff\xd8\xff\xe0junk")
    (root / BROKEN_FILES[1]).write_bytes(b"")
    return f"folder:{root}"


def train(tmp_path):
    """The smoke configuration (one head epoch, two fine-tuning epochs) on the
    messy folder, with --export_tflite; (config, metrics, stdout)."""
    dataset = write_messy_folder(tmp_path / "photos")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        config, metrics = run_job(
            tmp_path, f"--dataset={dataset}", "--batch_size=4",
            "--augment=basic", "--mixup=0.2", "--resize=crop", "--export_tflite")
    return config, metrics, printed.getvalue()
