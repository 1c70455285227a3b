"""Everything the model reads, built from `config.data`: the training source, the word vectors
and the evaluation sets, for every `config.data.source`.

- "files": the original layout (HowTo100M csv, caption.pickle, per-video npz features) and the
  evaluation pickles (`config.data.msrvtt`, `config.data.youcook2`);
- "store": a feature store (`msk_jax.data.feature_store`) and the evaluation pickles;
- "tfds": the built TFDS datasets in `config.data.tfds_data_dir` (`howto100m_features`, and
  `msrvtt_retrieval` / `youcook2_retrieval` for evaluation where they are built there; otherwise
  the configured pickles);
- "demo": the demo corpus, built on first use.

Zero-shot classification sets (`config.data.ucf101`, `hmdb51`, the demo's `digits`; format in
`msk_jax.data.classification_sets`) are read from their files with every source. Which
evaluation sets are built follows `config.evals` (`evaluator_entries`).

`train.py`, `evaluate.py` and the analysis tools all build their data here.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from msk_jax import storage
from msk_jax.data import batch
from msk_jax.data import classification_sets as cls_data
from msk_jax.data import eval_sets as eval_data
from msk_jax.data.howto100m import ClipSettings, HowTo100MReader
from msk_jax.data.word2vec import load_word2vec_binary
from msk_jax.errors import DataError

README_DATA = "see 'Data' in docs/training.md, or try the demo: --config=configs/howto.py:demo"
# Evaluation sets: (name, config.data field of the pickle, format, field of the complete size, TFDS dataset).
EVAL_SETS = (("MSRVTT", "msrvtt", eval_data.MSRVTT, "msrvtt_complete_size", "msrvtt_retrieval"),
             ("YouCook2", "youcook2", eval_data.YOUCOOK2, "youcook2_complete_size", "youcook2_retrieval"))
# Classification sets: config.data field -> (name, what the file is).
CLASSIFICATION_SETS = {"ucf101": ("UCF101", "the UCF101 classification set"),
                       "hmdb51": ("HMDB51", "the HMDB51 classification set"),
                       "digits": ("Digits", "the demo's spoken-digit classification set")}
# The original's classification windows (`val_cls_data_loaders`): 48 video tokens, 3072 STFT frames.
CLASSIFICATION_VIDEO_TOKENS, CLASSIFICATION_AUDIO_FRAMES = 48, 3072
EVALUATOR_KINDS = {"retrieval": {field for _, field, *_ in EVAL_SETS}, "classification": set(CLASSIFICATION_SETS)}


def clip_settings(config) -> ClipSettings:
    d = config.data
    return ClipSettings(min_time=d.min_time, n_video_tokens=d.n_video_tokens, fps_2d=d.fps_2d, fps_3d=d.fps_3d,
                        max_words=d.max_words, num_audio_frames=d.num_audio_frames, n_clips=d.n_clips,
                        text_audio_misaligned=d.text_audio_misaligned, audio_bins=config.model.audio_feat_dim)


def _require(path: str, what: str, field: str) -> str:
    if not path:
        raise FileNotFoundError(f"config.data.{field} is not set: the path of {what}; {README_DATA}.")
    if not storage.exists(path):
        raise FileNotFoundError(f"config.data.{field}='{path}' ({what}) does not exist; {README_DATA}.")
    return path


def demo_paths(config):
    """Builds the demo corpus if needed (cached) and returns its paths."""
    from msk_jax.demo.corpus import build_demo_corpus, default_root

    size = config.data.demo_size  # each size cached in a folder of its own (the default's: demo_corpus)
    root = config.data.demo_dir or default_root("demo_corpus" if size == "default" else f"demo_corpus_{size}")
    if storage.is_remote(root):
        raise DataError("config.data.demo_dir", f"'{root}' is a URL, but the demo corpus is built in a local cache "
                        "folder; to read a copy of it from a bucket, use config.data.source='files' with gs:// "
                        "paths (see docs/training.md)", "remote demo_dir")
    return build_demo_corpus(root, size=config.data.demo_size,
                             feature_dim=config.data.dim_2d, progress=jax.process_index() == 0)


@dataclasses.dataclass
class DataPaths:
    """Where the training data, word vectors and evaluation pickles are (from config.data)."""

    word_vectors: str
    msrvtt: str = ""
    youcook2: str = ""
    ucf101: str = ""
    hmdb51: str = ""
    digits: str = ""
    csv: str = ""
    caption: str = ""
    features_2d: str = ""
    features_3d: str = ""
    audio: str = ""


def data_paths(config, training: bool = True) -> DataPaths:
    """Resolves config.data (building the demo corpus when source='demo'); missing paths raise
    FileNotFoundError naming the field. `training=False` checks only what evaluation needs."""
    d = config.data
    if d.source == "demo":
        corpus = demo_paths(config)
        # The demo corpus has no UCF101 or HMDB51: those come from config.data as with other sources.
        return DataPaths(**{field.name: getattr(corpus, field.name, None) or d.get(field.name, "")
                            for field in dataclasses.fields(DataPaths)})
    if d.source not in ("files", "tfds", "store"):
        raise ValueError(f"config.data.source='{d.source}': expected 'files', 'tfds', 'store' or 'demo'.")
    paths = DataPaths(_require(d.word_vectors, "the word2vec binary word vectors", "word_vectors"),
                      msrvtt=d.msrvtt, youcook2=d.youcook2,
                      **{field: d.get(field, "") for field in CLASSIFICATION_SETS})
    if training and d.source == "files":
        paths.csv = _require(d.csv, "the HowTo100M csv", "csv")
        paths.caption = _require(d.caption, "caption.pickle", "caption")
        paths.features_2d = _require(d.features_2d, "the 2D feature root", "features_2d")
        paths.features_3d = _require(d.features_3d, "the 3D feature root (the folder of the <id>_3d.npz "
                                     "files; the same as features_2d if both kinds are there)", "features_3d")
        paths.audio = _require(d.audio, "the log-mel root", "audio")
    return paths


def load_words(config, paths: DataPaths):
    words = load_word2vec_binary(paths.word_vectors)
    if words.dim != config.model.text_dim:
        raise ValueError(f"word vectors '{paths.word_vectors}' are {words.dim}-d but config.model.text_dim is "
                         f"{config.model.text_dim}.")
    return words


def build_training_source(config, paths: DataPaths, words):
    settings = clip_settings(config)
    d = config.data
    if d.source == "tfds":
        from msk_jax.data.tfds_builders import TFDSVideoSource
        return TFDSVideoSource.load(_require(d.tfds_data_dir, "the built TFDS datasets", "tfds_data_dir"),
                                    words, settings)
    if d.source == "store":
        from msk_jax.data.feature_store import FeatureStoreSource
        return FeatureStoreSource(_require(d.store_dir, "the feature store", "store_dir"), settings,
                                  dim_2d=d.dim_2d, dim_3d=d.dim_3d, word_dim=words.dim)
    return HowTo100MReader(paths.csv, paths.caption, paths.features_2d, paths.audio, words,
                           features_3d=paths.features_3d, settings=settings, dim_2d=d.dim_2d, dim_3d=d.dim_3d)


def _tfds_eval_set_built(data_dir: str, dataset: str) -> bool:
    return bool(data_dir) and storage.isdir(storage.join(data_dir, dataset))


def build_eval_sets(config, paths: DataPaths, words) -> dict:
    """{name: EvalSet} for the evaluation sets that are configured: with source="tfds", those
    built in `config.data.tfds_data_dir`, else the pickles `config.data.msrvtt` / `youcook2`."""
    d = config.data
    evals = {}
    for name, field, fmt, complete_field, dataset in EVAL_SETS:
        complete = d[complete_field]
        options = dict(max_words=d.max_words, dim_2d=d.dim_2d, dim_3d=d.dim_3d,
                       n_video_tokens=d.eval_video_tokens or None, num_audio_frames=d.eval_audio_frames or None)
        if d.source == "tfds" and _tfds_eval_set_built(d.tfds_data_dir, dataset):
            from msk_jax.data.tfds_builders import read_tfds_eval_set

            evals[name] = read_tfds_eval_set(dataset, d.tfds_data_dir, fmt, words, complete_dataset_size=complete,
                                             **options)
            continue
        path = getattr(paths, field)
        if not path:
            continue
        entries, dropped = eval_data.load_eval_entries(path, fmt)
        evals[name] = eval_data.build_eval_set(
            entries, fmt, words, source=path, dropped=dropped, **options,
            # complete < 0: the file is the whole set (entries without features still count).
            complete_dataset_size=complete if complete >= 0 else len(entries) + dropped)
    return evals


@dataclasses.dataclass(frozen=True)
class EvaluatorEntry:
    """One `config.evals` entry: its name, kind, data fields (and their set names), period and
    kind-specific options."""

    name: str
    kind: str
    fields: tuple[str, ...]
    every_steps: int
    options: dict

    @property
    def set_names(self) -> list[str]:
        return [set_name(field) for field in self.fields]


def set_name(field: str) -> str:
    """The name an evaluation set is reported under ('msrvtt' -> 'MSRVTT')."""
    names = {f: name for name, f, *_ in EVAL_SETS}
    names.update({f: name for f, (name, _) in CLASSIFICATION_SETS.items()})
    return names[field]


# A configuration without `config.evals` (a file of its own that predates the field) evaluates
# retrieval on the MSR-VTT and YouCook2 pickles.
_DEFAULT_EVALS = {"retrieval": {"kind": "retrieval", "sets": "msrvtt,youcook2", "every_steps": 0}}


def evaluator_entries(config, names=None) -> list[EvaluatorEntry]:
    """The evaluators of `config.evals` (those of `names` only, when given), retrieval first;
    a mistake (an unknown kind or set, a set listed twice) is a DataError naming the field."""
    evals = config.get("evals") if hasattr(config, "get") else None
    evals = _DEFAULT_EVALS if evals is None else evals
    known = list(evals.keys())
    if names is not None:
        unknown = [n for n in names if n not in known]
        if unknown:
            raise DataError("--evals", f"no evaluator {', '.join(unknown)} in config.evals (configured: "
                                       f"{', '.join(known) or 'none'})", "unknown evaluator")
    entries, owner = [], {}
    for name in known:
        if names is not None and name not in names:
            continue
        entry = evals[name]
        kind = entry.get("kind", "")
        if kind not in EVALUATOR_KINDS:
            raise DataError(f"config.evals.{name}.kind", f"'{kind}' is not an evaluator; expected one of "
                                                         f"{', '.join(EVALUATOR_KINDS)}", "unknown evaluator")
        fields = tuple(f.strip() for f in str(entry.get("sets", "")).split(",") if f.strip())
        for field in fields:
            if field not in EVALUATOR_KINDS[kind]:
                raise DataError(f"config.evals.{name}.sets", f"names '{field}', which is not a {kind} set "
                                f"({', '.join(sorted(EVALUATOR_KINDS[kind]))})", "unknown set")
            if field in owner:
                raise DataError(f"config.evals.{name}.sets", f"names '{field}', which config.evals.{owner[field]} "
                                                             "evaluates already", "set listed twice")
            owner[field] = name
        options = {k: v for k, v in entry.items() if k not in ("kind", "sets", "every_steps")}
        entries.append(EvaluatorEntry(name, kind, fields, int(entry.get("every_steps", 0)), options))
    return sorted(entries, key=lambda e: list(EVALUATOR_KINDS).index(e.kind))


def build_classification_sets(config, paths: DataPaths, words, entry: EvaluatorEntry) -> dict:
    """{name: ClassificationSet} of the entry's sets whose path is set (an empty path is
    skipped, a missing file stops naming its field)."""
    d, options = config.data, entry.options
    templates = options.get("templates", ("{}",))
    templates = (templates,) if isinstance(templates, str) else tuple(templates)
    if not templates or any("{}" not in t for t in templates):
        raise DataError(f"config.evals.{entry.name}.templates", f"{list(templates)}: each template must hold '{{}}' "
                        "(where the class name goes)", "bad template")
    sets = {}
    for field in entry.fields:
        path = getattr(paths, field)
        if not path:
            continue
        name, what = CLASSIFICATION_SETS[field]
        classes, videos, order = cls_data.load_entries(path, what, field, dim_2d=d.dim_2d, dim_3d=d.dim_3d,
                                                       audio_bins=config.model.audio_feat_dim)
        sets[name] = cls_data.build_classification_set(
            name, classes, videos, words, source=path,
            n_video_tokens=d.eval_video_tokens or CLASSIFICATION_VIDEO_TOKENS,
            num_audio_frames=d.eval_audio_frames or CLASSIFICATION_AUDIO_FRAMES, video_dim=config.model.video_dim,
            max_words=d.max_words, audio_bins=config.model.audio_feat_dim, templates=templates,
            windows=int(options.get("windows", 1)), split_order=order, dim_2d=d.dim_2d, dim_3d=d.dim_3d)
        if sets[name].unknown_words and jax.process_index() == 0:
            missing = "; ".join(f"{c}: {', '.join(w)}" for c, w in sets[name].unknown_words.items())
            print(f"{name}: class-name words without a vector, left out: {missing}", flush=True)
    return sets


def build_evaluation_sets(config, paths: DataPaths, words, names=None) -> dict:
    """{name: EvalSet or ClassificationSet} of the evaluators of `config.evals` (those of
    `names` only), in their order: what `msk_jax.evaluators.build` runs."""
    sets = {}
    entries = evaluator_entries(config, names)
    if any(e.kind == "retrieval" for e in entries):
        retrieval = build_eval_sets(config, paths, words)
        for entry in entries:
            if entry.kind == "retrieval":
                sets.update({name: retrieval[name] for name in entry.set_names if name in retrieval})
    for entry in entries:
        if entry.kind == "classification":
            sets.update(build_classification_sets(config, paths, words, entry))
    return sets


def build_data(config):
    """(training video source, word vectors, {name: evaluation set}) from config.data and
    config.evals."""
    paths = data_paths(config)
    words = load_words(config, paths)
    return build_training_source(config, paths, words), words, build_evaluation_sets(config, paths, words)


def sample_batch(config, word_dim: int) -> dict[str, np.ndarray]:
    """Zeros with the shapes of one global training batch."""
    return batch.zeros(batch.config_shapes(config, word_dim))
