"""Demo corpus videos as real mp4 files, to try `python -m msk_jax.extract` and search end to end.

Each video is one clip of the spoken-digit-strings corpus (`msk_jax.demo.corpus`), rendered
exactly as the corpus renders it (same seed, same strings, images and voices): its digit frames
(one 8x8 image per second, drawn as a 224x224 grey grid, `msk_jax.demo.backbone.render_frame`) at
24 frames/s, H.264 (mpeg4 where libx264 is missing), and its waveform as a 16 kHz mono AAC track.

- split `msrvtt` (default): the corpus's in-domain test clips (digit strings never used in
  training), one caption each: the digit words over the whole clip;
- split `youcook`: the out-of-domain test clips (held-out voice and handwriting);
- split `train`: training videos, with their ASR-style segments.

Writes `<out>/<id>.mp4` and `<out>/captions.csv` (video, start, end, caption: the file name and
each caption's span in seconds), the csv `python -m msk_jax.extract` reads as --captions and
--eval_csv, and `<out>/strings.json` (id -> digit strings).

    python -m msk_jax.demo.videos --out DIR [--count 8] [--split msrvtt|youcook|train] [--seed 0]
"""

from __future__ import annotations

import csv
import json
import os
import sys

import numpy as np

from msk_jax.data.audio import SAMPLE_RATE
from msk_jax.demo import corpus as demo_corpus
from msk_jax.demo.backbone import render_frame

VIDEO_FPS = 24
FRAME_SIZE = 224
AUDIO_FRAME = 1024


def write_mp4(path: str, frames: np.ndarray, duration: float, waveform: np.ndarray, size: int = FRAME_SIZE) -> None:
    """An mp4 of `duration` seconds: demo frame k (64 pixels) during second k, at 24 frames/s,
    and `waveform` (16 kHz mono) as AAC. Written to a temporary name, then renamed."""
    import av


    tmp = f"{path}.tmp{os.getpid()}.mp4"
    container = av.open(tmp, "w")
    try:
        if "libx264" in av.codecs_available:
            video = container.add_stream("libx264", rate=VIDEO_FPS, options={"crf": "10", "preset": "veryfast"})
        else:
            video = container.add_stream("mpeg4", rate=VIDEO_FPS, options={"qscale": "2"})
        video.width = video.height = size
        video.pix_fmt = "yuv420p"
        audio = container.add_stream("aac", rate=SAMPLE_RATE)
        audio.layout = "mono"
        audio.bit_rate = 96000
        images = [render_frame(f, size) for f in frames]
        for k in range(int(round(duration * VIDEO_FPS))):
            frame = av.VideoFrame.from_ndarray(images[min(k // VIDEO_FPS, len(images) - 1)], format="rgb24")
            frame.pts = k
            container.mux(video.encode(frame))
        container.mux(video.encode())
        samples = np.asarray(waveform, np.float32).reshape(1, -1)
        for start in range(0, samples.shape[1], AUDIO_FRAME):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, start:start + AUDIO_FRAME]),
                                               format="flt", layout="mono")
            frame.sample_rate, frame.pts = SAMPLE_RATE, start
            container.mux(audio.encode(frame))
        container.mux(audio.encode())
    finally:
        container.close()
    os.replace(tmp, path)


def write_demo_videos(out: str, count: int = 8, split: str = "msrvtt", seed: int = 0, size: str = "default",
                      progress: bool = True) -> list[dict]:
    """Writes `count` clips of `split` as mp4 files plus captions.csv and strings.json; returns
    the csv rows. The clips are the corpus's own (`build_demo_corpus(size=size, seed=seed)`)."""
    if split not in ("msrvtt", "youcook", "train"):
        raise ValueError(f"demo videos: unknown split {split!r}; choose msrvtt, youcook or train.")
    cfg = demo_corpus.SIZES[size]
    src = demo_corpus.load_sources(seed, 128, progress)
    rng = np.random.default_rng([seed, 9])
    msrvtt_strings = demo_corpus.unique_strings(rng, cfg.msrvtt_clips, set())
    youcook_strings = demo_corpus.unique_strings(rng, cfg.youcook_clips + demo_corpus.NUM_MISSING_YOUCOOK, set(msrvtt_strings))
    os.makedirs(out, exist_ok=True)
    rows, strings = [], {}
    for i in range(count):
        if split == "train":
            rng = np.random.default_rng([seed, 1, i])
            events, duration = demo_corpus.plan_training_video(rng, cfg.train_seconds, set(msrvtt_strings) | set(youcook_strings))
            clip = demo_corpus.render(events, duration, src.images, src.pools["train"], src.voices, rng, rng)
            vid = f"video_{i:04d}"
            segments = clip.segments
        else:
            names = msrvtt_strings if split == "msrvtt" else youcook_strings
            if i >= len(names):
                break
            languages = demo_corpus.TRAIN_LANGUAGES if split == "msrvtt" else (demo_corpus.HELD_OUT_LANGUAGE,)
            rng = np.random.default_rng([seed, 2 if split == "msrvtt" else 3, i])
            events, duration = demo_corpus.plan_test_clip(rng, names[i], languages)
            clip = demo_corpus.render(events, duration, src.images, src.pools[split], src.voices, rng, None)
            vid = f"demo_{split}_{i:04d}"
            segments = [(0.0, round(duration, 3), demo_corpus.digit_text(names[i]))]
        write_mp4(os.path.join(out, vid + ".mp4"), clip.frames, duration, clip.waveform)
        rows += [{"video": vid + ".mp4", "start": s, "end": e, "caption": t} for s, e, t in segments]
        strings[vid] = clip.strings
        if progress:
            print(f"[demo videos] {i + 1}/{count}: {vid}.mp4 ({duration:.1f} s, {' '.join(clip.strings)})",
                  file=sys.stderr, flush=True)
    with open(os.path.join(out, "captions.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, ["video", "start", "end", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out, "strings.json"), "w") as f:
        json.dump(strings, f, indent=1)
    return rows


def main(argv):
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        rows = write_demo_videos(FLAGS.out, FLAGS.count, FLAGS.split, FLAGS.seed, FLAGS.size, not FLAGS.quiet)
    except (RuntimeError, ImportError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(f"{len({r['video'] for r in rows})} videos, {len(rows)} captions in {os.path.abspath(FLAGS.out)}")


if __name__ == "__main__":
    from absl import app, flags

    FLAGS = flags.FLAGS
    flags.DEFINE_string("out", None, "Output folder.")
    flags.DEFINE_integer("count", 8, "Number of videos.")
    flags.DEFINE_enum("split", "msrvtt", ["msrvtt", "youcook", "train"], "Which clips of the corpus.")
    flags.DEFINE_integer("seed", 0, "Seed of the corpus.")
    flags.DEFINE_enum("size", "default", sorted(demo_corpus.SIZES), "Corpus size (the test strings depend on it).")
    flags.DEFINE_bool("quiet", False, "No progress lines.")
    flags.mark_flags_as_required(["out"])
    app.run(main)
