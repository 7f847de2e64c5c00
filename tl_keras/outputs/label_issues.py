"""Training images whose label looks wrong, for `--mode=audit`.

A linear classifier (logistic regression on the standardised features) gives
each training image class probabilities by K-fold cross-validation, from a
model that never saw that image's label; cleanlab's confident learning
(Northcutt et al., JAIR 2021) then finds and ranks the likely errors from
them. cleanlab (with scikit-learn) is the `audit` extra: only this module
imports it, and only when an audit runs.
"""

import dataclasses

import numpy as np

from tl_keras.errors import UsageError

FOLDS = 5
# The logistic regression's inverse regularisation strength (scikit-learn's C).
# On the CIFAR-10 audit's features (docs/audit.md), 0.01 agreed with the given
# labels more often out of sample than 0.1 and 1 (56.5% against 56.8% and
# 54.6% on the source backbone's, 67.8% against 67.0% and 63.5% on the
# fine-tuned one's), and fitted four to five times faster than 1.
INVERSE_REGULARISATION = 0.01
INSTALL_HINT = 'pip install -e ".[audit]"'


def require_cleanlab():
    """Raises `UsageError`, saying how to install it, when cleanlab is missing."""
    try:
        import cleanlab  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as error:
        raise UsageError(
            f"--mode=audit ranks label issues with cleanlab, which isn't installed "
            f"({error}). Install the audit extra: {INSTALL_HINT} (or pip install "
            f"\"cleanlab>=2.9\").") from None


@dataclasses.dataclass(frozen=True)
class LabelIssues:
    """The likely label errors among the training images.

    Attributes:
        positions: their positions in the training split, most likely first.
        quality: each one's label quality score (cleanlab's self-confidence:
            the probability of its given label), low is worse.
        suggested: each one's suggested label, the most probable one.
        suggested_probability: that label's probability.
        skipped_classes: labels with fewer than `FOLDS` training images,
            which cross-validation can't judge: their images are left out.
        agreement: the share of the audited images whose most probable
            class, out of sample, is their given label: how well the
            features separate the classes.
    """

    positions: np.ndarray
    quality: np.ndarray
    suggested: np.ndarray
    suggested_probability: np.ndarray
    skipped_classes: tuple
    agreement: float = float("nan")


def find(features, labels, num_classes, seed):
    """Finds the likely label errors among the training images.

    Args:
        features: float `[examples, dimensions]`, the backbone's features.
        labels: int `[examples]`, the given labels.
        num_classes: the number of classes.
        seed: for the folds.

    Returns:
        `LabelIssues`.
    """
    from cleanlab import filter as cleanlab_filter
    from cleanlab import rank

    counts = np.bincount(labels, minlength=num_classes)
    skipped = tuple(int(label) for label in np.flatnonzero((counts > 0) & (counts < FOLDS)))
    audited_classes = np.flatnonzero(counts >= FOLDS)
    audited = np.flatnonzero(np.isin(labels, audited_classes))
    if len(audited_classes) < 2:
        empty = np.zeros(0, np.int64)
        return LabelIssues(empty, np.zeros(0), empty, np.zeros(0), skipped)
    # Renumbered 0..m-1: cleanlab and the folds see only the audited classes.
    renumbered = np.searchsorted(audited_classes, labels[audited])
    probabilities = out_of_sample_probabilities(features[audited], renumbered, seed)
    ranked = cleanlab_filter.find_label_issues(
        renumbered, probabilities, return_indices_ranked_by="self_confidence", n_jobs=1)
    quality = rank.get_label_quality_scores(renumbered, probabilities)
    best = probabilities[ranked].argmax(axis=1)
    return LabelIssues(
        positions=audited[ranked],
        quality=quality[ranked],
        suggested=audited_classes[best],
        suggested_probability=probabilities[ranked, best],
        skipped_classes=skipped,
        agreement=float(np.mean(probabilities.argmax(axis=1) == renumbered)),
    )


def out_of_sample_probabilities(features, labels, seed, folds=FOLDS):
    """Each example's class probabilities from a logistic regression trained
    on the other folds (stratified), never on its own label.

    Args:
        features: float `[examples, dimensions]`.
        labels: int `[examples]`, 0 to classes - 1, each class at least
            `folds` times.
        seed: shuffles the folds.

    Returns:
        float `[examples, classes]`.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    num_classes = int(labels.max()) + 1
    probabilities = np.zeros((len(labels), num_classes))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fitted_on, held_out in splitter.split(features, labels):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=INVERSE_REGULARISATION, max_iter=1000))
        model.fit(features[fitted_on], labels[fitted_on])
        # A class every fold holds, so each model's classes are all of them.
        probabilities[held_out] = model.predict_proba(features[held_out])
    return probabilities


def imbalanced_classes(counts):
    """Labels rarer than cleanlab Datalab's class-imbalance rule allows: fewer
    than a tenth of the images an even share would give them."""
    counts = np.asarray(counts)
    share = counts / max(counts.sum(), 1)
    return tuple(int(label) for label in np.flatnonzero(share < 0.1 / len(counts)))
