"""The effective configuration of a run, as a plain object, and the definition
of each of its options.

Each field of `Config` is an option, defined once, here: its name, its type,
and as metadata the flag that sets it (kind, default, choices, help text, help
group). So is each field of `ModeOptions`, the options of what the process
does (train, evaluate, ...) rather than of the run. `tl_keras.cli.flags` makes
the absl flags and `to_config` from these fields, and a test checks the
README's flag table against them. Only `tl_keras.cli.flags` reads flags; every
other module takes the values it needs as arguments, so library code never
reads flags.

A field has no default of its own: the flag's default is what a command line
that leaves the flag out gets, and some flags (`--image_size`, `--model_dir`)
default to None, which `tl_keras.cli.flags.to_config` works out into a value.
"""

import dataclasses

from tl_keras.options import OptionGroup
from tl_keras.options import flag_spec

# The choices of two options, here with the rest of their definitions, so that
# this plain-object module imports nothing of the stages (nor TensorFlow);
# tl_keras.training.distribute and tl_keras.outputs.tflite import them from here.
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")
TFLITE_QUANTIZATIONS = ("none", "dynamic", "float16", "int8")


DATA = OptionGroup("Data")
MODEL = OptionGroup("Model")
TRAINING = OptionGroup("Training")
SELF_TRAINING = OptionGroup("Self-training")
RUN = OptionGroup("Run")
MODES = OptionGroup("Modes")


