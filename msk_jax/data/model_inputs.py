"""Model inputs from raw features, exactly as the original data code builds them.

- time <-> spectrogram frames (librosa's convention: 16 kHz, hop 160, n_fft 400 -> centre offset);
- text: ASR words (regex ``[\\w']+``), out-of-vocabulary words dropped, the first `max_words`
  word vectors, zero-padded with a mask (no word left: an empty, fully masked text);
- audio: the log-mel (bins, frames) cropped or zero-padded to a fixed frame count, with a mask;
- video: the 2D features nearest-upsampled to the 3D token count, each part L2-normalised and
  concatenated, the first `n_tokens` kept (zero-padded, masked).
"""

from __future__ import annotations

import numpy as np

from msk_jax.data.word2vec import WordVectors
from msk_jax.errors import DataError

SAMPLE_RATE = 16000
HOP_LENGTH = 160
N_FFT = 400
AUDIO_TOKEN_FRAMES = 64  # DAVEnet-v2 downsampling: one audio token per 64 frames


def time_to_frames(seconds) -> np.ndarray:
    """Seconds -> spectrogram frame index (may be negative before the first centre)."""
    samples = (np.asanyarray(seconds) * SAMPLE_RATE).astype(int)
    return np.floor((samples - N_FFT // 2) // HOP_LENGTH).astype(int)


def frames_to_time(frames) -> np.ndarray:
    return (np.asanyarray(frames) * HOP_LENGTH + N_FFT // 2).astype(int) / float(SAMPLE_RATE)



def _outputs(out, shapes):
    """Float32 zeros of `shapes`, or the given arrays (`out`, e.g. a batch's rows) to fill: the
    caller writes a prefix of rows (of columns, for audio) and zeroes the rest with `_pad`."""
    if out is None:
        return tuple(np.zeros(shape, np.float32) for shape in shapes)
    return out


def _pad(array: np.ndarray, n: int, axis: int = 0) -> None:
    """Zeroes what follows the first `n` entries along `axis`."""
    array[(slice(None),) * axis + (slice(n, None),)] = 0


def text_features(words: list[str], word_vectors: WordVectors, max_words: int, out=None):
    """(max_words, dim) vectors of the first in-vocabulary words, mask, and the raw text
    (written into `out` = (text, mask) when given)."""
    raw_text = " ".join(words)
    known = [w for w in words if w in word_vectors][:max_words]
    text, mask = _outputs(out, ((max_words, word_vectors.dim), (max_words,)))
    if known:
        text[: len(known)] = word_vectors.lookup(known)
        mask[: len(known)] = 1
    _pad(text, len(known))
    _pad(mask, len(known))
    return text, mask, raw_text


def audio_features(log_mel: np.ndarray, num_frames: int, out=None):
    """The first `num_frames` frames of a (bins, frames) log-mel, zero-padded, and the mask
    (written into `out` = (audio, mask) when given)."""
    audio, mask = _outputs(out, ((log_mel.shape[0], num_frames), (num_frames,)))
    n = min(log_mel.shape[1], num_frames)
    audio[:, :n] = log_mel[:, :n]
    mask[:n] = 1
    _pad(audio, n, axis=1)
    _pad(mask, n)
    return audio, mask


def l2_normalize_rows(x: np.ndarray, eps: float = 1e-12, out: np.ndarray | None = None) -> np.ndarray:
    """Rows divided by max(||row||, eps) (torch.nn.functional.normalize), in numpy. The norm is
    computed as `np.linalg.norm(x, axis=1)` computes it (the same bits), without its overhead;
    with `out`, the squares are kept there too (no temporary)."""
    squares = np.multiply(x, x, out=out)
    norm = np.sqrt(np.add.reduce(squares, axis=1, keepdims=True))
    return np.divide(x, np.maximum(norm, eps), out=out)


def nearest_indices(n: int, size: int) -> np.ndarray:
    """Row indices that resample `n` rows to `size` rows, nearest neighbour as torch computes it:
    floor(i * scale) with scale = n / size, both in float32."""
    scale = np.float32(n) / np.float32(size)
    return np.minimum(np.floor(np.arange(size, dtype=np.float32) * scale).astype(int), n - 1)


def nearest_resample(x: np.ndarray, size: int) -> np.ndarray:
    """Rows of x resampled to `size` rows (`nearest_indices`)."""
    return x[nearest_indices(len(x), size)]


def video_features(feat_2d: np.ndarray, feat_3d: np.ndarray, n_tokens: int):
    """(n_tokens, D2 + D3) video tokens and mask (the original's 'clip' strategy).

    Empty 2D or 3D features give an all-masked (empty) video.
    """
    if not (len(feat_2d) and len(feat_3d)):
        return video_tokens(feat_2d[:0], feat_3d[:0], n_tokens)
    n = min(len(feat_3d), n_tokens)
    return video_tokens(nearest_resample(feat_2d, len(feat_3d))[:n], feat_3d[:n], n_tokens)


def video_tokens(rows_2d: np.ndarray, rows_3d: np.ndarray, n_tokens: int, out=None, normalized: bool = False):
    """The tokens of `video_features` from its rows already aligned: the 2D rows resampled to the
    3D rows' times, both cut to at most `n_tokens` rows (what a windowed reader fetches).
    Written into `out` = (video, mask) when given. `normalized`: the rows are already
    `l2_normalize_rows`'d (a row's normalisation does not depend on the clip)."""
    d2 = rows_2d.shape[1]
    video, mask = _outputs(out, ((n_tokens, d2 + rows_3d.shape[1]), (n_tokens,)))
    n = len(rows_3d)
    if n:
        if normalized:
            video[:n, :d2], video[:n, d2:] = rows_2d, rows_3d
        else:
            l2_normalize_rows(np.asarray(rows_2d, np.float32), out=video[:n, :d2])
            l2_normalize_rows(np.asarray(rows_3d, np.float32), out=video[:n, d2:])
        mask[:n] = 1
    _pad(video, n)
    _pad(mask, n)
    return video, mask


def _check_numeric(path: str, array: np.ndarray, what: str) -> None:
    if array.dtype.kind not in "fiu":
        raise DataError(path, f"{what} must be numbers (float or int), got dtype {array.dtype}", "bad dtype")


def check_features(path: str, array: np.ndarray, dim: int | None, what: str) -> np.ndarray:
    """A (T, dim) feature matrix, or a DataError naming the file."""
    array = np.asarray(array)
    _check_numeric(path, array, what)
    if array.ndim != 2:
        raise DataError(path, f"{what} must be a (time, dim) matrix, got shape {array.shape}", "bad shape")
    if dim is not None and array.shape[1] != dim:
        raise DataError(path, f"{what} has dimension {array.shape[1]}, expected {dim}", "wrong dimension")
    if not np.all(np.isfinite(array)):
        raise DataError(path, f"{what} contains NaN or infinity", "non-finite")
    return array


def check_log_mel(path: str, log_mel: np.ndarray, bins: int | None) -> np.ndarray:
    """The log-mel (bins, frames) if usable (bins None: any number of bins), else a DataError."""
    log_mel = np.asarray(log_mel)
    _check_numeric(path, log_mel, "log-mel")
    if log_mel.ndim != 2 or (bins is not None and log_mel.shape[0] != bins):
        raise DataError(path, f"log-mel must be ({bins} bins, frames), got shape {log_mel.shape}",
                        "wrong dimension")
    if log_mel.shape[1] < AUDIO_TOKEN_FRAMES:
        raise DataError(path, f"audio has {log_mel.shape[1]} frames, shorter than one audio token "
                              f"({AUDIO_TOKEN_FRAMES} frames = {AUDIO_TOKEN_FRAMES / 100:.2f} s)", "audio too short")
    if not np.all(np.isfinite(log_mel)):
        raise DataError(path, "log-mel contains NaN or infinity", "non-finite")
    return log_mel
