"""Video decoding as the HowTo100M feature extractor does it, through FFmpeg's own filters (PyAV).

The original extractor (github.com/antoine77340/video_feature_extractor, `video_loader.py`)
runs, per video and per backbone, the ffmpeg graph

    fps=<rate>, scale=<w>:<h> [, crop=<size>:<size>:<x>:<y>]  -> rawvideo rgb24

with the output size from the shorter side: (h, w) -> (int(h * size / w), size) when h >= w,
else (size, int(w * size / h)) (truncation), and for the centre crop x = int((w - size) / 2),
y = int((h - size) / 2):

- 2D (ResNet-152): fps=1, shorter side 224, no crop: one RGB frame per second;
- 3D (ResNeXt-101): fps=24, shorter side 112, centre crop 112x112.

The same filters run here in an `av.filter.Graph` (buffer -> fps -> scale -> crop -> format=rgb24
-> buffersink), so frame selection (timestamps rounded to the nearest output tick, the last input
frame at or before each tick) and scaling (the scale filter's bicubic default) are FFmpeg's. The
video is decoded once; every decoded frame is pushed into each graph. Audio is resampled by
FFmpeg's resampler to 16 kHz mono float, the input of `msk_jax.data.audio.log_mel_spectrogram`
(AVLnet's spectrograms).

`stream_video` hands each output frame to a callback as it leaves its graph, so a caller that
consumes frames in batches (the extractor) holds a batch, not the video; `decode_video` collects
them all (tests, short clips). Only local files are read, and only through FFmpeg's `file`
protocol and the demuxers of common video containers (`ALLOWED_FORMATS`): a playlist or a
concat list is refused before its demuxer runs, so no input makes FFmpeg open a URL or another
file. A video beyond `Limits` (duration, pixels per frame, aspect ratio) is refused from its
header, before any frame is decoded, and a frame or a timestamp beyond them while decoding
stops it (a header can lie).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import numpy as np

from msk_jax.errors import DataError

FPS_2D, SIZE_2D = 1, 224
FPS_3D, SIZE_3D = 24, 112
CLIP_FRAMES = 16
AUDIO_RATE = 16000
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".ogv", ".3gp")
# FFmpeg demuxers that may read a video (names as in `ffmpeg -demuxers`; "mov" is mp4/mov/m4v/3gp,
# "mpeg" and "mpegvideo" the program and elementary streams of .mpg files). Every other demuxer is
# refused, among them those that open further files or URLs (hls, dash, concat, sdp/rtp, image
# sequences) or read no video file (tty, lavfi).
ALLOWED_FORMATS = ("mov", "mp4", "matroska", "webm", "avi", "mpeg", "mpegts", "mpegvideo", "flv", "ogg")
ALLOWED_FORMATS_TEXT = "mp4/mov, matroska/webm, avi, MPEG program/transport/elementary stream, flv, ogg"
# Slack on the duration bound while decoding: the last frame's timestamp may pass the header's
# duration by a frame or an audio packet.
DECODE_SLACK_SECONDS = 1.0


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds on a video: its duration in seconds, the pixels of one frame (width * height), and
    its aspect ratio (longer side / shorter side). The frames the backbones read scale with the
    aspect ratio (the shorter side becomes 224, so a 1-pixel-wide frame becomes 224 x 224 * height
    pixels), and the audio held for the spectrogram with the duration."""

    max_seconds: float = 4 * 3600.0
    max_pixels: int = 4096 * 4096
    max_aspect: float = 10.0

    def __post_init__(self):
        for name in ("max_seconds", "max_pixels", "max_aspect"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be positive")
        if self.max_aspect < 1:
            raise ValueError(f"max_aspect={self.max_aspect}: must be at least 1 (longer side / shorter side)")


def output_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) with the shorter side `size` and the other int(other * size / shorter)."""
    if height >= width:
        return int(height * size / width), size
    return size, int(width * size / height)


def centre_crop_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """(x, y) of the original's centre crop: int((w - size) / 2), int((h - size) / 2)."""
    return int((width - size) / 2.0), int((height - size) / 2.0)


