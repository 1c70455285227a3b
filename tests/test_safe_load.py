"""Downloaded files load without running code: a pickle whose objects would write a file when
unpickled stops every reader of caption.pickle, the evaluation pickles and a store's
captions.pickle with one line naming the file and the type, writing nothing; the real formats
(the demo corpus's, numpy's layouts of every protocol) still load."""

import collections
import os
import pickle

import numpy as np
import pytest

from msk_jax import safe_load
from msk_jax.data import eval_sets
from msk_jax.data.feature_store import FeatureStoreSource, build_feature_store
from msk_jax.data.howto100m import HowTo100MReader, load_captions
from msk_jax.data.word2vec import load_word2vec_binary
from msk_jax.demo.corpus import corpus_paths
from msk_jax.errors import DataError
from tests.paper_config import paper_clip_settings


class WritesAFile:
    """Unpickled, it would write `target` (through `open(...).write`, via `eval`)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return eval, (f"open({self.target!r}, 'w').write('ran')",)


class SystemCall:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def crafted(path, payload):
    """A pickle shaped like the real file at `path`, with `payload` inside one of its values."""
    with open(path, "wb") as f:
        pickle.dump(payload, f)


@pytest.fixture
def target(tmp_path):
    return str(tmp_path / "written_by_pickle")


def _refused(err, path, name):
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(str(path)) and name in message, message
    assert isinstance(err.value, DataError) and err.value.name == name


@pytest.mark.parametrize("evil, name", [(WritesAFile, "builtins.eval"), (SystemCall, "posix.system")])
def test_caption_pickle_that_runs_code_is_refused(tmp_path, target, evil, name):
    path = tmp_path / "caption.pickle"
    crafted(path, {"v1": {"start": np.zeros(1), "end": np.ones(1), "text": [evil(target)]}})
    with pytest.raises(safe_load.UnsafePickleError) as err:
        load_captions(str(path))
    _refused(err, path, name)
    assert not os.path.exists(target)


@pytest.mark.parametrize("fmt", [eval_sets.MSRVTT, eval_sets.YOUCOOK2])
def test_evaluation_pickle_that_runs_code_is_refused(tmp_path, target, fmt):
    path = tmp_path / "eval.pkl"
    crafted(path, [{"id": "c0", fmt.key_2d: np.zeros((2, 4)), fmt.key_3d: WritesAFile(target),
                    "audio": np.zeros((40, 100)), fmt.caption_key: "one two"}])
    with pytest.raises(safe_load.UnsafePickleError) as err:
        eval_sets.load_eval_entries(str(path), fmt)
    _refused(err, path, "builtins.eval")
    assert not os.path.exists(target)


def test_store_captions_that_run_code_are_refused(tiny_corpus, tmp_path, target):
    paths = corpus_paths(tiny_corpus)
    words = load_word2vec_binary(paths.word_vectors)
    settings = paper_clip_settings(n_clips=2, num_audio_frames=256)
    reader = HowTo100MReader(paths.csv, paths.caption, paths.features_2d, paths.audio, words,
                             features_3d=paths.features_3d, settings=settings)
    store = str(tmp_path / "store")
    build_feature_store(reader, store, progress=False)
    assert len(FeatureStoreSource(store, settings).captions) == len(reader)  # the store's own file loads
    captions = os.path.join(store, "captions.pickle")
    crafted(captions, {"video_0000": SystemCall(target)})
    with pytest.raises(safe_load.UnsafePickleError) as err:
        FeatureStoreSource(store, settings)
    _refused(err, captions, "posix.system")
    assert not os.path.exists(target)


def test_pandas_objects_are_refused(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "caption.pickle"
    crafted(path, {"v1": pd.DataFrame({"start": [0.0], "end": [1.0], "text": ["a"]})})
    with pytest.raises(safe_load.UnsafePickleError) as err:
        load_captions(str(path))
    assert "pandas." in err.value.name


def test_demo_corpus_files_still_load(tiny_corpus):
    """caption.pickle and both evaluation pickles of the demo corpus, through the readers."""
    paths = corpus_paths(tiny_corpus)
    with open(paths.caption, "rb") as f:
        expected = pickle.load(f)
    captions = load_captions(paths.caption)
    assert captions.keys() == expected.keys()
    for vid, caption in captions.items():
        assert caption["text"] == expected[vid]["text"]
        np.testing.assert_array_equal(caption["start"], expected[vid]["start"])
    for path, fmt in ((paths.msrvtt, eval_sets.MSRVTT), (paths.youcook2, eval_sets.YOUCOOK2)):
        entries, dropped = eval_sets.load_eval_entries(path, fmt)
        assert entries and entries[0]["features_2d"].ndim == 2 and isinstance(entries[0]["caption"], str)
        assert dropped == (eval_sets.YOUCOOK2 is fmt) * 3


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_data_types_load_in_every_protocol(protocol):
    value = {"floats": np.arange(6.0).reshape(2, 3), "texts": np.array(["a b", "c"], dtype=object),
             "unicode": np.array(["ab", "c"]), "scalar": np.float32(1.5), "int": np.int64(3),
             "record": np.zeros(2, dtype=[("a", "<f4"), ("b", "<i8")]), "fortran": np.asfortranarray(np.eye(3)),
             "ordered": collections.OrderedDict(a=[1, 2.0, None, True]), "bytes": b"\x00\xff",
             "set": {1, 2}, "frozen": frozenset({"x"}), "complex": 1 + 2j, "tuple": (1, "a")}
    loaded = safe_load.loads(pickle.dumps(value, protocol=protocol), "value")
    assert repr(loaded) == repr(value)


def test_torch_checkpoints_load_weights_only(tmp_path):
    """.pth files go through torch.load(weights_only=True), never the unrestricted unpickler."""
    torch = pytest.importorskip("torch")
    from msk_jax import convert

    path = str(tmp_path / "model_best.pth")
    # EAO's layout: weights, optimiser state, the configuration as a dict, numpy metrics.
    torch.save({"arch": "FusionModel", "epoch": 3, "step": 10, "state_dict": {"module.w": torch.ones(2)},
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
                "monitor_best": np.float64(0.5), "config": {"arch": {"type": "FusionModel"}}}, path)
    assert list(convert.load_torch_state_dict(path)) == ["w"]
    target = str(tmp_path / "written")
    torch.save({"state_dict": {"w": torch.ones(2)}, "hook": SystemCall(target)}, path)
    with pytest.raises(safe_load.UnsafePickleError) as err:
        convert.load_torch_state_dict(path)
    assert "system" in err.value.name and path in str(err.value)
    assert not os.path.exists(target)