# The fields are in the order `--helpshort` lists them.
@dataclasses.dataclass(frozen=True)
class Config:
    dataset: str = DATA.string(
        "cifar100",
        "TFDS dataset name, e.g. cifar100; or folder:PATH for your own images in "
        "PATH/<class>/* or PATH/<split>/<class>/*.")
    data_dir: str | None = DATA.string(
        None,
        "Where TFDS keeps prepared datasets (default: TFDS's own, ~/tensorflow_datasets). "
        "Point it at a prepared copy to run offline.")
    train_split: str = DATA.string(
        "train", "TFDS split to train on; slices such as train[:50%] work.")
    val_split: str = DATA.string(
        "",
        "Validation split. Empty: the dataset's `validation` split if it has one, else "
        "the last --val_fraction of each part of --train_split, as TFDS slices, the same "
        "examples every run. One that overlaps --train_split is refused.")
    test_split: str = DATA.string("test", "Split read once, by the final evaluation.")
    val_fraction: float = DATA.float(
        0.1,
        "Fraction held out when carving validation from train (and, for a folder "
        "without split folders, test too; stratified by class).")
    classes: tuple = DATA.list(
        [], "Keep only these classes (comma-separated names), renumbered in this order.")
    train_examples_per_class: int | None = DATA.integer(
        None, "Keep this many training images per class, chosen by --seed (few-shot runs).")
    strict_data: bool = DATA.boolean(
        False,
        "Make any unreadable image file, and a split without examples of some class, "
        "an error instead of a note.")
    exclude_files: str | None = DATA.string(
        None,
        "A text file of training images to leave out, one a line: paths for a folder "
        "dataset, indices into the training split for a TFDS one, as --mode=audit writes "
        "them to exclude.txt. Validation and test stay as they are. The run prints how "
        "many it drops and flags.txt records them, so a resume with another list is "
        "refused.")
    augment: str = DATA.enum(
        "none", ["none", "basic", "randaugment"],
        "Training augmentation: basic is a random resized crop and horizontal flip; "
        "randaugment adds Keras' RandAugment. Never applied at evaluation or serving.")
    mixup: float = DATA.float(0.0, "MixUp Beta alpha (e.g. 0.2); 0 is off.")
    cutmix: float = DATA.float(
        0.0, "CutMix Beta alpha (e.g. 1.0); 0 is off. With --mixup, each "
        "batch uses one of the two.")

    backbone: str = MODEL.string(
        "resnet50",
        "Keras Applications model, case-insensitive: resnet50, efficientnetv2s, "
        "convnexttiny, mobilenetv3large, ...")
    weights: str = MODEL.string(
        "imagenet",
        "Backbone weights: imagenet, none (random), or the path of a weights file, "
        "such as a previous run's backbone.weights.h5.")
    image_size: int = MODEL.integer(
        None,
        "Square size the backbone sees (default: its native size, e.g. 224 for "
        "resnet50). Smaller images are resized inside the model; larger folder "
        "images are brought down on the CPU first, as the model would resize them.")
    resize: str = MODEL.enum(
        "stretch", ["stretch", "crop"],
        "How images become square --image_size: stretch resizes as they are; crop "
        "takes the centre square first, keeping the aspect ratio. Training, "
        "evaluation and the exported model all do the same.")
    cut_at: int | None = MODEL.integer(
        None,
        "Build the classifier on the backbone's output at the end of this block, "
        "average-pooled, instead of its last: blocks as --layer_decay finds them, 0 the "
        "stem, negative from the top (-1 is the whole backbone). --mode=probe suggests one.")
    dropout: float = MODEL.float(0.2, "Dropout rate before the head.")

    recipe: str = TRAINING.enum(
        "manual", ["manual", "auto"],
        "manual: the epochs, warmup, augmentation and MixUp are the flags' values. "
        "auto: those not given are chosen from the number of training images, after "
        "BiT's HyperRule; the run prints each choice and why, and flags.txt records "
        "them. A flag given explicitly, on the command line or in a flagfile, wins.")
    batch_size: int = TRAINING.integer(64, "Global batch size, split across all replicas.")
    head_epochs: int = TRAINING.integer(
        3, "Phase 1: epochs training the head on the frozen backbone.")
    head_learning_rate: float = TRAINING.float(1e-3, "Phase 1 learning rate (constant).")
    finetune_epochs: int = TRAINING.integer(
        10, "Phase 2: epochs fine-tuning the unfrozen layers.")
    finetune_learning_rate: float = TRAINING.float(
        1e-4, "Phase 2 peak learning rate, reached after warmup, then cosine decay to 0.")
    warmup_epochs: float = TRAINING.float(
        1.0, "Phase 2 epochs of linear learning-rate warmup; fractions work, e.g. 0.5.")
    lr_scaling: str = TRAINING.enum(
        "none", ["none", "linear"],
        "none: the learning rates apply as given, whatever --batch_size. linear: "
        "they are for a global batch of 256 and scale with --batch_size/256.")
    unfreeze: str = TRAINING.string(
        "all",
        "Phase 2 unfreezes: all; a number N of top backbone layers; or the name of "
        "the first layer to unfreeze. BatchNormalization layers follow --batchnorm.")
    batchnorm: str = TRAINING.enum(
        "frozen", ["frozen", "train"],
        "frozen keeps every BatchNormalization layer in inference mode with the "
        "statistics its weights came with, the right choice for pretrained weights. "
        "train lets the BatchNormalization layers phase 2 unfreezes normalise by "
        "batch statistics and update theirs: the right choice when training a "
        "backbone from scratch (--weights=none).")
    optimizer: str = TRAINING.enum(
        "adamw", ["adamw", "adam", "sgd", "rmsprop"],
        "Optimizer for both phases (sgd uses Nesterov momentum 0.9).")
    weight_decay: float = TRAINING.float(
        0.05, "Decoupled weight decay; biases and normalisation parameters are exempt.")
    label_smoothing: float = TRAINING.float(
        0.1, "Label smoothing of the cross-entropy loss.")
    class_weight: str = TRAINING.enum(
        "none", ["none", "balanced"],
        "none: every training example counts the same. balanced: each class's examples "
        "weigh n_examples / (n_classes * n_examples_of_the_class), as scikit-learn's "
        "balanced, so a rare class counts as much as a common one in the training loss "
        "(both phases; each self-training round recomputes them from what it trains on). "
        "Validation and test metrics stay unweighted.")
    tta: str = TRAINING.enum(
        "none", ["none", "flip"],
        "Test-time augmentation. flip: the test evaluation also reports the figures of "
        "each image's probabilities averaged with its mirror's, and --mode=evaluate and "
        "--mode=predict average so (they take the run's --tta unless given one).")
    # The fine-tuning recipe's controls (issue 16).
    layer_decay: float = TRAINING.float(
        1.0,
        "Layer-wise learning-rate decay F in (0, 1]; 1 is off. Fine-tuning trains the "
        "head at the peak learning rate and each backbone block at F**(its depth from "
        "the top), blocks found from the backbone's graph (residual blocks; stages "
        "of a plain chain such as VGG16).")
    ema: float = TRAINING.float(
        0.0,
        "Exponential moving average of the weights, e.g. 0.999; 0 is off. The average "
        "is what each epoch validates, and what the checkpoints, the test evaluation "
        "and every export hold, in place of the raw weights.")
    early_stopping: int = TRAINING.integer(
        0,
        "End a phase after this many epochs without a better validation top-1; 0 is "
        "off. The run goes on with the next phase, which starts at its planned epoch.")
    export_weights: str = TRAINING.enum(
        "best", ["best", "last"],
        "Which weights the test evaluation and every exported file use: best, the "
        "epoch with the best validation top-1 across both phases; last, the last epoch.")
    cache_features: bool = TRAINING.boolean(
        False,
        "Phase 1: run the frozen backbone once over train and validation and train "
        "the head on those features (much faster; no augmentation in phase 1).")
    steps_per_epoch: int | None = TRAINING.integer(
        None, "Cap on training steps per epoch, for quick runs (default: the whole split).")

    # Self-training on unlabelled images (issue 17): rounds after fine-tuning.
    unlabeled: str | None = SELF_TRAINING.string(
        None,
        "Unlabelled images for self-training: a folder, searched recursively (subfolder "
        "names are never used for training), or tfds:NAME:SPLIT (tfds:NAME:VERSION:SPLIT "
        "names a version). Each round, the model labels them and a student trains on the "
        "labelled images plus the confident ones.")
    self_training_rounds: int | None = SELF_TRAINING.integer(
        None,
        "Self-training rounds after fine-tuning, each a phase of its own (default: 1 "
        "with --unlabeled, else 0).")
    pseudo_label_threshold: float = SELF_TRAINING.float(
        0.5,
        "Keep an unlabelled image only when the model's largest class probability for it "
        "is at least this, in (0, 1).")
    pseudo_labels_per_class: int | None = SELF_TRAINING.integer(
        None,
        "The most pseudo-labelled images kept per class each round, the most confident "
        "first, so that no class takes over (default: 40% of the unlabelled images' "
        "share per class, their number over the number of classes).")
    # 30: in the transfer experiment at 100 labels a class, rounds of 10, 20
    # and 30 epochs gave 80.3%, 81.8% and 82.1% test top-1 (arm (c), the
    # teacher: 77.8%); at 20 labels a class, 10 and 30 epochs gave 76.6% and
    # 78.2% (arm (c): 69.2%). The README's "How the self-training recipe was
    # chosen".
    self_training_epochs: int = SELF_TRAINING.integer(
        30, "Epochs of each self-training round.")
    self_training_learning_rate: float = SELF_TRAINING.float(
        3e-4,
        "Each round's peak learning rate, after --warmup_epochs of warmup (at most half "
        "the round), then cosine decay to 0.")
    self_training_augment: str = SELF_TRAINING.enum(
        "randaugment", ["none", "basic", "randaugment"],
        "The student's augmentation, as --augment: the strong noise self-training needs.")
    self_training_mixup: float = SELF_TRAINING.float(
        0.2, "The student's MixUp Beta alpha; 0 is off.")
    self_training_cutmix: float = SELF_TRAINING.float(
        0.0, "The student's CutMix Beta alpha; 0 is off. With MixUp, each batch uses one.")

    model_dir: str = RUN.string(
        None, "Where the run writes its outputs (default: runs/DATASET-BACKBONE).")
    seed: int = RUN.integer(42, "Seed for weights, shuffling and dropout.")
    mixed_precision: str = RUN.enum(
        "auto", ["auto", "off", "bfloat16", "float16"],
        "Compute dtype. auto: bfloat16 on GPUs of compute capability 8.0+ and TPUs, "
        "float16 with loss scaling on older GPUs, float32 on CPUs.")
    jit_compile: str = RUN.enum(
        "auto", ["auto", "true", "false"],
        "XLA-compile the train step. auto: Keras decides per model and backend.")
    strategy: str = RUN.enum(
        "auto", STRATEGIES,
        "Where training runs. auto: MirroredStrategy over the GPUs if there are any, "
        "else the CPU (under JAX: keras.distribution.DataParallel over the local "
        "devices). The others are tf.distribute strategies: one_device, mirrored, "
        "multi_worker (MultiWorkerMirroredStrategy over the cluster in TF_CONFIG), "
        "tpu (TPUStrategy on --tpu).")
    tpu: str | None = RUN.string(
        None, "--strategy=tpu: the TPU's name, grpc://HOST:PORT, or local on a TPU VM.")
    export_tflite: bool = RUN.boolean(
        False,
        "Also write model.tflite (float32, one --image_size image) and check it "
        "against the SavedModel on test images.")
    tflite_quantization: str = RUN.enum(
        "none", TFLITE_QUANTIZATIONS,
        "--export_tflite: how model.tflite stores its weights. none: float32. dynamic: "
        "int8 weights, float activations. float16: float16 weights. int8: full-integer "
        "post-training quantization calibrated on 200 training images; the input stays "
        "a uint8 image. Needs --export_tflite.")
    tflite_max_drop: float = RUN.float(
        2.0,
        "--export_tflite: the most test top-1 (in percentage points) model.tflite may "
        "lose against the float model before the run warns; the file is kept either way.")
    export_onnx: bool = RUN.boolean(
        False,
        "Also write model.onnx (uint8 images of any batch in, probabilities out; the "
        "class names in its metadata) and check it in ONNX Runtime against the "
        "SavedModel on test images. Needs the onnx extra: pip install -e \".[onnx]\".")
    # The flag is START,END text; the field holds (START, END).
    profile_batches: tuple | None = RUN.string(
        None,
        "START,END: write a profiler trace of these batches of the first phase to "
        "TensorBoard (e.g. 10,20).")


