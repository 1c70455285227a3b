"""The command line of `msk_jax.search`: index, query, serve (see the package's docstring)."""

from __future__ import annotations

import sys

from msk_jax.errors import DataError
from msk_jax.search.build import build_index, remove_videos
from msk_jax.search.query import read_queries, run_query
from msk_jax.search.store import EMBEDDINGS, SearchError

COMMANDS = ("index", "query", "serve")


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "index: the run's configuration (--append: optional, must be "
                                    "the index's); query, serve: optional, must be the index's.", lock_config=True)
    flags.DEFINE_string("checkpoint", None, "index: training workdir, its checkpoints/ folder or a step folder "
                        "(--append: the index's by default).")
    flags.DEFINE_string("features", None, "index: the folder of the videos' features (HowTo100M layout).")
    flags.DEFINE_string("csv", None, "index: the csv listing the videos (default: the only *.csv in --features).")
    flags.DEFINE_string("captions", None, "index: ASR segments to show with the windows (default: "
                        "--features/caption.pickle where it exists).")
    flags.DEFINE_string("index", None, "The index folder (local or gs://...).")
    flags.DEFINE_float("window", None, "index: window length (s); default 8 (--append: the index's).")
    flags.DEFINE_float("stride", None, "index: seconds between window starts; default 4 (--append: the index's).")
    flags.DEFINE_enum("weights", None, ["ema", "online"], "index: which weights, default ema (ema falls back to "
                      "online when the checkpoint has none; --append: the index's).")
    flags.DEFINE_bool("append", False, "index: embed only the videos of --features the index does not hold yet "
                      "(by csv path) and those whose features changed; the others are named and skipped.")
    flags.DEFINE_list("remove", None, "index: remove these videos (csv paths, comma-separated) from the index.")
    flags.DEFINE_bool("approximate", None, "index: also write an approximate index (faiss IVF over principal "
                      "components; --noapproximate drops it; default: keep the index's choice). query, serve: "
                      "search through it (the fused v+a embedding).")
    flags.DEFINE_integer("k", 10, "query: how many windows to list.")
    flags.DEFINE_bool("json", False, "query: one JSON object per query and line.")
    flags.DEFINE_string("queries", None, "query: a file of queries, one per line.")
    flags.DEFINE_enum("embedding", "v+a", list(EMBEDDINGS), "query: the windows' embedding to score against.")
    flags.DEFINE_string("host", "127.0.0.1", "serve: the address to listen on (0.0.0.0: every interface).")
    flags.DEFINE_integer("port", 8080, "serve: the port to listen on (0: any free port, printed).")


def main(argv):
    from absl import flags, logging

    from msk_jax import convert
    from msk_jax.checkpoints import CheckpointError

    FLAGS = flags.FLAGS
    logging.set_verbosity(logging.WARNING)
    command, rest = (argv[1], argv[2:]) if len(argv) > 1 else (None, [])
    try:
        if command in ("index", "serve") and rest:
            raise SearchError(f"unexpected arguments {rest}")
        if command in COMMANDS and FLAGS.index is None:
            raise SearchError(f"{command} needs --index")
        if command == "index":
            if FLAGS.remove:
                if FLAGS.features or FLAGS.append:
                    raise SearchError("--remove takes no --features or --append: remove, then append")
                remove_videos(FLAGS.index, FLAGS.remove)
                return 0
            if FLAGS.features is None:
                raise SearchError("index needs --features")
            if not FLAGS.append:
                for name in ("config", "checkpoint"):
                    if getattr(FLAGS, name) is None:
                        raise SearchError(f"index needs --{name} (or --append to an existing index)")
            build_index(FLAGS.config, FLAGS.checkpoint, FLAGS.features, FLAGS.index, window=FLAGS.window,
                        stride=FLAGS.stride, weights=FLAGS.weights, csv=FLAGS.csv, captions=FLAGS.captions,
                        append=FLAGS.append, approximate=FLAGS.approximate)
            return 0
        if command == "query":
            queries = list(rest) + (read_queries(FLAGS.queries) if FLAGS.queries else [])
            return run_query(FLAGS.index, queries, FLAGS.k, FLAGS.json, FLAGS.embedding, FLAGS.config,
                             bool(FLAGS.approximate))
        if command == "serve":
            from msk_jax.search.server import serve

            return serve(FLAGS.index, FLAGS.host, FLAGS.port, FLAGS.config)
        raise SearchError(f"expected a command, index, query or serve (got {command!r}): python -m msk_jax.search "
                          "index|query|serve --help")
    except (SearchError, CheckpointError, DataError, FileNotFoundError, convert.ConversionError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    from msk_jax import allocator, cli

    allocator.use_tcmalloc()
    _define_flags()
    cli.run(main, config_flag="config", errors=(SearchError,))
