"""Raw videos -> HowTo100M-compatible features (`msk_jax.extract.extractor`).

    python -m msk_jax.extract --videos=DIR_OR_CSV --output=DIR|gs://... \\
        --weights_2d=resnet152.pth --weights_3d=resnext101.pth [--backbone=real|demo] \\
        [--dtype=float32|bfloat16] [--batch=64] [--captions=CSV_OR_PICKLE] \\
        [--store=DIR_OR_URL --word_vectors=word2vec.bin] \\
        [--eval_csv=clips.csv --eval_format=msrvtt|youcook2|classification --eval_output=test.pkl] \\
        [--max_duration=14400 --max_pixels=16777216 --max_aspect=10] [--retry_killed]

The demo corpus end to end (`msk_jax.demo.videos` writes the mp4 files and captions.csv):

    python -m msk_jax.demo.videos --out=/tmp/demo_videos --count=8
    python -m msk_jax.extract --videos=/tmp/demo_videos --output=/tmp/demo_features --backbone=demo \\
        --captions=/tmp/demo_videos/captions.csv --eval_csv=/tmp/demo_videos/captions.csv \\
        --eval_output=/tmp/demo_features/msrvtt_test.pkl

A classification set (`msk_jax.data.classification_sets`) of UCF101 or HMDB51 from your copy of
the videos: --eval_format=classification with --eval_csv listing video, label (the class name)
and splits (the official splits whose test list holds the video, e.g. "1 3"):

    python -m msk_jax.extract --videos=UCF-101 --output=/data/ucf101_features --weights_2d=... \
        --weights_3d=... --eval_csv=ucf101_classes.csv --eval_format=classification \
        --eval_output=/data/ucf101_classification.pkl

A run resumes where it stopped (videos whose files exist are skipped), shards the videos over
processes (--process_index/--process_count, default JAX's), names every video it cannot decode or
refuses (an output path outside --output, a video beyond the --max_* bounds, a file that is not
a local video in a common container, a video that killed the extractor last time) one line each
and goes on with the others. Exit code: 0 when every video of this process has features, 1 when
any failed, 2 for bad input (a missing folder, two videos with one name); a SIGTERM stops it as
Ctrl-C does (exit 143), without blaming the video it was on.
"""

from __future__ import annotations

import signal
import sys

from absl import app, flags

from msk_jax.extract.video import Limits

FLAGS = flags.FLAGS
flags.DEFINE_string("videos", None, "Folder of videos (searched recursively) or a csv with a 'video' column "
                    "(and optionally 'path', where the features go).")
flags.DEFINE_string("output", None, "Root of the features (<output>/<path>/<id>_2d.npz, ...), a folder or gs:// URL.")
flags.DEFINE_enum("backbone", "real", ["real", "demo"], "ResNet-152 + ResNeXt-101, or the demo corpus's frame features.")
flags.DEFINE_string("weights_2d", "", "ResNet-152 weights (what msk_jax.extract.backbones.load_backbone_weights reads).")
flags.DEFINE_string("weights_3d", "", "ResNeXt-101 weights (what msk_jax.extract.backbones.load_backbone_weights reads).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of the backbones.")
flags.DEFINE_integer("batch", 64, "2D frames per backbone call (3D: batch // 16 clips of 16 frames).")
flags.DEFINE_string("captions", "", "ASR captions: a caption.pickle, or a csv with video, start, end, caption.")
flags.DEFINE_string("store", "", "Also build a feature store here (msk_jax.data.feature_store).")
flags.DEFINE_string("word_vectors", "", "word2vec binary file, for --store.")
flags.DEFINE_enum("store_dtype", "float16", ["float32", "float16", "bfloat16"], "Row dtype of the store.")
flags.DEFINE_string("eval_csv", "", "Evaluation clips: a csv with video, start, end, caption (for "
                    "--eval_format=classification: video, label, splits).")
