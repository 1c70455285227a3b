"""Pretrains Multi-SK: `python -m msk_jax.main --config=configs/howto.py[:variant] --workdir=DIR`.

The logic lives in `msk_jax.train` (importable by tests and notebooks); this file only parses
flags, starts multi-host JAX when asked, and calls `train.train_and_evaluate`. A mistake ends in one
line on stderr (`msk_jax.cli`; `--verbose` shows the traceback).

    python -m msk_jax.main --config=configs/howto.py:demo --workdir=/tmp/msk_demo
    python -m msk_jax.main --config=configs/howto.py --workdir=gs://bucket/run \\
        --config.data.csv=... --config.optimizer.lr=1e-4
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from msk_jax import allocator, cli, hosts

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file: configs/howto.py[:variant] (the "
                                "packaged one when no such file is here) or your own.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and evaluations go (resumes if present).")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (Cloud TPU pods, SLURM, or the "
                  "--coordinator/--num_processes/--process_id flags).")
flags.DEFINE_string("coordinator", None, "host:port of process 0, for multi-process runs without a cluster manager.")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator).")
flags.DEFINE_string("cpu_collectives", None, "CPU collectives implementation for multi-process CPU runs ('gloo').")
flags.DEFINE_list("local_device_ids", None, "GPUs this process uses (with --multihost/--coordinator); default: "
                  "under SLURM the GPUs its task was given (msk_jax.hosts), else JAX's choice.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import jax
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # keep library INFO chatter (checkpointing) off the terminal
    if FLAGS.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", FLAGS.cpu_collectives)
    device_ids = None
    if FLAGS.multihost or FLAGS.coordinator:
        kwargs = {}
        if FLAGS.coordinator:
            kwargs = dict(coordinator_address=FLAGS.coordinator, num_processes=FLAGS.num_processes,
                          process_id=FLAGS.process_id)
        try:
            device_ids = ([int(i) for i in FLAGS.local_device_ids] if FLAGS.local_device_ids
                          else hosts.slurm_local_device_ids(os.environ))
        except (ValueError, hosts.LayoutError) as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)
        jax.distributed.initialize(local_device_ids=device_ids, **kwargs)
    for line in hosts.describe(jax, device_ids, os.environ):
        print(line, file=sys.stderr if line.startswith("warning:") else sys.stdout, flush=True)

    from msk_jax import checkpoints, lease, train
    from msk_jax.data.loader import InputPositionError
    from msk_jax.errors import DataError

    # Ctrl-C and SIGTERM save a checkpoint and stop (a second Ctrl-C stops at once, even inside XLA).
    stop = train.StopRequest(multihost=jax.process_count() > 1, exit_at_once=True)
    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir, stop=stop)
    except (FileNotFoundError, train.NonFiniteLossError, DataError, checkpoints.CheckpointError,
            InputPositionError, lease.LeaseError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        stop.restore()


if __name__ == "__main__":
    allocator.use_tcmalloc()
    cli.run(main, config_flag="config")  # the --config checked before anything is created
