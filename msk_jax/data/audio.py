"""Audio features in the layout of the original HowTo100M / MSR-VTT / YouCook2 spectrograms.

The pre-extracted audio that the original model reads is a 40-bin log-mel spectrogram at
100 frames per second of 16 kHz audio. It comes from AVLnet's `audio_to_spectrograms.py`
(`LoadAudio`, github.com/roudimit/AVLnet), which is the same recipe as DAVEnet's
`_LoadAudio` (github.com/dharwath/DAVEnet-pytorch, `dataloaders/image_caption_dataset.py`):

    y = y - y.mean()                                   # remove DC
    y = preemphasis(y, 0.97)                           # y[0], y[1:] - 0.97 * y[:-1]
    stft = librosa.stft(y, n_fft=400, hop_length=160, win_length=400,
                        window=scipy.signal.hamming)   # center=True, reflect padding
    spec = np.abs(stft) ** 2                           # power spectrogram
    mel_basis = librosa.filters.mel(16000, 400, n_mels=40, fmin=20)  # Slaney, norm='slaney'
    feats = librosa.power_to_db(np.dot(mel_basis, spec), ref=np.max)  # amin 1e-10, top_db 80

`log_mel_spectrogram` below reproduces that in numpy (no librosa): the same STFT framing
(frames = 1 + len // 160), a symmetric Hamming window (what `scipy.signal.hamming(400)`
returns), the Slaney-style mel filterbank (librosa's `htk=False`, area normalisation), and
`power_to_db` with `ref=max`, i.e. dB relative to the loudest bin, floored 80 dB below it.
"""

from __future__ import annotations

from math import gcd

import numpy as np

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
N_MELS = 40
FMIN = 20.0
PREEMPHASIS = 0.97
AMIN = 1e-10
TOP_DB = 80.0

# Slaney's auditory-toolbox mel scale (librosa htk=False): linear below 1 kHz, log above.
_F_SP = 200.0 / 3.0
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOG_STEP = np.log(6.4) / 27.0


def hz_to_mel(freqs: np.ndarray | float) -> np.ndarray:
    """Hz -> mel on the Slaney scale (librosa `hz_to_mel(htk=False)`)."""
    freqs = np.asarray(freqs, np.float64)
    linear = freqs / _F_SP
    log = _MIN_LOG_MEL + np.log(np.maximum(freqs, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOG_STEP
    return np.where(freqs >= _MIN_LOG_HZ, log, linear)


def mel_to_hz(mels: np.ndarray | float) -> np.ndarray:
    """mel -> Hz on the Slaney scale (librosa `mel_to_hz(htk=False)`)."""
    mels = np.asarray(mels, np.float64)
    linear = _F_SP * mels
    log = _MIN_LOG_HZ * np.exp(_LOG_STEP * (np.maximum(mels, _MIN_LOG_MEL) - _MIN_LOG_MEL))
    return np.where(mels >= _MIN_LOG_MEL, log, linear)


def mel_frequencies(n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """`n_mels` frequencies (Hz) equally spaced on the Slaney mel scale from fmin to fmax."""
    return mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels))


def mel_filterbank(sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS,
                   fmin: float = FMIN, fmax: float | None = None) -> np.ndarray:
    """Triangular mel filters (n_mels, 1 + n_fft // 2), as librosa `filters.mel(htk=False, norm='slaney')`."""
    fmax = sample_rate / 2.0 if fmax is None else fmax
    fft_freqs = np.linspace(0.0, sample_rate / 2.0, 1 + n_fft // 2)
    edges = mel_frequencies(n_mels + 2, fmin, fmax)
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]  # Slaney: constant area per filter
    return weights


def power_spectrogram(waveform: np.ndarray, n_fft: int = N_FFT, hop_length: int = HOP_LENGTH) -> np.ndarray:
    """|STFT|^2 (1 + n_fft // 2, 1 + len // hop) with a Hamming window, centred, reflect-padded."""
    pad = n_fft // 2
    padded = np.pad(waveform, pad, mode="reflect") if len(waveform) > 1 else np.pad(waveform, pad)
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop_length]
    window = np.hamming(n_fft)  # symmetric, == scipy.signal.hamming(n_fft)
    spectrum = np.fft.rfft(frames * window, axis=1)
    return (spectrum.real ** 2 + spectrum.imag ** 2).T


def power_to_db(power: np.ndarray, amin: float = AMIN, top_db: float | None = TOP_DB) -> np.ndarray:
    """librosa `power_to_db(S, ref=np.max)`: dB below the loudest bin, floored `top_db` lower."""
    db = 10.0 * np.log10(np.maximum(amin, power))
    db -= 10.0 * np.log10(max(amin, float(power.max())))
    if top_db is not None:
        db = np.maximum(db, db.max() - top_db)
    return db


def log_mel_spectrogram(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """40-bin log-mel spectrogram (40, 1 + len // 160) float32, as AVLnet's `LoadAudio`.

    25 ms Hamming window (n_fft 400), 10 ms hop (160) -> 100 frames/s at 16 kHz; DC removal and
    0.97 pre-emphasis first; Slaney mel filters from 20 Hz to sample_rate/2; dB relative to the
    spectrogram's maximum (`power_to_db(ref=np.max)`, floored 80 dB below it).
    """
    y = np.asarray(waveform, np.float64).reshape(-1)
    if y.size == 0:
        y = np.zeros(200)  # as the original: an empty file becomes 200 zeros
    y = y - y.mean()
    y = np.append(y[0], y[1:] - PREEMPHASIS * y[:-1])
    mel = mel_filterbank(sample_rate) @ power_spectrogram(y)
    return power_to_db(mel).astype(np.float32)


def resample(waveform: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Polyphase resampling (scipy `resample_poly`) from orig_sr to target_sr, float32."""
    waveform = np.asarray(waveform, np.float32)
    if orig_sr == target_sr:
        return waveform.copy()
    try:
        from scipy.signal import resample_poly
    except ImportError as e:
        raise ImportError("audio resampling needs scipy: pip install scipy") from e
    g = gcd(int(orig_sr), int(target_sr))
    return resample_poly(waveform, int(target_sr) // g, int(orig_sr) // g).astype(np.float32)
