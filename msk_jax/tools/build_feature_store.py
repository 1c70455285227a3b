"""Builds a feature store (`msk_jax.data.feature_store`) from HowTo100M features in the original layout.

    python -m msk_jax.tools.build_feature_store --config=configs/howto.py \\
        --config.data.csv=... --config.data.caption=... --config.data.features_2d=... \\
        --config.data.features_3d=... --config.data.audio=... --config.data.word_vectors=... \\
        --output=gs://bucket/howto100m_store [--dtype=bfloat16]

then train with ``--config.data.source=store --config.data.store_dir=<output>``. The same config
(paths, dimensions, log-mel bins) is read as for training; ``--config=configs/howto.py:demo``
builds the store of the demo corpus. ``--layout=time_blocks`` (the default) keeps a clip's rows of
all three kinds in one byte range, a few requests per video from a bucket; ``--layout=kinds``
writes format 1 (each video's 2D, 3D and log-mel blocks apart). A store of either layout gives
the same clips; to give a format-1 store time blocks, build it again into a new folder.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from msk_jax import data_sources
from msk_jax.data.feature_store import build_feature_store
from msk_jax.data.howto100m import HowTo100MReader
from msk_jax.errors import DataError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file (its data paths are read).",
                                lock_config=True)
flags.DEFINE_string("output", None, "Folder (or gs:// URL) of the store to build.")
flags.DEFINE_enum("dtype", "float32", ["float32", "float16", "bfloat16"], "How the feature rows are stored.")
flags.DEFINE_integer("shard_gib", 4, "Size of each shard file, GiB.")
flags.DEFINE_enum("layout", "time_blocks", ["time_blocks", "kinds"], "time_blocks: a clip is one byte range; "
                  "kinds: each video's 2D, 3D and log-mel blocks apart (format 1).")
flags.mark_flags_as_required(["config", "output"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")

    config = FLAGS.config
    try:
        paths = data_sources.data_paths(config)
        if not paths.csv:
            raise FileNotFoundError("config.data.source must be 'files' or 'demo' to build a store (it reads the "
                                    "original layout: config.data.csv, caption, features_2d/3d, audio).")
        words = data_sources.load_words(config, paths)
        d = config.data
        reader = HowTo100MReader(paths.csv, paths.caption, paths.features_2d, paths.audio, words,
                                 features_3d=paths.features_3d, settings=data_sources.clip_settings(config),
                                 dim_2d=d.dim_2d, dim_3d=d.dim_3d)
        build_feature_store(reader, FLAGS.output, dtype=FLAGS.dtype, shard_bytes=FLAGS.shard_gib << 30,
                            layout=FLAGS.layout)
    except (FileNotFoundError, FileExistsError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    from msk_jax import cli

    cli.run(main, config_flag="config")  # --config=configs/howto.py from any directory, checked