@dataclasses.dataclass
class DecodedVideo:
    """One video as the backbones and the spectrogram read it."""

    path: str
    frames_2d: np.ndarray | None   # (N2, H, W, 3) uint8 at 1/s, shorter side 224
    frames_3d: np.ndarray | None   # (N3, 112, 112, 3) uint8 at 24/s
    waveform: np.ndarray | None    # (samples,) float32 at 16 kHz, mono; empty without an audio stream
    duration: float                # seconds (container duration, else the decoded streams')
    width: int = 0
    height: int = 0


class _FrameGraph:
    """buffer -> fps -> scale -> [crop] -> format=rgb24 -> buffersink for one video stream."""

    def __init__(self, stream, fps: int, size: int, crop: bool, max_frames: int, path: str):
        import av

        # The frames a video within the duration bound can give: the fps filter fills gaps between
        # timestamps with copies, so a damaged timestamp (or none) could otherwise make it emit
        # frames without end.
        self.max_frames, self.path = max_frames, path
        height, width = stream.codec_context.height, stream.codec_context.width
        out_h, out_w = output_size(height, width, size)
        self.graph = av.filter.Graph()
        nodes = [self.graph.add_buffer(template=stream),
                 self.graph.add("fps", f"fps={fps}"),
                 self.graph.add("scale", f"{out_w}:{out_h}")]
        if crop:
            x, y = centre_crop_offsets(out_h, out_w, size)
            nodes.append(self.graph.add("crop", f"{size}:{size}:{x}:{y}"))
        nodes += [self.graph.add("format", "pix_fmts=rgb24"), self.graph.add("buffersink")]
        for a, b in zip(nodes, nodes[1:]):
            a.link_to(b)
        self.graph.configure()
        self.count = 0

    def push(self, frame, sink: Callable[[np.ndarray], None]) -> None:
        """Pushes a decoded frame (None: the end) and hands every frame the graph puts out to `sink`."""
        import av

        self.graph.push(frame)
        while True:
            try:
                out = self.graph.pull()
            except (av.BlockingIOError, av.EOFError):
                return
            self.count += 1
            if self.count > self.max_frames:
                raise DataError(self.path, f"gives more than {self.max_frames:,} frames at its frame rate, beyond the "
                                           "duration bound (--max_duration); damaged timestamps?", "too long")
            try:
                sink(out.to_ndarray(format="rgb24"))
            except Exception as err:
                raise _SinkError(err) from err


