"""Images per second the input pipeline delivers, against two baselines measured
in the same run.

    python benchmarks/input_pipeline.py --data=../shared/data/cifar10-jpg --image_size=224

(a) naive: decode and resize to --image_size per example, float32, no prefetch
    (the seed example's pipeline), one image at a time: tf.data's automatic
    map parallelisation, on by default, would otherwise spread it over the
    cores, so (a') times the same pipeline with it left on;
(b) the project's training pipeline at --image_size with --augment=basic, as
    run.py builds it: uint8 batches, of images brought down to --image_size on
    the CPU when they are larger, else at the size they are stored at, since the
    model resizes on the accelerator;
(c) the ceiling: read and decode in parallel, nothing else.

Prints each figure, then first_epoch_speedup_vs_naive=X (against (a)),
first_epoch_speedup_vs_parallel_naive=X (against (a')), ratio_to_ceiling=X
and, last, speedup_vs_naive=X, the last two for (b)'s later epochs, the steady
state of a multi-epoch run. Each figure times --images images, cycling through
the folder (or through epochs) when it holds fewer; (b)'s first epoch is one
whole pass over the training split.
"""

import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tl_keras import console  # noqa: E402

# Before TensorFlow loads, as in run.py: library chatter off unless --verbosity.
console.quiet_startup(sys.argv)

import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from tl_keras.data import folder, image_io, pipeline  # noqa: E402

_DATA = flags.DEFINE_string("data", None, "Image folder, e.g. ../shared/data/cifar10-jpg.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "The model's input size.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Batch size.")
_IMAGES = flags.DEFINE_integer("images", 20_000, "Images timed per pipeline.")
flags.mark_flag_as_required("data")


def _images_per_second(batches, num_images, batch_size, warm_up=True):
    """Times `num_images` worth of batches.

    With `warm_up`, the first batch (graph building, filling the shuffle
    buffer) is taken before the clock starts.
    """
    start = time.perf_counter()
    iterator = iter(batches.repeat())
    if warm_up:
        next(iterator)
        start = time.perf_counter()
    steps = num_images // batch_size
    for _ in range(steps):
        next(iterator)
    elapsed = time.perf_counter() - start
    # A parallel map keeps decoding ahead into its buffer; free it now, so
    # that it doesn't take the cores from the next figure's clock.
    del iterator
    gc.collect()
    return steps * batch_size / elapsed


def _first_epoch_images_per_second(batches):
    """Times one whole pass, to its end, so that the pipeline's cache completes.

    Returns images per second and the cores kept busy on average (process CPU
    time over wall time), which tells a pass that decoded on one core from one
    that used them all.
    """
    # Made before the clock starts, as the baselines' first batch is taken
    # before theirs: making it optimises and instantiates the dataset's graph,
    # a fixed cost of a few tenths of a second on one core that would weigh on a
    # folder of a hundred images and not on one of thousands.
    made = time.perf_counter()
    iterator = iter(batches)
    start, cpu = time.perf_counter(), time.process_time()
    images = sum(int(tf.shape(images)[0]) for images, _ in iterator)
    elapsed = time.perf_counter() - start
    return images / elapsed, (time.process_time() - cpu) / elapsed, start - made


def _image_paths(root):
    return sorted(
        os.path.join(directory, name)
        for directory, _, names in os.walk(root)
        for name in names
        if os.path.splitext(name)[1].lower() in image_io.IMAGE_EXTENSIONS
    )


def _naive(paths, labels, image_size, batch_size, serial):
    def load(path, label):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return tf.image.resize(image, (image_size, image_size)), label

    batches = tf.data.Dataset.from_tensor_slices((paths, labels)).map(load).batch(batch_size)
    options = tf.data.Options()
    # Left on, tf.data runs this stateless map in parallel behind the code's back.
    options.experimental_optimization.map_parallelization = not serial
    return batches.with_options(options)


def _decode_only(paths, batch_size):
    def load(path):
        return image_io.decode_image(tf.io.read_file(path))

    return (
        tf.data.Dataset.from_tensor_slices(paths)
        .map(load, num_parallel_calls=tf.data.AUTOTUNE)
        .ragged_batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )


def main(argv):
    del argv
    start = time.perf_counter()
    splits = folder.load_folder(
        f"folder:{_DATA.value}", image_size=_IMAGE_SIZE.value, resize="stretch",
        val_fraction=0.1, seed=0, strict=False, classes=(), train_examples_per_class=None,
    )
    print(f"listing and checking {sum(splits.sizes.values()):,} files: "
          f"{time.perf_counter() - start:.1f} s")
    batch, count = _BATCH_SIZE.value, _IMAGES.value
    if splits.sizes["train"] < batch:
        raise app.UsageError(
            f"The training split of {_DATA.value} holds {splits.sizes['train']} images, "
            f"fewer than one batch; pass --batch_size={splits.sizes['train']} or less."
        )
    if count > splits.sizes["train"]:
        print(f"--images={count:,} is more than the {splits.sizes['train']:,} training "
              f"images: each figure cycles through them.")
    # The baselines read the first images in listing order (class by class).
    paths = _image_paths(_DATA.value)[: count + batch]
    labels = tf.zeros([len(paths)], tf.int64)
    paths = tf.constant(paths)

    naive = _images_per_second(
        _naive(paths, labels, _IMAGE_SIZE.value, batch, serial=True), count, batch)
    print(f"(a) naive decode+resize to {_IMAGE_SIZE.value}, serial: {naive:,.0f} images/s")
    parallel_naive = _images_per_second(
        _naive(paths, labels, _IMAGE_SIZE.value, batch, serial=False), count, batch)
    print(f"(a') the same, tf.data's automatic map parallelisation on: "
          f"{parallel_naive:,.0f} images/s")

    # As run.py builds it for full epochs. The first epoch decodes every file
    # and fills the in-memory cache; later epochs read decoded images from it.
    project = pipeline.training_batches(
        splits.train, num_examples=splits.sizes["train"], image_shape=splits.image_shape,
        image_size=_IMAGE_SIZE.value, num_classes=splits.num_classes, batch_size=batch,
        seed=0, repeat=False, augment="basic",
    )
    height, width, _ = splits.image_shape
    resized_by = ("brought to it on the CPU" if height == width == _IMAGE_SIZE.value
                  else "the model resizes")
    first_epoch, cores_busy, making = _first_epoch_images_per_second(project)
    print(f"(b) tl_keras training pipeline, --augment=basic, uint8 {height}x{width} "
          f"(input {_IMAGE_SIZE.value}, {resized_by}):")
    print(f"    first epoch (decoding, filling the cache): {first_epoch:,.0f} images/s, "
          f"{cores_busy:.1f} of {os.cpu_count()} cores busy (making its iterator, "
          f"before the clock: {making:.2f} s)")
    ours = _images_per_second(project, count, batch)
    print(f"    later epochs (from the cache): {ours:,.0f} images/s")

    ceiling = _images_per_second(_decode_only(paths, batch), count, batch)
    print(f"(c) read and decode only, parallel: {ceiling:,.0f} images/s")

    print(f"first_epoch_speedup_vs_naive={first_epoch / naive:.2f}")
    print(f"first_epoch_speedup_vs_parallel_naive={first_epoch / parallel_naive:.2f}")
    # The steady state is what a run of many epochs sees.
    print(f"ratio_to_ceiling={ours / ceiling:.2f}")
    print(f"speedup_vs_naive={ours / naive:.2f}")


if __name__ == "__main__":
    app.run(main)
