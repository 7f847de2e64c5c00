"""Self-training on unlabelled images (`--unlabeled`): the current model's
labels for the pool (`tl_keras.data.unlabeled`), the confident ones kept per
class, and the batches each round's student trains on.

Each round is a phase of `tl_keras.training.train.train_two_phases` after fine-tuning
(`tl_keras.training.recipe.plan_self_training`); `Rounds` is its `phase_inputs`. At
a round's start the model labels the whole pool, and the kept pseudo-labels
are written to `self_training/round_N.json`, which a rerun that resumes the
round reads instead of labelling again, so it trains on the same ones.

The student starts from the current weights rather than from the backbone's
initial ones: it keeps what the transferred and fine-tuned features learnt
from the labels, repeats neither phase, and, with few labels, a student
started afresh would first have to relearn from noisy pseudo-labels what the
teacher already knows.
"""

import dataclasses
import json
import os
import time

import numpy as np
import tensorflow as tf

from tl_keras.data import pipeline
from tl_keras.errors import UsageError
from tl_keras.model import classifier as classifier_lib
from tl_keras.training import recipe

# --pseudo_labels_per_class's default: this share of the pool's images per
# class, the most confident first. Measured in the transfer experiment at 20
# labels a class, with 24,400 unlabelled images (the README's "How the
# self-training recipe was chosen"): more pseudo-labels, less often right,
# made the better student. 400 a class (20 times the labels, 97% right) gave
# 71.3% test top-1, 1,000 (95%) 72.7%, 2,000 (about 40%; 90%) 73.4% in half
# the epochs. A cap tied to the pool, not to the labels, keeps the same share
# of a pool of any size.
DEFAULT_POOL_SHARE = 0.4


def per_class_cap(pool_size, num_classes, given):
    """`--pseudo_labels_per_class`, or its default: `DEFAULT_POOL_SHARE` of
    the pool's images per class (at least 1)."""
    if given:
        return given
    return max(1, int(np.ceil(DEFAULT_POOL_SHARE * pool_size / num_classes)))


@dataclasses.dataclass(frozen=True)
class PseudoLabels:
    """The kept images of one round: indices into the pool, their pseudo-labels
    and the model's confidence in them (its largest class probability)."""

    indices: np.ndarray
    labels: np.ndarray
    confidences: np.ndarray

    def __len__(self):
        return len(self.indices)


def select_pseudo_labels(probabilities, *, threshold, per_class_cap):
    """Keeps each image whose top class probability is at least `threshold`,
    at most `per_class_cap` per class, the most confident first.

    Args:
        probabilities: float `[images, classes]`.
        threshold: the least top probability kept.
        per_class_cap: the most images kept per predicted class.

    Returns:
        `PseudoLabels`, in pool order.
    """
    probabilities = np.asarray(probabilities)
    confidences = probabilities.max(axis=1)
    labels = probabilities.argmax(axis=1)
    kept = []
    for label in range(probabilities.shape[1]):
        candidates = np.flatnonzero((labels == label) & (confidences >= threshold))
        # Stable: among equal confidences, the earlier image first.
        order = np.argsort(-confidences[candidates], kind="stable")
        kept.append(candidates[order[:per_class_cap]])
    indices = np.sort(np.concatenate(kept)).astype(np.int64)
    return PseudoLabels(indices, labels[indices].astype(np.int64),
                        confidences[indices].astype(np.float64))


def label_pool(model, pool, *, batch_size, image_size, resize, num_classes):
    """The model's class probabilities for every pool image: in float32, in
    inference mode, each image decoded and resized as evaluation does."""
    everything = np.arange(len(pool))
    batches = pipeline.evaluation_batches(
        pool.read(everything, np.zeros(len(pool), np.int64), False),
        num_examples=len(pool), image_shape=pool.image_shape, image_size=image_size,
        num_classes=num_classes, batch_size=batch_size, resize=resize)
    # One predict over all the batches: a pool of tens of thousands of images
    # would spend most of its time in the overhead of one predict per batch.
    images = batches.map(lambda batch_images, _: batch_images)
    return classifier_lib.float32_copy(model).predict(images, verbose=0)