flags.DEFINE_enum("eval_format", "msrvtt", ["msrvtt", "youcook2", "classification"], "Format of the evaluation pickle.")
flags.DEFINE_string("eval_output", "", "Where the evaluation pickle goes.")
flags.DEFINE_integer("process_index", None, "This process's share of the videos (default: jax.process_index()).")
flags.DEFINE_integer("process_count", None, "Number of processes sharing the videos (default: jax.process_count()).")
flags.DEFINE_integer("demo_seed", 0, "--backbone=demo: the demo corpus's seed.")
flags.DEFINE_integer("demo_feature_dim", 128, "--backbone=demo: the demo corpus's feature width.")
flags.DEFINE_float("progress_seconds", 10.0, "Seconds between progress lines.")
flags.DEFINE_float("max_duration", Limits.max_seconds, "Longest video in seconds (by its header, then by its frames' "
                   "timestamps); a longer one is refused before decoding. A video's audio and its spectrogram's "
                   "computation grow with its length (about 4 GB an hour at their peak).")
flags.DEFINE_integer("max_pixels", Limits.max_pixels, "Most pixels of one frame, width * height (default 4096 * 4096; "
                     "4K video is 8,294,400, 8K 33,177,600); a larger video is refused before decoding.")
flags.DEFINE_float("max_aspect", Limits.max_aspect, "Largest aspect ratio, longer side / shorter side (10: from 1:10 to "
                   "10:1); the 2D frames are 224 x (224 * ratio) pixels, so a thinner video is refused before decoding.")
flags.DEFINE_boolean("retry_killed", False, "Extract again the videos that killed the extractor last time (those "
                     "whose mark in <output>/.extract-state is left); by default they are skipped and named.")


def _stop(signum, frame):
    # Raised in the main thread, so the extractor unmarks the video it was on, as for Ctrl-C.
    raise SystemExit(128 + signum)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from msk_jax.errors import DataError
    from msk_jax.extract.extractor import InputError, Options, run

    for name in ("videos", "output"):
        if not getattr(FLAGS, name):
            print(f"error: --{name} is required", file=sys.stderr, flush=True)
            sys.exit(2)
    index, count = FLAGS.process_index, FLAGS.process_count
    if index is None or count is None:
        import jax

        index = jax.process_index() if index is None else index
        count = jax.process_count() if count is None else count
    opts = Options(videos=FLAGS.videos, output=FLAGS.output, backbone=FLAGS.backbone, weights_2d=FLAGS.weights_2d,
                   weights_3d=FLAGS.weights_3d, dtype=FLAGS.dtype, batch=FLAGS.batch, captions=FLAGS.captions,
                   store=FLAGS.store, word_vectors=FLAGS.word_vectors, store_dtype=FLAGS.store_dtype,
                   eval_csv=FLAGS.eval_csv, eval_format=FLAGS.eval_format, eval_output=FLAGS.eval_output,
                   process_index=index, process_count=count, demo_seed=FLAGS.demo_seed,
                   demo_feature_dim=FLAGS.demo_feature_dim, progress_seconds=FLAGS.progress_seconds,
                   max_duration=FLAGS.max_duration, max_pixels=FLAGS.max_pixels, max_aspect=FLAGS.max_aspect,
                   retry_killed=FLAGS.retry_killed)
    signal.signal(signal.SIGTERM, _stop)
    try:
        summary = run(opts)
    except (InputError, DataError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {' '.join(str(err).splitlines())}", file=sys.stderr, flush=True)
        sys.exit(2)
    extracted = summary["extracted_now"] + summary["skipped_done"]
    if extracted == 0:
        print("error: no video could be extracted", file=sys.stderr, flush=True)
        sys.exit(1)
    if summary["failed"]:
        print(f"error: {len(summary['failed'])} of {extracted + len(summary['failed'])} videos failed (named above, "
              "one line each); the others are extracted", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    from msk_jax import cli

    cli.run(main)
