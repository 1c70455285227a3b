"""TensorFlow-Datasets builders for the original feature formats (no TensorFlow needed).

Build once, then train from array_record shards:

    python -m msk_jax.tools.build_tfds howto100m_features --manual_dir=DIR --data_dir=OUT

(the same as `tfds build --imports=msk_jax.data.tfds_builders howto100m_features --manual_dir=DIR
--data_dir=OUT --file_format=array_record`, whose command line needs TensorFlow installed).

- `howto100m_features`: one example per video (2D/3D features, log-mel, ASR segments); clips are
  still sampled at training time, as in the original. manual_dir holds `howto_train.csv`,
  `caption.pickle`, `features_2d/`, `features_3d/` and `audio/` (symlinks are fine).
  Videos that cannot be read are skipped, counted and listed at the end of the build. The
  metadata's `caption_words` lists the words of the captions (what the word vectors of a
  training run are restricted to).
- `msrvtt_retrieval` / `youcook2_retrieval`: the evaluation pickles (`msrvtt_jsfusion_test.pkl`,
  `youcook_val.pkl` in manual_dir), one example per entry.

:class:`TFDSVideoSource` and :func:`read_tfds_eval_set` read them back for the pipeline and
the evaluator.
"""

from __future__ import annotations

import logging

import numpy as np
import tensorflow_datasets as tfds

from msk_jax import storage
from msk_jax.data import eval_sets, howto100m, word2vec
from msk_jax.data.word2vec import WordVectors, tokenize
from msk_jax.errors import DataError

_MATRIX = dict(shape=(None, None), dtype=np.float32, encoding="bytes")


def _video_features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "path": tfds.features.Text(),
        "features_2d": tfds.features.Tensor(**_MATRIX),
        "features_3d": tfds.features.Tensor(**_MATRIX),
        "log_mel": tfds.features.Tensor(**_MATRIX),
        "caption_start": tfds.features.Tensor(shape=(None,), dtype=np.float64),
        "caption_end": tfds.features.Tensor(shape=(None,), dtype=np.float64),
        "caption_text": tfds.features.Sequence(tfds.features.Text()),
    })


class Howto100mFeatures(tfds.core.GeneratorBasedBuilder):
    """HowTo100M pre-extracted features, one example per video."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Video 2D/3D features, log-mel spectrogram and ASR segments per video."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place in manual_dir: howto_train.csv (column 'path'), caption.pickle, and the folders "
        "features_2d/, features_3d/, audio/ in the original layout (<path>/<id>_2d.npz, "
        "<path>/<id>_3d.npz, <path>/<id>_spec.npz).")

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(features=_video_features(), supervised_keys=None,
                                              metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(str(dl_manager.manual_dir))}

    def _generate_examples(self, root: str):
        reader = howto100m.HowTo100MReader(
            storage.join(root, "howto_train.csv"), storage.join(root, "caption.pickle"),
            storage.join(root, "features_2d"), storage.join(root, "audio"), word_vectors=None,
            features_3d=storage.join(root, "features_3d"))
        skipped, words = [], set()
        for index in range(len(reader)):
            try:
                video = reader.video(index)
            except DataError as err:
                skipped.append(str(err))
                continue
            words.update(w for text in video.caption["text"] for w in tokenize(text))
            yield video.id, {
                "id": video.id, "path": reader.paths[index],
                "features_2d": video.features_2d.astype(np.float32),
                "features_3d": video.features_3d.astype(np.float32),
                "log_mel": video.log_mel.astype(np.float32),
                "caption_start": video.caption["start"], "caption_end": video.caption["end"],
                "caption_text": [str(t) for t in video.caption["text"]],
            }
        self.info.metadata["caption_words"] = sorted(words)  # written with the dataset's info, after this
        if skipped:
            logging.warning("howto100m_features: skipped %d of %d videos:\n  %s", len(skipped), len(reader),
                            "\n  ".join(skipped))


class _RetrievalBuilder(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Evaluation entries of EAO's data.tar pickles."}
    FORMAT: eval_sets.EvalFormat
    PICKLE: str

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({
            "id": tfds.features.Text(), "features_2d": tfds.features.Tensor(**_MATRIX),
            "features_3d": tfds.features.Tensor(**_MATRIX), "audio": tfds.features.Tensor(**_MATRIX),
            "caption": tfds.features.Text(), "order": np.int64})
        return self.dataset_info_from_configs(features=features, metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        entries, dropped = eval_sets.load_eval_entries(storage.join(str(dl_manager.manual_dir), self.PICKLE),
                                                       self.FORMAT)
        self.info.metadata["dropped"] = dropped
        return {"test": self._generate_examples(entries)}

    def _generate_examples(self, entries):
        for order, entry in enumerate(entries):
            yield f"{order:06d}", {
                "id": entry["id"], "caption": entry["caption"], "order": order,
                "features_2d": np.asarray(entry["features_2d"], np.float32),
                "features_3d": np.asarray(entry["features_3d"], np.float32),
                "audio": np.asarray(entry["audio"], np.float32)}


class MsrvttRetrieval(_RetrievalBuilder):
    """MSR-VTT 1k-A test (EAO's msrvtt_jsfusion_test.pkl)."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = "Place msrvtt_jsfusion_test.pkl (from EAO's data.tar) in manual_dir."
    FORMAT = eval_sets.MSRVTT
    PICKLE = "msrvtt_jsfusion_test.pkl"


