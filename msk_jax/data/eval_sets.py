"""Zero-shot evaluation sets in the pickle format of EAO's data.tar (MSR-VTT and YouCook2).

Each pickle is a list of dicts. MSR-VTT (`msrvtt_jsfusion_test.pkl`): `id`, `2d` (T2, 2048),
`3d` (T3, 2048), `audio` (40, frames), `eval_caption` (str). YouCook2 (`youcook_val.pkl`): `id`,
`2d_full`, `3d_full`, `audio`, `caption` (str); entries without `2d_full` are dropped (the
original counts them as misses). Recalls are over the complete dataset size: 1000 clips for the
MSR-VTT 1k-A test (968 present) and 3350 for YouCook2 (3339 present).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from msk_jax import errors, safe_load, storage
from msk_jax.data import batch, model_inputs, word2vec
from msk_jax.data.word2vec import WordVectors


@dataclasses.dataclass(frozen=True)
class EvalFormat:
    """Field names and sizes of one evaluation pickle format."""

    name: str
    key_2d: str
    key_3d: str
    caption_key: str
    complete_dataset_size: int
    n_video_tokens: int
    num_audio_frames: int


MSRVTT = EvalFormat("MSRVTT", "2d", "3d", "eval_caption", 1000, 48, 3072)
YOUCOOK2 = EvalFormat("YouCook2", "2d_full", "3d_full", "caption", 3350, 72, 4608)
FORMATS = {"msrvtt": MSRVTT, "youcook2": YOUCOOK2}


@dataclasses.dataclass
class EvalSet:
    """An evaluation set as model inputs (stacked numpy arrays) plus ids and captions."""

    name: str
    batch: dict[str, np.ndarray]  # video, video_mask, audio, audio_mask, text, text_mask
    ids: list[str]
    raw_text: list[str]
    complete_dataset_size: int
    dropped: int = 0  # entries without features (counted as misses)

    def __len__(self) -> int:
        return len(self.ids)


def load_eval_entries(path: str, fmt: EvalFormat) -> tuple[list[dict], int]:
    """The pickle's usable entries as {'id', 'features_2d', 'features_3d', 'audio', 'caption'}
    and the number dropped for lacking 2D features."""
    if not storage.exists(path):
        raise FileNotFoundError(f"{fmt.name} evaluation pickle '{path}' does not exist.")
    with storage.open_read(path) as f:
        entries = safe_load.load(f, path)  # only data types, never code; a DataError names the file
    if not isinstance(entries, list):
        raise errors.DataError(path, f"must hold a list of dicts, got {type(entries).__name__}", "bad file")
    kept = [e for e in entries if isinstance(e, dict) and fmt.key_2d in e]
    normalized = []
    for i, entry in enumerate(kept):
        where = f"{path} [entry {i}, id {entry.get('id')!r}]"
        for key in ("id", fmt.key_3d, "audio", fmt.caption_key):
            if key not in entry:
                raise errors.DataError(where, f"has no '{key}' field", "bad entry")
        caption = entry[fmt.caption_key]
        if isinstance(caption, (list, tuple)):  # training-style pickles hold a list
            caption = caption[0]
        normalized.append({"id": str(entry["id"]), "features_2d": entry[fmt.key_2d],
                           "features_3d": entry[fmt.key_3d], "audio": entry["audio"], "caption": str(caption)})
    return normalized, len(entries) - len(kept)


def build_eval_set(entries: list[dict], fmt: EvalFormat, word_vectors: WordVectors, *, source: str,
                   max_words: int = 20, n_video_tokens: int | None = None, num_audio_frames: int | None = None,
                   complete_dataset_size: int | None = None, audio_bins: int = 40, dim_2d: int | None = None,
                   dim_3d: int | None = None, dropped: int = 0) -> EvalSet:
    """Model inputs from normalised entries; a bad entry raises a DataError naming `source`,
    the entry index and its id (evaluation sets are never silently shortened)."""
    if not entries:
        raise errors.DataError(source, f"has no entry with '{fmt.key_2d}' features: an empty evaluation set", "empty")
    n_tokens = n_video_tokens or fmt.n_video_tokens
    n_frames = num_audio_frames or fmt.num_audio_frames
    columns = {k: [] for k in batch.KEYS}
    raw_texts = []
    for i, entry in enumerate(entries):
        where = f"{source} [entry {i}, id {entry['id']!r}]"
        f2d = model_inputs.check_features(where, entry["features_2d"], dim_2d, f"'{fmt.key_2d}'")
        f3d = model_inputs.check_features(where, entry["features_3d"], dim_3d, f"'{fmt.key_3d}'")
        log_mel = model_inputs.check_log_mel(where, entry["audio"], audio_bins)
        video, video_mask = model_inputs.video_features(f2d, f3d, n_tokens)
        audio, audio_mask = model_inputs.audio_features(log_mel, n_frames)
        text, text_mask, raw_text = model_inputs.text_features(word2vec.tokenize(entry["caption"]), word_vectors, max_words)
        for key, value in zip(batch.KEYS, (video, video_mask, audio, audio_mask, text, text_mask)):
            columns[key].append(value)
        raw_texts.append(raw_text)
    complete = complete_dataset_size if complete_dataset_size is not None else fmt.complete_dataset_size
    if complete < len(entries):
        raise errors.DataError(source, f"has {len(entries)} entries but complete_dataset_size is {complete}", "bad size")
    return EvalSet(fmt.name, {k: np.stack(v) for k, v in columns.items()}, [e["id"] for e in entries],
                   raw_texts, complete, dropped=dropped)

