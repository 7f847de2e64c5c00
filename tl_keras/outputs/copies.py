"""Copies among a dataset's images, for `--mode=audit`: the same decoded pixels
(exact), or nearly the same picture (near); between train and a held-out split
(leaks) and within train (duplicates). Also the training images far from all
others in the backbone's feature space (outliers).

Near copies are neighbours among thumbnails of the images' own pixels, not
among the backbone's features: on CIFAR-10 (docs/audit.md), re-encoded and
resized copies lay among distinct images' nearest neighbours in the features
of the transfer experiment's source backbone, and clear of them in thumbnails.

Neighbours are found a block of rows at a time, so memory grows with the block
times the split, never with the square of the split: for CIFAR-10's 50,000
training images, a block of 512 rows against all of them takes 100 MB.
"""

import dataclasses
import hashlib

import numpy as np

_BLOCK_ROWS = 512
# Neighbours per training image whose mean distance makes the outlier score,
# as cleanlab's Datalab takes them.
OUTLIER_NEIGHBOURS = 10
# Datalab's rule for outliers from features: a mean distance above
# Q3 + (1 / 0.37037 - 1) * IQR of all of them.
_OUTLIER_IQR_SCALE = 1 / 0.37037 - 1
# The near-copy threshold lies halfway, on a log scale, between the distance
# below which this share of the measured near copies fall...
_COPY_QUANTILE = 0.99
# ...and the distance below which this share of distinct training images have
# their nearest other; at the latter when the two overlap. On CIFAR-10
# (docs/audit.md) the measured copies' synthetic distortion was milder than
# the planted copies' (which lay up to 2.7 times farther), and distinct
# images lay 20 times farther: the log midpoint left room on both sides.
_DISTINCT_QUANTILE = 0.01


def pixel_digests(images):
    """A digest of each uint8 image's decoded pixels and shape: equal for
    equal pixels, whatever the file's name or format."""
    images = np.asarray(images)
    return [hashlib.blake2b(repr(image.shape).encode() + image.tobytes(),
                            digest_size=16).digest() for image in images]


# Thumbnails are this many pixels a side (fewer for smaller images), in colour.
THUMBNAIL_SIDE = 16


def thumbnails(images):
    """Each uint8 image's thumbnail, the mean of each cell of a
    `THUMBNAIL_SIDE`-square grid, less the thumbnail's own mean (so that a
    copy made brighter stays close): float32 `[count, cells * 3]`."""
    images = np.asarray(images, np.float32)
    height, width = images.shape[1:3]
    rows = np.linspace(0, height, min(THUMBNAIL_SIDE, height) + 1).astype(int)
    columns = np.linspace(0, width, min(THUMBNAIL_SIDE, width) + 1).astype(int)
    sums = np.add.reduceat(np.add.reduceat(images, rows[:-1], axis=1), columns[:-1], axis=2)
    cells = np.diff(rows)[:, None, None] * np.diff(columns)[None, :, None]
    flat = (sums / cells).reshape(len(images), -1)
    return flat - flat.mean(axis=1, keepdims=True)


def unit_rows(features):
    """`features` as float32 rows of length 1, whose dot products are cosine
    similarities."""
    rows = np.asarray(features, np.float32)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def nearest(queries, references, k, skip_same_row=False):
    """Each query row's `k` nearest reference rows by cosine distance.

    Args:
        queries, references: from `unit_rows`.
        k: neighbours per query (at most the number of references).
        skip_same_row: the queries are the references: a row is not its own
            neighbour.

    Returns:
        (int `[queries, k]` reference indices, float `[queries, k]` cosine
        distances), nearest first.
    """
    k = min(k, len(references) - int(skip_same_row))
    indices = np.zeros((len(queries), max(k, 0)), np.int64)
    distances = np.zeros((len(queries), max(k, 0)), np.float32)
    if k <= 0:
        return indices, distances
    for start in range(0, len(queries), _BLOCK_ROWS):
        similarity = queries[start:start + _BLOCK_ROWS] @ references.T
        if skip_same_row:
            rows = np.arange(len(similarity))
            similarity[rows, start + rows] = -np.inf
        top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        top_similarity = np.take_along_axis(similarity, top, axis=1)
        order = np.argsort(-top_similarity, axis=1)
        indices[start:start + len(top)] = np.take_along_axis(top, order, axis=1)
        distances[start:start + len(top)] = np.maximum(
            0, 1 - np.take_along_axis(top_similarity, order, axis=1))
    return indices, distances


