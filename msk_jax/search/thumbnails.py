"""Thumbnails: the small JPEG stills the search page shows beside each window.

`python -m msk_jax.extract` keeps one still a second, the 2D stream's frame of that second (the
frames it decodes anyway, one a second), in `<output>/<path>/<id>_stills.zip` beside the
features: a zip archive (stored, not compressed) of `00000.jpg`, `00001.jpg`, ..., one a second.
An index takes each window's still from there (the second at its middle). For the demo
corpus, whose videos exist only as features, a window's still is drawn as the demo draws its
frames (`msk_jax.demo.backbone.render_frame`): one cell a second of the window, the digit said
in that second (a sample of the corpus's handwriting of that digit, not the very image of the
video) or an empty frame.
"""

from __future__ import annotations

import fractions
import functools
import io
import zipfile

import av
import numpy as np

from msk_jax import storage

SUFFIX = "_stills.zip"
MAX_STILL_BYTES = 1 << 20  # a still larger than this is not one of ours: the file is not read
HEIGHT = 96           # pixels: what the page shows
DEMO_CELL = 48        # pixels of one second's frame in a demo still
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class JpegEncoder:
    """RGB frames -> JPEG bytes of `height` pixels (width in proportion, even), through FFmpeg's
    mjpeg encoder."""

    def __init__(self, height: int = HEIGHT):
        self.height = height

    def size(self, frame: np.ndarray) -> tuple[int, int]:
        h, w = frame.shape[:2]
        height = min(self.height, h - h % 2)
        return max(2, int(round(w * height / h / 2)) * 2), height

    def __call__(self, frame: np.ndarray) -> bytes:
        width, height = self.size(frame)
        picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame, np.uint8), format="rgb24")
        picture = picture.reformat(width=width, height=height, format="yuvj420p")
        # An encoder per still: mjpeg keeps no state between frames, and a flushed context is done.
        codec = av.CodecContext.create("mjpeg", "w")
        codec.width, codec.height, codec.pix_fmt = width, height, "yuvj420p"
        codec.time_base = fractions.Fraction(1, 1)
        packets = codec.encode(picture) + codec.encode(None)
        return b"".join(bytes(packet) for packet in packets)


def zip_bytes(stills: list[bytes]) -> bytes:
    """A stills file (`SUFFIX`) of one still a second."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for second, data in enumerate(stills):
            archive.writestr(f"{second:05d}.jpg", data)
    return buffer.getvalue()


def read_stills(path: str) -> list[bytes] | None:
    """The stills of a stills file, one a second; None where it is not one (they are for display
    only: a file that is not what the extractor writes is passed over, not an error)."""
    try:
        with zipfile.ZipFile(storage.local_or_buffer(path)) as archive:
            members = archive.infolist()
            names = [f"{second:05d}.jpg" for second in range(len(members))]
            if [m.filename for m in members] != names or any(m.file_size > MAX_STILL_BYTES for m in members):
                return None
            return [archive.read(m) for m in members]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None


def second_of(start: float, end: float, seconds: int) -> int:
    """The second whose still stands for the window [start, end]: the one at its middle."""
    return int(min(max(0, int((start + end) / 2)), max(0, seconds - 1)))


class SecondStills:
    """Collects the still of each decoded 2D frame (one a second) while a video streams."""

    def __init__(self, encoder: JpegEncoder | None = None):
        self.encoder = encoder or JpegEncoder()
        self.stills: list[bytes] = []

    def add(self, frame: np.ndarray) -> None:
        self.stills.append(self.encoder(frame))

    def zip_bytes(self) -> bytes:
        return zip_bytes(self.stills)


# ------------------------------------------------------------------------------------ the demo


@functools.lru_cache(maxsize=1)
def _digit_pixels() -> np.ndarray:
    """(10, 64) pixels: the first training-pool handwriting sample of each digit."""
    from msk_jax.demo import corpus as demo_corpus

    images, labels = demo_corpus.load_digit_images()
    pools = demo_corpus.image_pools(labels)
    return np.stack([images[pools["train"][d][0]] for d in range(10)])


def demo_seconds(caption: dict, duration: float) -> list[int | None]:
    """The digit shown in each second of a demo video, from its ASR segments: the corpus shows
    digit i of a string during second start + i (`demo.corpus.render`); None where none is."""
    shown: list[int | None] = [None] * max(1, int(np.ceil(duration)))
    for start, text in zip(caption["start"], caption["text"]):
        digits = [DIGIT_WORDS.index(w) for w in str(text).split() if w in DIGIT_WORDS]
        for i, digit in enumerate(digits):
            second = int(start) + i
            if 0 <= second < len(shown):
                shown[second] = digit
    return shown


def demo_still(shown: list[int | None], start: float, end: float) -> np.ndarray:
    """(DEMO_CELL, DEMO_CELL * seconds, 3) uint8: the demo frames of the window's seconds side by side."""
    from msk_jax.demo.backbone import render_frame

    digits = _digit_pixels()
    first, last = int(start), max(int(start) + 1, int(np.ceil(end - 1e-6)))
    cells = [render_frame(digits[shown[s]] if s < len(shown) and shown[s] is not None else np.zeros(64), DEMO_CELL)
             for s in range(first, last)]
    return np.concatenate(cells, axis=1)