@dataclasses.dataclass(frozen=True)
class ModeOptions:
    """The options of what this process does, not of the training run itself:
    `tl_keras.cli.flags.to_flagfile` leaves them out, so rerunning a run's
    flags.txt trains it.

    Never instantiated: only its fields are read, defined like `Config`'s.
    """
    mode: str = MODES.enum(
        "train", ["train", "evaluate", "predict", "find_lr", "probe", "audit"],
        "train: train, evaluate and export. evaluate: evaluate the finished run in "
        "--model_dir on --split. predict: classify --images with that run's SavedModel, "
        "or with the .tflite file (its labels.txt beside it) or .onnx file --model_dir "
        "names. find_lr: a learning-rate range test of --find_lr_phase, written to "
        "--model_dir/find_lr/; it changes nothing else there. probe: a linear classifier "
        "on the backbone's features at each block's end, its validation top-1 and a "
        "suggested --cut_at, written to --model_dir/probe/; it changes nothing else there. "
        "audit: look for wrong labels, duplicates and validation or test images leaked "
        "into train, in the dataset of the run in --model_dir with its backbone, or "
        "before training with these flags and --weights; written to --model_dir/audit/ "
        "or --output (needs pip install -e \".[audit]\").")
    split: str = MODES.enum(
        "test", ["train", "validation", "test"], "--mode=evaluate: the split.")
    images: str | None = MODES.string(
        None, "--mode=predict: an image file, a folder, or a glob.")
    top_k: int = MODES.integer(5, "--mode=predict: classes shown per image.")
    output: str | None = MODES.string(
        None, "--mode=predict: also write the predictions to this CSV file. "
        "--mode=audit: the folder to write the audit to (default: --model_dir/audit).")
    find_lr_phase: str = MODES.enum(
        "head", ["head", "finetune"],
        "--mode=find_lr: the phase whose learning rate is tested, set up as training "
        "sets it up. finetune starts from the head phase's end weights of the run in "
        "--model_dir when it has them and its flags.txt matches these flags (phase 2's "
        "own options may differ), else from an untrained head.")
    find_lr_steps: int = MODES.integer(
        100, "--mode=find_lr: training steps over which the rate rises from 1e-7 to 1.")
    probe_every: int | None = MODES.integer(
        None,
        "--mode=probe: probe every k-th block, counted from the top (which is always "
        "probed). Default: every block, or about 24 depths of a deeper backbone.")
    explain: bool = MODES.boolean(
        False,
        "--mode=predict: also write each image's Grad-CAM heatmap, for its top class, "
        "over it as a PNG under RUN/explanations/. Needs a run folder, not a .tflite or "
        ".onnx file.")
    overwrite: bool = RUN.boolean(
        False,
        "Train afresh in a --model_dir that holds a complete or unfinished run, "
        "deleting what that run wrote and nothing else. Without it, a complete run is "
        "left alone and an interrupted one resumes. A folder that holds no run is "
        "never written into unless it is empty.")


# The options a run's head phase doesn't depend on: what phase 2 and the
# self-training rounds do, what is evaluated and exported afterwards, and where
# and how the same computation runs. A range test of phase 2 starts from a
# run's head only when every other option matches (`tl_keras.training.lr_finder`), so
# these may differ: the head is still the one these flags' run would train.
NOT_IN_THE_HEAD_PHASE = frozenset({
    "finetune_epochs", "finetune_learning_rate", "warmup_epochs", "unfreeze",
    "layer_decay", "tta", "export_weights",
    *(field.name for field in dataclasses.fields(Config)
      if flag_spec(field).group == SELF_TRAINING.title),
    "model_dir", "jit_compile", "strategy", "tpu", "export_tflite", "tflite_quantization",
    "tflite_max_drop", "export_onnx", "profile_batches",
})