@dataclasses.dataclass(frozen=True)
class Threshold:
    """The near-copy threshold and what it was measured on, in thumbnails.

    Attributes:
        distance: pairs closer than this (cosine distance between
            thumbnails) are near copies.
        copies: the distance below which `_COPY_QUANTILE` of the measured
            near copies (`tl_keras.data.augment.near_copies`) fall.
        distinct: the distance below which `_DISTINCT_QUANTILE` of distinct
            training images have their nearest other training image.
        measured: how many near copies were measured.
    """

    distance: float
    copies: float
    distinct: float
    measured: int

    def describe(self):
        overlap = ("; here near copies and distinct images overlap, so some near "
                   "copies will be missed" if self.copies >= self.distinct else "")
        return (f"Near copies: thumbnails within cosine distance {self.distance:.4f}, "
                f"between the {self.copies:.4f} that {_COPY_QUANTILE:.0%} of "
                f"{self.measured} re-encoded, resized copies of training images were "
                f"within of theirs and the {self.distinct:.4f} within which "
                f"{_DISTINCT_QUANTILE:.0%} of training images have their nearest other"
                f"{overlap}.")


def near_copy_threshold(copy_distances, nearest_distinct):
    """The threshold, from the distances of measured near copies to their
    originals and of each training image to its nearest distinct other."""
    copies = float(np.quantile(copy_distances, _COPY_QUANTILE))
    distinct = (float(np.quantile(nearest_distinct, _DISTINCT_QUANTILE))
                if len(nearest_distinct) else np.inf)
    if copies >= distinct:
        distance = distinct
    else:
        distance = float(np.sqrt(max(copies, 1e-6) * distinct)) if np.isfinite(distinct) \
            else 2 * copies
    return Threshold(distance=distance, copies=copies, distinct=distinct,
                     measured=len(copy_distances))


@dataclasses.dataclass(frozen=True)
class Pair:
    """Two images that are copies: `kind` `exact` or `near`; `first` and
    `second` their positions in their splits; `distance` their cosine
    distance (0 for an exact pair)."""

    kind: str
    first: int
    second: int
    distance: float


def leaks(train_digests, held_out_digests, nearest_train, threshold):
    """The held-out images that are copies of training images.

    Args:
        train_digests, held_out_digests: from `pixel_digests`.
        nearest_train: (indices, distances) of each held-out image's nearest
            training image, from `nearest`.
        threshold: the near-copy distance.

    Returns:
        `Pair`s of (held-out position, training position), exact ones first:
        every training image with the same pixels, else the nearest one when
        it is within the threshold.
    """
    by_digest = _positions_by_digest(train_digests)
    exact, near = [], []
    for position, digest in enumerate(held_out_digests):
        same = by_digest.get(digest, ())
        exact += [Pair("exact", position, train, 0.0) for train in same]
        index, distance = nearest_train[0][position, 0], nearest_train[1][position, 0]
        if not same and distance < threshold:
            near.append(Pair("near", position, int(index), float(distance)))
    return exact + sorted(near, key=lambda pair: pair.distance)


def duplicates(train_digests, nearest_other, threshold):
    """Pairs of training images that are copies of each other, each pair
    once, the earlier image first: exact ones first, then each image's
    nearest other within the threshold."""
    exact, near, seen = [], [], set()
    for positions in _positions_by_digest(train_digests).values():
        exact += [Pair("exact", positions[0], other, 0.0) for other in positions[1:]]
        seen.update((positions[0], other) for other in positions[1:])
    digests = np.asarray(train_digests, dtype=object)
    for position, (index, distance) in enumerate(zip(nearest_other[0][:, :1].ravel(),
                                                     nearest_other[1][:, :1].ravel())):
        pair = (min(position, int(index)), max(position, int(index)))
        if (distance < threshold and pair not in seen
                and digests[pair[0]] != digests[pair[1]]):
            seen.add(pair)
            near.append(Pair("near", *pair, float(distance)))
    return exact + sorted(near, key=lambda pair: pair.distance)


def nearest_distinct(train_digests, nearest_other):
    """Each training image's distance to its nearest other training image
    of other pixels (those with an exact copy left out)."""
    counts = {}
    for digest in train_digests:
        counts[digest] = counts.get(digest, 0) + 1
    unique = np.array([counts[digest] == 1 for digest in train_digests], bool)
    return nearest_other[1][unique, :1].ravel()


def outliers(nearest_other):
    """Training images far from all others, by cleanlab Datalab's rule for
    features: the mean distance to their nearest `OUTLIER_NEIGHBOURS` (in the
    backbone's features) above Q3 + 1.7 IQR of all such means.

    Returns:
        (positions, farthest first; their mean distances).
    """
    if not nearest_other[1].size:
        return np.zeros(0, np.int64), np.zeros(0)
    mean = nearest_other[1].mean(axis=1)
    first, third = np.quantile(mean, [0.25, 0.75])
    flagged = np.flatnonzero(mean > third + _OUTLIER_IQR_SCALE * (third - first))
    flagged = flagged[np.argsort(-mean[flagged])]
    return flagged, mean[flagged]


def _positions_by_digest(digests):
    by_digest = {}
    for position, digest in enumerate(digests):
        by_digest.setdefault(digest, []).append(position)
    return by_digest
