"""`--mode=audit`: copies across splits, label issues, and `--exclude_files`
closing the loop, on small generated images."""

import ast
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from conftest import TEST_BACKBONE, parse_config
from tl_keras import rundir
from tl_keras.cli import audit
from tl_keras.data import folder
from tl_keras.errors import UsageError
from tl_keras.outputs import copies
from tl_keras.outputs import label_issues

# Three classes, each a tint of random smooth patterns: a random backbone's
# features tell both the classes and the images apart.
TINTS = {"red": (1.0, 0.3, 0.3), "green": (0.3, 1.0, 0.3), "blue": (0.3, 0.3, 1.0)}
COUNTS = {"train": 30, "val": 5, "test": 8}


def _pattern(rng, tint):
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4), np.uint8))
    pattern = np.asarray(coarse.resize((32, 32), Image.BICUBIC), np.float32)
    pixels = pattern[..., None] * np.array(tint) + rng.normal(0, 8, (32, 32, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write_dataset(root):
    """`root/{train,val,test}/<tint>/*.png`."""
    rng = np.random.default_rng(0)
    for split, count in COUNTS.items():
        for name, tint in TINTS.items():
            for index in range(count):
                path = root / split / name / f"{split}_{name}_{index}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                _pattern(rng, tint).save(path)


def _audit(tmp_path, root, *flags):
    config, flagfile_text = parse_config(
        TEST_BACKBONE, f"--dataset=folder:{root}", "--weights=none", "--image_size=32",
        f"--model_dir={tmp_path / 'run'}", *flags)
    return audit.run_audit(config, from_run=False, output=str(tmp_path / "audit"),
                           flagfile_text=flagfile_text)


def _pairs(findings, split):
    names = findings.names
    return {(pair.kind, os.path.basename(names[split][pair.first]),
             os.path.basename(names["train"][pair.second]))
            for pair in findings.leaks[split]}


def test_planted_copies_are_found_and_nothing_else(tmp_path, capsys):
    root = tmp_path / "data"
    _write_dataset(root)
    # An exact copy in another format and name; a near copy re-encoded and resized.
    with Image.open(root / "train" / "red" / "train_red_3.png") as image:
        image.save(root / "val" / "red" / "copy.bmp")
    with Image.open(root / "train" / "green" / "train_green_7.png") as image:
        image.resize((28, 28), Image.BILINEAR).save(root / "test" / "green" / "near.jpg",
                                                   quality=60)
    (root / "train" / "blue" / "broken.png").write_bytes(b"not an image")

    findings = _audit(tmp_path, root)

    assert _pairs(findings, "validation") == {("exact", "copy.bmp", "train_red_3.png")}
    assert _pairs(findings, "test") == {("near", "near.jpg", "train_green_7.png")}
    assert findings.duplicates == []
    assert len(findings.label_issues.positions) == 0
    printed = capsys.readouterr().out
    assert "broken.png" in printed
    assert not any("broken" in name for name in findings.names["train"])
    excluded = (tmp_path / "audit" / "exclude.txt").read_text().splitlines()
    assert sorted(line for line in excluded if not line.startswith("#")) == [
        str(root / "train" / "green" / "train_green_7.png"),
        str(root / "train" / "red" / "train_red_3.png")]
    for written in ("leaks.csv", "leaks.png", "label_issues.csv", "duplicates.csv"):
        assert (tmp_path / "audit" / written).is_file()


def _clusters(rng, counts, separation=6.0, dimensions=16):
    """Generated features: a cluster per class, its labels."""
    labels = np.repeat(np.arange(len(counts)), counts)
    means = separation * np.eye(dimensions)[:len(counts)]
    return rng.normal(size=(len(labels), dimensions)) + means[labels], labels


def test_a_mislabelled_cluster_ranks_at_the_top():
    rng = np.random.default_rng(0)
    features, labels = _clusters(rng, [60, 60, 60], separation=8.0)
    # Images of class 0's cluster, all filed under class 1.
    planted = rng.choice(60, 8, replace=False)
    labels[planted] = 1

    issues = label_issues.find(features, labels, num_classes=3, seed=0)

    # What cleanlab's cut-off keeps is the planted images, at least half of
    # them, worst label first, each suggested back to class 0.
    assert set(issues.positions) <= set(planted)
    assert len(issues.positions) >= len(planted) / 2
    assert np.all(np.diff(issues.quality) >= 0)
    assert list(issues.suggested) == [0] * len(issues.positions)


def test_a_class_too_small_to_cross_validate_is_named_and_skipped():
    features, labels = _clusters(np.random.default_rng(0), [20, 20, 3])
    # Class 2's images look like class 0's: audited, they would be flagged.
    features[labels == 2] = features[labels == 0][:3]

    issues = label_issues.find(features, labels, num_classes=3, seed=0)

    assert issues.skipped_classes == (2,)
    assert not np.isin(issues.positions, np.flatnonzero(labels == 2)).any()


def test_neighbours_found_in_blocks_match_the_whole_matrix(monkeypatch):
    monkeypatch.setattr(copies, "_BLOCK_ROWS", 7)
    rows = copies.unit_rows(np.random.default_rng(0).normal(size=(30, 5)))

    indices, distances = copies.nearest(rows, rows, k=3, skip_same_row=True)

    whole = 1 - rows @ rows.T
    np.fill_diagonal(whole, np.inf)
    np.testing.assert_array_equal(indices, np.argsort(whole, axis=1)[:, :3])
    np.testing.assert_allclose(distances, np.sort(whole, axis=1)[:, :3], atol=1e-6)


def _load(root, exclude_files=None):
    return folder.load_folder(
        f"folder:{root}", image_size=32, resize="stretch", val_fraction=0.2, seed=0,
        strict=False, classes=(), train_examples_per_class=None,
        exclude_files=exclude_files)


def test_exclude_files_leaves_out_exactly_the_listed_files(tmp_path, capsys):
    root = tmp_path / "data"
    _write_dataset(root)
    before = _load(root)
    listed = [str(path) for path in before.files["train"][[0, 5, 17]]]
    exclude = tmp_path / "exclude.txt"
    exclude.write_text("# flagged\n" + "\n".join(listed) + "\n\n")

    after = _load(root, exclude_files=str(exclude))

    assert sorted(after.files["train"]) == sorted(set(before.files["train"]) - set(listed))
    assert after.sizes["train"] == before.sizes["train"] - 3
    for split in ("validation", "test"):
        assert list(after.files[split]) == list(before.files[split])
    assert "Leaving out 3 training image(s)" in capsys.readouterr().out


@pytest.mark.parametrize("entry, problem", [
    ("data/train/red/nowhere.png", "aren't images of the dataset"),
    ("data/test/red/test_red_0.png", "a test image"),
])
def test_exclude_files_refuses_a_file_not_among_the_training_images(tmp_path, entry,
                                                                     problem):
    _write_dataset(tmp_path / "data")
    exclude = tmp_path / "exclude.txt"
    exclude.write_text(str(tmp_path / entry) + "\n")

    with pytest.raises(UsageError, match=problem) as refused:
        _load(tmp_path / "data", exclude_files=str(exclude))
    assert os.path.basename(entry) in str(refused.value)


@pytest.mark.parametrize("selection", [
    {}, {"classes": ("3", "5", "7"), "train_examples_per_class": 3}])
def test_exclude_files_leaves_out_tfds_examples_by_index(mock_tfds, tmp_path, selection):
    from tl_keras.data import tfds_dataset

    def load(exclude_files=None, **options):
        return tfds_dataset.load_tfds("cifar10", None, "train", "", "test", 0.25,
                                      exclude_files=exclude_files, **options)

    whole = [image for image, _ in load().train.as_numpy_iterator()]
    exclude = tmp_path / "exclude.txt"
    exclude.write_text("3\n0\n")

    after = load(str(exclude), **selection)

    # Each example kept is the one at its index in the training split, and
    # the listed ones are gone.
    kept = [image for image, _ in after.train.as_numpy_iterator()]
    assert after.sizes["train"] == len(kept) == len(after.indices["train"])
    np.testing.assert_array_equal(kept, [whole[i] for i in after.indices["train"]])
    assert not {0, 3} & set(after.indices["train"])
    if not selection:
        assert list(after.indices["train"]) == [1, 2, *range(4, len(whole))]


def test_a_resume_with_another_exclude_list_is_refused(tmp_path):
    exclude = tmp_path / "exclude.txt"
    exclude.write_text("a.png\nb.png\n")
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    _, flagfile_text = parse_config(f"--exclude_files={exclude}", f"--model_dir={model_dir}")
    (model_dir / rundir.FLAGS_FILE).write_text(flagfile_text)
    with rundir.claim(str(model_dir), flagfile_text, overwrite=False) as state:
        assert state == rundir.RESUME

    exclude.write_text("a.png\nc.png\n")  # The same file, another list.
    _, edited_text = parse_config(f"--exclude_files={exclude}", f"--model_dir={model_dir}")
    with pytest.raises(UsageError, match="excluded training examples"):
        with rundir.claim(str(model_dir), edited_text, overwrite=False):
            pass


def test_a_run_folder_without_its_backbone_is_refused(tmp_path):
    config, flagfile_text = parse_config(f"--model_dir={tmp_path}")
    (tmp_path / rundir.FLAGS_FILE).write_text(flagfile_text)

    with pytest.raises(UsageError, match=f"holds a run but no {rundir.BACKBONE_WEIGHTS_FILE}"):
        audit.run_audit(config, from_run=True)
    assert not (tmp_path / rundir.AUDIT_DIR).exists()


def test_without_cleanlab_the_audit_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "cleanlab", None)

    with pytest.raises(UsageError, match=r'pip install -e "\.\[audit\]"'):
        label_issues.require_cleanlab()


def test_only_the_audit_imports_cleanlab_and_only_when_it_runs():
    package = pathlib.Path(__file__).resolve().parents[1] / "tl_keras"
    importers = set()
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text())
        top_level = set(tree.body)
        for node in ast.walk(tree):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(name.split(".")[0] in ("cleanlab", "sklearn") for name in names):
                assert node not in top_level, f"{path.name} imports {names} at import time"
                importers.add(path.name)
    assert importers == {"label_issues.py"}


def test_a_tfds_dataset_is_audited_by_index(mock_tfds, tmp_path):
    config, flagfile_text = parse_config(
        TEST_BACKBONE, "--dataset=cifar10", "--weights=none", "--image_size=32",
        f"--model_dir={tmp_path / 'run'}")

    findings = audit.run_audit(config, from_run=False, flagfile_text=flagfile_text)

    # The mock's 64 training examples, less the last 10% carved for validation.
    assert findings.names["train"] == [str(index) for index in range(58)]
    assert findings.names["test"] == [str(index) for index in range(64)]
    written = tmp_path / "run" / rundir.AUDIT_DIR
    assert (written / "exclude.txt").is_file() and (written / "flags.txt").is_file()