class _SinkError(Exception):
    """An exception of a frame callback, carried through the decoding loop's handlers so that it
    reaches the caller as itself, not as an undecodable video."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


@dataclasses.dataclass
class StreamedVideo:
    """What `stream_video` returns once every frame has gone to the callbacks."""

    path: str
    frames_2d: int                 # frames handed to the 2D callback
    frames_3d: int                 # frames handed to the 3D callback
    waveform: np.ndarray | None    # (samples,) float32 at 16 kHz, mono; empty without an audio stream
    duration: float                # seconds (container duration, else the decoded streams')
    width: int = 0
    height: int = 0


def _reason(err: Exception) -> str:
    """One line for an FFmpeg or OS error (PyAV appends FFmpeg's last log lines to its message)."""
    text = getattr(err, "strerror", None) or str(err)
    text = " ".join(str(text).split())
    return f"{type(err).__name__}: {text[:200]}"


def open_video(path: str):
    """The PyAV input container of the local file `path`, through FFmpeg's `file` protocol only and
    with a demuxer of `ALLOWED_FORMATS` only. Raises DataError(path, reason) for a URL, a missing
    file or a device, another container format, or a file FFmpeg cannot open."""
    import av

    if "://" in path:
        raise DataError(path, "is a URL: only local video files are read (copy it to a local disk first)",
                        "not a local file")
    if not os.path.isfile(path):  # also refuses devices and pipes (/dev/stdin, a fifo)
        raise DataError(path, "file does not exist", "missing video")
    options = {"protocol_whitelist": "file", "format_whitelist": ",".join(ALLOWED_FORMATS)}
    try:
        # An absolute path never reads as "protocol:rest" (e.g. a file named "concat:a|b").
        return av.open(os.path.abspath(path), container_options=options)
    except av.ArgumentError as err:
        # What FFmpeg answers when the probed demuxer is not on the format whitelist.
        raise DataError(path, f"is not in an allowed container format ({ALLOWED_FORMATS_TEXT}) "
                              f"({_reason(err)})", "container not allowed") from err
    except (av.FFmpegError, OSError, ValueError) as err:
        raise DataError(path, f"cannot be opened ({_reason(err)})", "undecodable") from err


def header_duration(container) -> float | None:
    """Seconds of a container by its header (the container's, else its longest stream's); None
    when the header does not say."""
    import av

    if container.duration and container.duration > 0:
        return float(container.duration / av.time_base)
    known = [float(s.duration * s.time_base) for s in container.streams
             if s.duration and s.time_base and s.duration > 0]
    return max(known) if known else None


def _size_problem(width: int, height: int, limits: Limits) -> str | None:
    if width * height > limits.max_pixels:
        return (f"frames of {width}x{height} ({width * height:,} pixels) exceed the bound of "
                f"{limits.max_pixels:,} pixels (--max_pixels)")
    ratio = max(width, height) / max(min(width, height), 1)
    if ratio > limits.max_aspect:
        return (f"frames of {width}x{height} have aspect ratio {ratio:.4g}:1, beyond the bound of "
                f"{limits.max_aspect:g}:1 (--max_aspect)")
    return None


def check_header(container, path: str, limits: Limits, frames: bool) -> None:
    """Raises DataError when the header of `container` puts it beyond `limits` (the frame size
    only when `frames` are to be decoded)."""
    seconds = header_duration(container)
    if seconds is not None and seconds > limits.max_seconds:
        raise DataError(path, f"lasts {seconds:,.1f} s by its header, beyond the bound of {limits.max_seconds:,g} s "
                              "(--max_duration)", "too long")
    video = container.streams.video[0] if container.streams.video else None
    if frames and video is not None:
        if video.codec_context is None:  # a stream whose codec FFmpeg does not know
            raise DataError(path, "video stream has a codec FFmpeg cannot decode", "undecodable")
        width, height = video.codec_context.width, video.codec_context.height
        if width <= 0 or height <= 0:
            raise DataError(path, "video stream has no frame size", "undecodable")
        problem = _size_problem(width, height, limits)
        if problem:
            raise DataError(path, f"{problem}, by its header", "frame size")


def stream_video(path: str, on_2d: Callable[[np.ndarray], None] | None = None,
                 on_3d: Callable[[np.ndarray], None] | None = None, *, audio: bool = True,
                 limits: Limits | None = None) -> StreamedVideo:
    """Decodes `path` once, handing each 2D frame ((H, W, 3) uint8 at 1/s, shorter side 224) to
    `on_2d` and each 3D frame ((112, 112, 3) uint8 at 24/s) to `on_3d` as it is decoded (a None
    callback: that graph is not built); returns the 16 kHz waveform and the frame counts.

    Raises DataError(path, reason) when the file cannot be opened or decoded, is beyond `limits`
    (default `Limits()`), or has no video stream while frames are asked for. An exception of a
    callback propagates as itself."""
    limits = Limits() if limits is None else limits
    container = open_video(path)
    try:
        with container:
            return _stream(container, path, on_2d, on_3d, audio, limits)
    except DataError:
        raise
    except _SinkError as err:
        error = err.error
    except Exception as err:  # FFmpeg and PyAV meet every kind of error on a damaged file
        raise DataError(path, f"cannot be decoded ({_reason(err)})", "undecodable") from err
    raise error


def _stream(container, path: str, on_2d, on_3d, want_audio: bool, limits: Limits) -> StreamedVideo:
    import av

    want_frames = on_2d is not None or on_3d is not None
    video = container.streams.video[0] if container.streams.video else None
    sound = container.streams.audio[0] if (want_audio and container.streams.audio) else None
    if video is None and want_frames:
        raise DataError(path, "has no video stream", "no video stream")
    check_header(container, path, limits, want_frames)
    graphs = {}
    if video is not None:
        video.thread_type = "AUTO"
        if on_2d is not None:
            graphs["2d"] = (_FrameGraph(video, FPS_2D, SIZE_2D, crop=False, path=path,
                                        max_frames=int((limits.max_seconds + DECODE_SLACK_SECONDS + 1) * FPS_2D)), on_2d)
        if on_3d is not None:
            graphs["3d"] = (_FrameGraph(video, FPS_3D, SIZE_3D, crop=True, path=path,
                                        max_frames=int((limits.max_seconds + DECODE_SLACK_SECONDS + 1) * FPS_3D)), on_3d)
    resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE) if sound is not None else None
    chunks: list[np.ndarray] = []
    streams = [s for s in (video, sound) if s is not None and (s is not video or graphs)]
    last_time = 0.0
    first_time = None  # timestamps need not start at 0 (an MPEG-TS capture starts where it was cut)
    decoded_video = 0
    for packet in container.demux(*streams):
        for frame in packet.decode():
            if frame.time is not None:
                last_time = max(last_time, float(frame.time))
                first_time = float(frame.time) if first_time is None else min(first_time, float(frame.time))
                if last_time - first_time > limits.max_seconds + DECODE_SLACK_SECONDS:
                    raise DataError(path, f"runs past the bound of {limits.max_seconds:,g} s (--max_duration) "
                                          "while decoding", "too long")
            if isinstance(frame, av.VideoFrame):
                decoded_video += 1
                problem = _size_problem(frame.width, frame.height, limits)
                if problem:
                    raise DataError(path, f"{problem}, at {last_time:.1f} s", "frame size")
                for graph, sink in graphs.values():
                    graph.push(frame, sink)
            else:
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
    for graph, sink in graphs.values():
        graph.push(None, sink)
    if resampler is not None:
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    if graphs and decoded_video == 0:
        raise DataError(path, "no video frame could be decoded", "undecodable")
    duration = float(container.duration / av.time_base) if container.duration else last_time
    context = video.codec_context if video is not None else None
    h, w = (context.height, context.width) if context is not None else (0, 0)
    waveform = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    del chunks
    return StreamedVideo(path=path, frames_2d=graphs["2d"][0].count if "2d" in graphs else 0,
                         frames_3d=graphs["3d"][0].count if "3d" in graphs else 0,
                         waveform=waveform if want_audio else None, duration=duration, width=w, height=h)