class Youcook2Retrieval(_RetrievalBuilder):
    """YouCook2 validation clips (EAO's youcook_val.pkl)."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = "Place youcook_val.pkl (from EAO's data.tar) in manual_dir."
    FORMAT = eval_sets.YOUCOOK2
    PICKLE = "youcook_val.pkl"


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class TFDSVideoSource:
    """A built `howto100m_features` split as a pipeline VideoSource (random access).

    Made by `load`, it pickles as the dataset's folder, name and split, its settings and the
    folder of its caption vocabulary's word vectors (`word2vec.caption_vectors`: the words the
    build recorded, or for a dataset built without them those of one pass over its captions;
    built on the first pickling and kept in the cache folder), so a worker process opens the
    dataset itself and loads only those vectors. Made from a data source object, it pickles that
    object and the vectors of the captions' words."""

    def __init__(self, data_source, word_vectors: WordVectors, settings: howto100m.ClipSettings, *,
                 location: tuple[str, str, str] | None = None, info_path: str | None = None,
                 caption_words: list[str] | None = None):
        """location: (data_dir, name, split) that `load` opened; info_path: the dataset's
        dataset_info.json (what identifies the build); caption_words: the build's vocabulary."""
        self.data, self.word_vectors, self.settings = data_source, word_vectors, settings
        self.location, self.info_path, self.vocabulary = location, info_path, caption_words
        self._caption_words: str | None = None

    @classmethod
    def load(cls, data_dir: str, word_vectors: WordVectors, settings: howto100m.ClipSettings,
             name: str = "howto100m_features", split: str = "train") -> "TFDSVideoSource":
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
        metadata = builder.info.metadata
        words = metadata["caption_words"] if metadata is not None and "caption_words" in metadata.keys() else None
        return cls(builder.as_data_source(split=split), word_vectors, settings, location=(data_dir, name, split),
                   info_path=storage.join(str(builder.data_dir), "dataset_info.json"), caption_words=words)

    def caption_texts(self):
        """The caption texts whose words clips can use: the build's vocabulary, else every
        example's captions (one pass over the split)."""
        if self.vocabulary is not None:
            yield from self.vocabulary
            return
        logging.warning("TFDSVideoSource: this build of %s records no caption words (built before they were); "
                        "reading every example's captions once (cached)", self.location or "a data source")
        for index in range(len(self.data)):
            yield from (_text(t) for t in self.data[index]["caption_text"])

    def caption_words(self) -> str | None:
        """The folder of the vectors of the captions' words (`word2vec.load_vectors`), built once."""
        if self.word_vectors is None:
            return None
        if self._caption_words is None:
            key = None if self.info_path is None else [word2vec.file_identity(self.info_path), self.location[2]]
            self._caption_words = word2vec.caption_vectors(self.word_vectors, key, self.caption_texts)
        return self._caption_words

    def __getstate__(self):
        state = {"settings": self.settings, "words": self.caption_words(), "location": self.location}
        if self.location is None:
            state["data"] = self.data
        return state

    def __setstate__(self, state):
        words = None if state["words"] is None else word2vec.load_vectors(state["words"])
        if state["location"] is not None:
            data_dir, name, split = state["location"]
            self.__init__(tfds.builder(name, data_dir=data_dir, file_format="array_record").as_data_source(split=split),
                          words, state["settings"], location=state["location"])
        else:
            self.__init__(state["data"], words, state["settings"])
        self._caption_words = state["words"]

    def __len__(self) -> int:
        return len(self.data)

    def sample_clips(self, index: int, rng: np.random.Generator, out=None) -> dict[str, np.ndarray]:
        example = self.data[index]
        video = howto100m.Video(
            id=_text(example["id"]), features_2d=example["features_2d"], features_3d=example["features_3d"],
            log_mel=example["log_mel"],
            caption={"start": example["caption_start"], "end": example["caption_end"],
                     "text": [_text(t) for t in example["caption_text"]]})
        return howto100m.sample_clips(video, _text(example["path"]), self.word_vectors, self.settings, rng, out=out)


def read_tfds_eval_set(name: str, data_dir: str, fmt: eval_sets.EvalFormat, word_vectors: WordVectors,
                       complete_dataset_size: int | None = None, **kwargs) -> eval_sets.EvalSet:
    """A built retrieval dataset as an EvalSet, in the pickle's order (complete_dataset_size
    None: the format's; < 0: the dataset's entries, those without features included)."""
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    source = builder.as_data_source(split="test")
    examples = sorted((source[i] for i in range(len(source))), key=lambda e: int(e["order"]))
    entries = [{"id": _text(e["id"]), "features_2d": e["features_2d"], "features_3d": e["features_3d"],
                "audio": e["audio"], "caption": _text(e["caption"])} for e in examples]
    dropped = int(builder.info.metadata.get("dropped", 0)) if builder.info.metadata else 0
    if complete_dataset_size is not None and complete_dataset_size < 0:
        complete_dataset_size = len(entries) + dropped
    return eval_sets.build_eval_set(entries, fmt, word_vectors, source=f"tfds:{name}", dropped=dropped,
                                    complete_dataset_size=complete_dataset_size, **kwargs)



BUILDERS = {"howto100m_features": Howto100mFeatures, "msrvtt_retrieval": MsrvttRetrieval,
            "youcook2_retrieval": Youcook2Retrieval}


def build(name: str, manual_dir: str, data_dir: str) -> str:
    """Builds one dataset as array_record shards; returns its folder."""
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset '{name}'; choose from {sorted(BUILDERS)}.")
    if not storage.isdir(manual_dir):
        raise FileNotFoundError(f"manual_dir '{manual_dir}' does not exist.")
    builder = BUILDERS[name](data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return str(builder.data_path)
