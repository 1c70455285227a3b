"""Command line: builds a msk_jax TFDS dataset as array_record shards, without TensorFlow.

    python -m msk_jax.tools.build_tfds howto100m_features --manual_dir=DIR --data_dir=OUT
    python -m msk_jax.tools.build_tfds msrvtt_retrieval --manual_dir=DIR --data_dir=OUT
    python -m msk_jax.tools.build_tfds youcook2_retrieval --manual_dir=DIR --data_dir=OUT
"""

from __future__ import annotations

import sys

from absl import app, flags

from msk_jax.data.tfds_builders import BUILDERS, build
from msk_jax.errors import DataError

FLAGS = flags.FLAGS


def main(argv):
    if len(argv) != 2 or argv[1] not in BUILDERS:
        raise app.UsageError(f"usage: python -m msk_jax.tools.build_tfds DATASET --manual_dir=DIR --data_dir=OUT "
                             f"(DATASET: one of {sorted(BUILDERS)})")
    try:
        path = build(argv[1], FLAGS.manual_dir, FLAGS.data_dir)
    except (FileNotFoundError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"built {argv[1]} in {path}")


if __name__ == "__main__":
    flags.DEFINE_string("manual_dir", None, "Folder with the original files.")
    flags.DEFINE_string("data_dir", None, "Where the built dataset goes.")
    flags.mark_flags_as_required(["manual_dir", "data_dir"])
    from msk_jax import cli

    cli.run(main)