def decode_video(path: str, *, frames_2d: bool = True, frames_3d: bool = True, audio: bool = True,
                 limits: Limits | None = None) -> DecodedVideo:
    """Decodes `path` once into the 2D frames, 3D frames and 16 kHz waveform asked for, all held
    in memory (`stream_video` hands them over one by one instead).

    Raises DataError(path, reason) when the file cannot be opened or decoded, is beyond `limits`,
    or has no video stream while frames are asked for."""
    held_2d: list[np.ndarray] = []
    held_3d: list[np.ndarray] = []
    streamed = stream_video(path, held_2d.append if frames_2d else None, held_3d.append if frames_3d else None,
                            audio=audio, limits=limits)

    def stack(frames, size):
        return np.stack(frames) if frames else np.zeros((0, *size, 3), np.uint8)

    h, w = streamed.height, streamed.width
    return DecodedVideo(
        path=path,
        frames_2d=stack(held_2d, output_size(h, w, SIZE_2D) if w and h else (0, 0)) if frames_2d else None,
        frames_3d=stack(held_3d, (SIZE_3D, SIZE_3D)) if frames_3d else None,
        waveform=streamed.waveform, duration=streamed.duration, width=w, height=h)


def clips_3d(frames: np.ndarray, clip_frames: int = CLIP_FRAMES) -> np.ndarray:
    """(N, H, W, 3) frames -> (ceil(N / 16), 16, H, W, 3) non-overlapping clips; the last partial
    clip is padded with zero frames (raw zeros, before any normalisation), as the original."""
    n = len(frames)
    pad = (-n) % clip_frames
    if pad:
        frames = np.concatenate([frames, np.zeros((pad,) + frames.shape[1:], frames.dtype)])
    return frames.reshape((-1, clip_frames) + frames.shape[1:])


def decode_audio(path: str, limits: Limits | None = None) -> np.ndarray:
    """The 16 kHz mono waveform of `path` (empty if it has no audio stream)."""
    return stream_video(path, audio=True, limits=limits).waveform
