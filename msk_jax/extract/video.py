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
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from msk_jax.data.features import DataError

FPS_2D, SIZE_2D = 1, 224
FPS_3D, SIZE_3D = 24, 112
CLIP_FRAMES = 16
AUDIO_RATE = 16000
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".ogv", ".3gp")


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

    def __init__(self, stream, fps: int, size: int, crop: bool):
        import av

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
        self.frames: list[np.ndarray] = []

    def push(self, frame) -> None:
        import av

        self.graph.push(frame)
        while True:
            try:
                out = self.graph.pull()
            except (av.BlockingIOError, av.EOFError):
                return
            self.frames.append(out.to_ndarray(format="rgb24"))

    def array(self, size: tuple[int, int] | None) -> np.ndarray:
        if self.frames:
            return np.stack(self.frames)
        h, w = size if size is not None else (0, 0)
        return np.zeros((0, h, w, 3), np.uint8)


def decode_video(path: str, *, frames_2d: bool = True, frames_3d: bool = True, audio: bool = True
                 ) -> DecodedVideo:
    """Decodes `path` once into the 2D frames, 3D frames and 16 kHz waveform asked for.

    Raises DataError(path, reason) when the file cannot be opened or decoded, or has no video
    stream while frames are asked for."""
    import av

    if not os.path.isfile(path):
        raise DataError(path, "file does not exist", "missing video")
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError, ValueError) as err:
        raise DataError(path, f"cannot be opened ({type(err).__name__}: {err})", "undecodable") from err
    try:
        with container:
            return _decode(container, path, frames_2d, frames_3d, audio)
    except DataError:
        raise
    except (av.FFmpegError, OSError, ValueError, RuntimeError) as err:
        raise DataError(path, f"cannot be decoded ({type(err).__name__}: {err})", "undecodable") from err


def _decode(container, path: str, want_2d: bool, want_3d: bool, want_audio: bool) -> DecodedVideo:
    import av

    video = container.streams.video[0] if container.streams.video else None
    sound = container.streams.audio[0] if (want_audio and container.streams.audio) else None
    if video is None and (want_2d or want_3d):
        raise DataError(path, "has no video stream", "no video stream")
    graphs = {}
    if video is not None:
        video.thread_type = "AUTO"
        if video.codec_context.width <= 0 or video.codec_context.height <= 0:
            raise DataError(path, "video stream has no frame size", "undecodable")
        if want_2d:
            graphs["2d"] = _FrameGraph(video, FPS_2D, SIZE_2D, crop=False)
        if want_3d:
            graphs["3d"] = _FrameGraph(video, FPS_3D, SIZE_3D, crop=True)
    resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE) if sound is not None else None
    chunks: list[np.ndarray] = []
    streams = [s for s in (video, sound) if s is not None and (s is not video or graphs)]
    last_time = 0.0
    decoded_video = 0
    for packet in container.demux(*streams):
        for frame in packet.decode():
            if frame.time is not None:
                last_time = max(last_time, float(frame.time))
            if isinstance(frame, av.VideoFrame):
                decoded_video += 1
                for graph in graphs.values():
                    graph.push(frame)
            else:
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
    for graph in graphs.values():
        graph.push(None)
    if resampler is not None:
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    if graphs and decoded_video == 0:
        raise DataError(path, "no video frame could be decoded", "undecodable")
    duration = float(container.duration / av.time_base) if container.duration else last_time
    h, w = (video.codec_context.height, video.codec_context.width) if video is not None else (0, 0)
    waveform = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    return DecodedVideo(
        path=path,
        frames_2d=graphs["2d"].array(output_size(h, w, SIZE_2D)) if "2d" in graphs else None,
        frames_3d=graphs["3d"].array((SIZE_3D, SIZE_3D)) if "3d" in graphs else None,
        waveform=waveform if want_audio else None, duration=duration, width=w, height=h)


def clips_3d(frames: np.ndarray, clip_frames: int = CLIP_FRAMES) -> np.ndarray:
    """(N, H, W, 3) frames -> (ceil(N / 16), 16, H, W, 3) non-overlapping clips; the last partial
    clip is padded with zero frames (raw zeros, before any normalisation), as the original."""
    n = len(frames)
    pad = (-n) % clip_frames
    if pad:
        frames = np.concatenate([frames, np.zeros((pad,) + frames.shape[1:], frames.dtype)])
    return frames.reshape((-1, clip_frames) + frames.shape[1:])


def decode_audio(path: str) -> np.ndarray:
    """The 16 kHz mono waveform of `path` (empty if it has no audio stream)."""
    return decode_video(path, frames_2d=False, frames_3d=False, audio=True).waveform
