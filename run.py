"""Transfer learning for image classification: python run.py --flagfile=configs/cifar100.flags"""

import os
import sys

from tl_keras import console

# Before TensorFlow loads: its C++ logging reads its level as it does.
console.quiet_startup(sys.argv)

from absl import app  # noqa: E402

from tl_keras import rundir  # noqa: E402
from tl_keras.cli import audit  # noqa: E402
from tl_keras.cli import flags  # noqa: E402
from tl_keras.cli import job  # noqa: E402
from tl_keras.cli import modes  # noqa: E402
from tl_keras.cli import probe  # noqa: E402
from tl_keras.errors import Preempted, TrainingDiverged, UsageError  # noqa: E402


def main(argv):
    del argv  # flags.parse refuses anything that isn't a flag.
    settings = flags.mode()
    try:
        if settings["mode"] == "evaluate":
            modes.run_evaluation(flags.run_config(settings["model_dir"]), settings["split"],
                               tta=settings["tta"])
        elif settings["mode"] == "predict":
            model = settings["model_dir"]
            run_folder = (os.path.dirname(model)
                          if model.endswith(rundir.MODEL_FILE_SUFFIXES) else model)
            modes.run_prediction(
                model, settings["images"], settings["top_k"], settings["output"],
                resize=flags.run_setting(run_folder, "resize"),
                tta=settings["tta"] or flags.run_setting(run_folder, "tta"),
                explain=settings["explain"])
        elif settings["mode"] == "audit":
            config, from_run = flags.audit_config()
            audit.run_audit(config, from_run=from_run, output=settings["output"],
                            flagfile_text=flags.to_flagfile())
        elif settings["mode"] == "find_lr":
            modes.run_find_lr(flags.to_config(), settings["find_lr_phase"],
                              settings["find_lr_steps"], flagfile_text=flags.to_flagfile(),
                              given_flags=flags.given_flags(),
                              flag_defaults=flags.defaults_flagfile())
        elif settings["mode"] == "probe":
            probe.run_probe(flags.to_config(), settings["probe_every"])
        else:
            job.run_training(
                flags.to_config(),
                flagfile_text=flags.to_flagfile(),
                # A progress bar in a terminal; one line per epoch in a log file.
                verbose="auto" if sys.stdout.isatty() else 2,
                overwrite=settings["overwrite"],
                given_flags=flags.given_flags(),
                flag_defaults=flags.defaults_flagfile(),
            )
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as diverged:
        # Not a usage error: the input was fine, so not status 2.
        print(f"error: {diverged}", file=sys.stderr)
        sys.exit(1)
    except Preempted as stopped:
        print(str(stopped), file=sys.stderr)
        sys.exit(143)  # 128 + SIGTERM, as if the signal had ended the process.


if __name__ == "__main__":
    app.run(main, flags_parser=flags.parse)
