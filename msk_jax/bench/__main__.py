"""The command line: ``python -m msk_jax.bench COMMAND [--config=configs/bench.py[:cpu_bench]]
[--json=OUT]``; tcmalloc preloaded first (CPU hosts), the ``--config`` file found from any
directory and checked with its overrides (``msk_jax.cli``). COMMAND is one of:
"""

import json
import sys

from msk_jax import allocator, cli
from msk_jax.bench import BENCHMARKS, CONFIG, NOT_IN_ALL, run

__doc__ += "".join(f"\n  {name:<11} {summary}" for name, (_, summary) in BENCHMARKS.items())
__doc__ += f"\n  {'all':<11} every one but {', '.join(NOT_IN_ALL)}\n"


def main(argv):
    from absl import app

    if len(argv) != 2:
        raise app.UsageError("usage: python -m msk_jax.bench COMMAND [--config=configs/bench.py] [--json=OUT]; "
                             "COMMAND: " + ", ".join(f"{n} ({h})" for n, (_, h) in BENCHMARKS.items())
                             + ", all (every one but plan, fed and extract)")
    try:
        if FLAGS.out:  # accelerator's folder
            FLAGS.config.accelerator.out = FLAGS.out
        results = run(argv[1], FLAGS.config)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)


def _define_flags():
    # Called by cli.run: a config flag with a default reads its overrides when defined.
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", CONFIG, "The benchmarks' shapes (configs/bench.py).")
    flags.DEFINE_string("json", None, "Also write the results to this JSON file.")
    flags.DEFINE_string("out", None, "accelerator: the folder of its JSON and markdown table.")


if __name__ == "__main__":
    allocator.use_tcmalloc()
    from absl import flags

    FLAGS = flags.FLAGS
    cli.run(main, config_flag="config", default_config=CONFIG, define_flags=_define_flags)
