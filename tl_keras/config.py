"""The effective configuration of a run, as a plain object.

Only `tl_keras.flags` builds it from the command line; every other module takes
the values it needs as arguments, so library code never reads flags.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Config:
    # Data.
    dataset: str
    data_dir: str | None
    train_split: str
    val_split: str
    test_split: str
    val_fraction: float
    classes: tuple
    train_examples_per_class: int | None
    strict_data: bool
    augment: str
    mixup: float
    cutmix: float
    # Model.
    backbone: str
    weights: str
    image_size: int
    dropout: float
    resize: str
    # Training.
    batch_size: int
    head_epochs: int
    head_learning_rate: float
    finetune_epochs: int
    finetune_learning_rate: float
    unfreeze: str
    batchnorm: str
    optimizer: str
    weight_decay: float
    warmup_epochs: float
    label_smoothing: float
    lr_scaling: str
    export_weights: str
    # Runtime.
    mixed_precision: str
    jit_compile: str
    strategy: str
    tpu: str | None
    model_dir: str
    seed: int
    steps_per_epoch: int | None
    profile_batches: tuple | None
    export_tflite: bool
    cache_features: bool