def write_round(path, round_number, pool, kept, *, threshold, cap):
    """Writes a round's pseudo-labels, atomically: (image, label, confidence)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    record = {
        "round": round_number, "unlabeled": pool.source, "pool_images": len(pool),
        "pseudo_label_threshold": threshold, "pseudo_labels_per_class": cap,
        "pseudo_labels": [
            {"image": str(pool.ids[index]), "label": int(label),
             "confidence": round(float(confidence), 6)}
            for index, label, confidence in zip(kept.indices, kept.labels,
                                                kept.confidences)],
    }
    temporary = path + ".tmp"
    with open(temporary, "w") as file:
        json.dump(record, file, indent=1)
    os.replace(temporary, path)


def read_round(path, pool):
    """The pseudo-labels a round's start wrote to `path`, as `PseudoLabels`.

    Raises:
        UsageError: when an image it names is no longer in the pool.
    """
    with open(path) as file:
        entries = json.load(file)["pseudo_labels"]
    index_of = {image: index for index, image in enumerate(pool.ids)}
    missing = [entry["image"] for entry in entries if entry["image"] not in index_of]
    if missing:
        raise UsageError(
            f"{path} names {len(missing)} image(s) no longer in --unlabeled={pool.source}, "
            f"such as {missing[0]}; restore them, or pass --overwrite to start afresh.")
    return PseudoLabels(
        np.array([index_of[entry["image"]] for entry in entries], np.int64),
        np.array([entry["label"] for entry in entries], np.int64),
        np.array([entry["confidence"] for entry in entries], np.float64))


def describe_round(round_number, kept, pool, class_names, cap, threshold):
    """The round's line: what it kept per class and, where the pool has hidden
    labels, how right those pseudo-labels are."""
    counts = np.bincount(kept.labels, minlength=len(class_names))
    line = (f"Self-training round {round_number}: kept {len(kept):,} of {len(pool):,} "
            f"unlabelled images (confidence >= {threshold:g}, at most {cap:,} per "
            f"class): " + ", ".join(f"{name} {count:,}"
                                     for name, count in zip(class_names, counts)) + ".")
    hidden = pool.hidden_labels[kept.indices]
    known = hidden >= 0
    if not known.any():
        return line
    right = hidden == kept.labels
    per_class = []
    for label, name in enumerate(class_names):
        of_class = known & (kept.labels == label)
        per_class.append(f"{name} {right[of_class].mean():.1%}" if of_class.any()
                         else f"{name} -")
    return (line + f"\nPseudo-labels right, by the hidden labels of the pool's class "
            f"subfolders ({int(known.sum()):,} images): {right[known].mean():.1%} "
            f"(" + ", ".join(per_class) + ").")


class Rounds:
    """`phase_inputs` for `tl_keras.training.train.train_two_phases`: a self-training
    round's training batches and steps per epoch (None for other phases).

    Called when a round is about to train, it labels the pool with the
    model's current weights, keeps the confident images and writes them to
    the round's file; or, when the round resumes, reads that file.

    With `--class_weight=balanced`, each round weighs its classes by what it
    trains on, the labelled and the kept images together: the labelled
    counts' weights would no longer average 1 over a round's examples, whose
    class mix the pseudo-labels change.
    """

    def __init__(self, *, model, pool, splits, paths, config):
        self.model = model
        self.pool = pool
        self.splits = splits
        self.paths = paths
        self.config = config
        self.steps = {}

    def __call__(self, phase):
        round_number = recipe.self_training_round(phase.name)
        if round_number is None:
            return None
        config, splits = self.config, self.splits
        cap = per_class_cap(len(self.pool), splits.num_classes,
                            config.pseudo_labels_per_class)
        kept = self._pseudo_labels(round_number, cap)
        print(describe_round(round_number, kept, self.pool, splits.class_names, cap,
                             config.pseudo_label_threshold), flush=True)
        count = splits.sizes["train"] + len(kept)
        steps = recipe.training_steps_per_epoch(count, config.batch_size,
                                                config.steps_per_epoch)
        self.steps[phase.name] = steps
        class_weights = self._class_weights(kept, round_number)
        return self._batches(kept, round_number, class_weights), steps

    def _class_weights(self, kept, round_number):
        """The round's balanced class weights, printed; None without them."""
        if self.config.class_weight != "balanced":
            return None
        class_names = self.splits.class_names
        counts = np.asarray(self.splits.train_class_counts) + np.bincount(
            kept.labels, minlength=len(class_names))
        weights = recipe.balanced_class_weights(counts)
        print(f"Self-training round {round_number}: class weights "
              f"({self.config.class_weight}, over its labelled and pseudo-labelled "
              f"images): {recipe.describe_class_weights(weights, counts, class_names)}.",
              flush=True)
        return weights

    def _pseudo_labels(self, round_number, cap):
        path = self.paths.pseudo_labels(round_number)
        if os.path.exists(path):
            print(f"Self-training round {round_number}: reading the pseudo-labels its "
                  f"start wrote to {path}.", flush=True)
            return read_round(path, self.pool)
        config = self.config
        started = time.perf_counter()
        print(f"Self-training round {round_number}: labelling {len(self.pool):,} "
              f"unlabelled images with the current weights...", flush=True)
        probabilities = label_pool(
            self.model, self.pool, batch_size=config.batch_size,
            image_size=config.image_size, resize=config.resize,
            num_classes=self.splits.num_classes)
        kept = select_pseudo_labels(probabilities, threshold=config.pseudo_label_threshold,
                                    per_class_cap=cap)
        write_round(path, round_number, self.pool, kept,
                    threshold=config.pseudo_label_threshold, cap=cap)
        print(f"Labelled them in {time.perf_counter() - started:.1f} s; the kept "
              f"pseudo-labels are in {path}.", flush=True)
        return kept

    def _batches(self, kept, round_number, class_weights):
        """The labelled and the kept images, interleaved at random, in batches
        augmented as --self_training_augment and its MixUp and CutMix say."""
        config, splits = self.config, self.splits
        pseudo = self.pool.read(kept.indices, kept.labels, True)
        labelled = splits.train
        same_shape = splits.image_shape == self.pool.image_shape
        # Every example once a pass, labelled and pseudo-labelled ones spread
        # over it, where one after the other would outlast a shuffle buffer.
        choice = np.random.default_rng(config.seed + round_number).permutation(
            np.repeat([0, 1], [splits.sizes["train"], len(kept)])).astype(np.int64)
        settings = pipeline.batch_settings(config, splits)
        if not same_shape:
            # One shape for both: the input's, each image resized as the
            # model would resize it.
            labelled, pseudo = (_at_input_size(examples, config.image_size, config.resize)
                                for examples in (labelled, pseudo))
            settings["image_shape"] = (config.image_size, config.image_size, 3)
        examples = tf.data.Dataset.choose_from_datasets(
            [labelled, pseudo], tf.data.Dataset.from_tensor_slices(choice),
        ).apply(
            # Keras restarts a dataset each epoch only when it knows how many
            # batches it holds; choosing between datasets hides that.
            tf.data.experimental.assert_cardinality(len(choice)))
        return pipeline.training_batches(
            examples, num_examples=len(choice), seed=config.seed + round_number,
            repeat=config.steps_per_epoch is not None,
            augment=config.self_training_augment, mixup=config.self_training_mixup,
            cutmix=config.self_training_cutmix, class_weights=class_weights,
            **settings)


def _at_input_size(examples, image_size, resize):
    return examples.map(
        lambda image, label: (tf.ensure_shape(
            pipeline.resize_uint8(image, image_size, resize), [image_size, image_size, 3]),
            label),
        num_parallel_calls=tf.data.AUTOTUNE)
