"""Data: where a run's examples come from (a TFDS dataset, a folder, the unlabelled
pool), which of them it uses, and the tf.data pipeline that batches and augments them.

Imports no other stage; only the shared modules (`tl_keras.errors`, ...).
"""
