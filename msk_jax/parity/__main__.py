"""Parity checker: recomputes the original implementation's golden outputs with msk_jax.

    python -m msk_jax.parity GOLDEN_DIR [--json OUT]

For every known golden file present in GOLDEN_DIR, the outputs are recomputed from the file's
*inputs only* (each checker sees the file through a view that refuses output keys), compared
with the expected outputs under the tolerances of the golden README, and reported as one line
per file. Exits non-zero if any file fails.
"""

from __future__ import annotations

import sys

from absl import app, flags

from msk_jax.parity.checker import run

FLAGS = flags.FLAGS


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("usage: python -m msk_jax.parity GOLDEN_DIR [--json=OUT] [--features_dtype=float16]")
    sys.exit(run(argv[1], FLAGS.json, FLAGS.features_dtype))


if __name__ == "__main__":
    flags.DEFINE_string("json", None, "Also write the results as JSON to this file.")
    flags.DEFINE_enum("features_dtype", "float32", ["float32", "float16", "bfloat16"],
                      "Round the video and audio inputs to this dtype first (a feature store's dtype): measures "
                      "its effect against the tolerances.")
    from msk_jax import cli

    cli.run(main)
