"""Running the experiments' `run.py` commands, training runs and probes, one
by one, each once: a rerun reports the runs that finished before, and
continues arm (c)'s finished run for arm (d).
"""

import json
import os
import shutil
import subprocess
import sys
import time

from absl import flags

from transfer import REPOSITORY
from transfer.arms import COMMON_FLAGS

RUN_PY = os.path.join(REPOSITORY, "run.py")


def continue_finished_run(finished_dir, model_dir, run_flags):
    """Makes `model_dir` a copy of the finished run in `finished_dir`, marked
    unfinished and with the effective flags of `run_flags`, so that `run.py`
    with those flags resumes it: it skips the phases the copy completed and
    trains only the ones `run_flags` adds (arm (d)'s self-training rounds
    after arm (c)'s two phases). The two phases are then arm (c)'s, not a
    second training of the same flags and seed, and are not paid for twice.

    The flags text comes from the tool's own flags module, as `run.py` would
    write it; nothing else of the run is touched. Does nothing if `model_dir`
    exists (a continuation made before, finished or interrupted).
    """
    if os.path.exists(model_dir):
        return
    partial = model_dir + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(finished_dir, partial, symlinks=True)
    os.remove(os.path.join(partial, "COMPLETE"))
    written = subprocess.run(
        [sys.executable, "-c",
         "import sys; from tl_keras.cli import flags; flags.parse(sys.argv); "
         "sys.stdout.write(flags.to_flagfile())",
         *COMMON_FLAGS, *run_flags, f"--model_dir={model_dir}"],
        cwd=REPOSITORY, capture_output=True, text=True)
    if written.returncode != 0:
        sys.exit(f"The flags of {model_dir} were refused: {written.stderr.strip()}")
    with open(os.path.join(partial, "flags.txt"), "w") as file:
        file.write(written.stdout)
    os.replace(partial, model_dir)


class Runner:
    """Runs `run.py` commands one by one, keeping each one's wall time.

    Wall times go to WORK_DIR/times.json and commands to WORK_DIR/commands.json,
    so a rerun of the experiment reports the finished runs it skips with the
    time they took, and refuses one that another command made.
    """

    def __init__(self, work_dir, total):
        self.work_dir = work_dir
        self.total = total
        self.count = 0
        self.times_path = os.path.join(work_dir, "times.json")
        self.commands_path = os.path.join(work_dir, "commands.json")
        self.times = self._load(self.times_path)
        self.commands = self._load(self.commands_path)

    @staticmethod
    def _load(path):
        if not os.path.exists(path):
            return {}
        with open(path) as file:
            return json.load(file)

    def _check_same_flags(self, name, model_dir, run_flags):
        """Refuses to report a finished run made with other flags: after a
        change to the recipe, its figures would pass for the new recipe's."""
        earlier = self.commands.get(name)
        if earlier is not None and earlier != run_flags:
            changed = sorted(set(run_flags) ^ set(earlier))
            sys.exit(f"{model_dir} finished with other flags than this experiment now "
                     f"gives it ({' '.join(changed)}). Pass another --work_dir, or delete "
                     "that folder to run it again.")

    def record(self, name, seconds, run_flags):
        """Adds a finished run's time and flags to times.json and commands.json.

        Each file is read again just before it is written: another experiment
        process may share the work folder (say `--sizes=20` and `--sizes=100`
        at once), and writing the copy this process loaded at its start would
        drop the runs the other one finished since.
        """
        for path, attribute, value in ((self.times_path, "times", seconds),
                                       (self.commands_path, "commands", run_flags)):
            values = {**self._load(path), name: value}
            setattr(self, attribute, values)
            with open(path + f".{os.getpid()}.tmp", "w") as file:
                json.dump(values, file, indent=2)
            os.replace(path + f".{os.getpid()}.tmp", path)

    def run(self, name, description, run_flags):
        """Runs one training run unless it finished before.

        Returns:
            (test top-1 in percent, wall time in seconds).
        """
        seconds = self._run_once(name, description, run_flags, finished_file="COMPLETE")
        with open(os.path.join(self.work_dir, name, "metrics.json")) as file:
            top1 = 100 * json.load(file)["test"]["top1"]
        print(f"  test top-1 {top1:.2f}% in {seconds:.0f} s", flush=True)
        return top1, seconds

    def probe(self, name, description, run_flags):
        """Runs `run.py --mode=probe` with a run's flags unless it finished
        before, into WORK_DIR/NAME/probe/.

        Returns:
            The wall time in seconds.
        """
        # A probe writes no COMPLETE; its summary is the last file it writes.
        seconds = self._run_once(name, description, [*run_flags, "--mode=probe"],
                                 finished_file=os.path.join("probe", "summary.txt"))
        print(f"  probed in {seconds:.0f} s", flush=True)
        return seconds

    def _run_once(self, name, description, run_flags, finished_file):
        """Runs one `run.py` command, printed first, unless WORK_DIR/NAME holds
        `finished_file` and times.json its time.

        Returns:
            The command's wall time in seconds, now or when it ran.
        """
        self.count += 1
        model_dir = os.path.join(self.work_dir, name)
        # Each run is as quiet as run.py is by default; --verbosity given
        # here brings the library lines back in the runs' logs too.
        verbosity = ([f"--verbosity={flags.FLAGS.verbosity}"]
                     if flags.FLAGS["verbosity"].present else [])
        command = [sys.executable, RUN_PY, *COMMON_FLAGS, *run_flags, *verbosity,
                   f"--model_dir={model_dir}"]
        finished = os.path.exists(os.path.join(model_dir, finished_file))
        if finished and name in self.times:
            self._check_same_flags(name, model_dir, [*COMMON_FLAGS, *run_flags])
            print(f"[{self.count}/{self.total}] {description}: finished earlier.", flush=True)
            return self.times[name]
        shown = ["python", os.path.relpath(RUN_PY), *command[2:]]
        print(f"[{self.count}/{self.total}] {description}:\n  " + " ".join(shown), flush=True)
        log_path = os.path.join(self.work_dir, f"{name}.log")
        start = time.perf_counter()
        with open(log_path, "a") as log:
            code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT,
                                   cwd=REPOSITORY)
        seconds = time.perf_counter() - start
        if code != 0:
            with open(log_path) as log:
                tail = log.read()[-3000:]
            sys.exit(f"{description} failed (exit status {code}). The end of "
                     f"{log_path}:\n{tail}")
        self.record(name, seconds, [*COMMON_FLAGS, *run_flags])
        return seconds
