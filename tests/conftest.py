"""Shared test fixtures: the golden folder, the tiny demo corpus and its uninterrupted training
run, and a Cloud Storage bucket on localhost.

Every JAX of the session, this process's and the processes the tests start (training runs,
notebook kernels, helpers), compiles with few XLA optimisations (small shapes compile far longer
than they run) into one persistent compilation cache: `$MSK_JAX_TEST_CACHE` when set (.ci/run
keeps one beside its virtual environment), else a new folder per session.

The suite runs on a worker per core (pytest-xdist, see pyproject.toml), each test file on one
worker. What several files share (the tiny corpus and its uninterrupted run) is made once per
session by the first worker that needs it, under a lock, in a folder all workers see
(`build_once`); the tests that use a training run are marked `slow`.
"""

import fcntl
import json
import os
import socket
import subprocess
import tempfile

import jax
import numpy as np
import pytest

# Set before the test workers start (pytest-xdist), so that they inherit it.
JAX_CACHE = os.environ.setdefault("MSK_JAX_TEST_CACHE", tempfile.mkdtemp(prefix="msk_jax_test_cache_"))
os.environ.update(JAX_DISABLE_MOST_OPTIMIZATIONS="1", JAX_COMPILATION_CACHE_DIR=JAX_CACHE,
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
jax.config.update("jax_disable_most_optimizations", True)
jax.config.update("jax_compilation_cache_dir", JAX_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_DIR = os.environ.get("MSK_GOLDEN_DIR", os.path.join(REPO_ROOT, "..", "shared", "golden"))


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drops what each test file compiled once it is done (the next file reloads what it needs
    from the persistent compilation cache). On CPU every kernel holds 3 memory mappings, and a
    worker keeping all its files' programs would approach Linux's limit of 65,530, where LLVM
    aborts the process (train.release_compiled_programs does the same for a training run)."""
    yield
    jax.clear_caches()


@pytest.fixture(scope="session")
def golden_dir():
    if not os.path.isdir(GOLDEN_DIR):
        pytest.skip(f"golden folder not found at {GOLDEN_DIR} (set MSK_GOLDEN_DIR)")
    return GOLDEN_DIR


TINY_MODEL = dict(video_dim=12, text_dim=10, audio_feat_dim=40, davenet_layers=(1, 1, 1, 1, 1, 1),
                  davenet_widths=(4, 4, 4, 4, 4, 4, 8), davenet_kernel=9, embed_dim=16, num_heads=2,
                  mlp_ratio=1.0, depth=1, projection_dim=24, num_anchors=4)


def tiny_batch(seed, batch=6, video_tokens=3, text_tokens=4, frames=128, empty_text=(0,), empty_audio=(1,)):
    """A random batch for TINY_MODEL in the original layout; some clips have an empty modality."""
    rng = np.random.default_rng(seed)
    text_mask = (rng.uniform(size=(batch, text_tokens)) < 0.7).astype(np.float32)
    text_mask[:, 0] = 1
    audio_mask = np.ones((batch, frames), np.float32)
    audio_mask[:, frames - frames // 4:] = 0  # padded tail
    for i in empty_text:
        text_mask[i] = 0
    for i in empty_audio:
        audio_mask[i] = 0
    return {
        "video": rng.normal(size=(batch, video_tokens, TINY_MODEL["video_dim"])).astype(np.float32),
        "video_mask": np.ones((batch, video_tokens), np.float32),
        "text": rng.normal(size=(batch, text_tokens, TINY_MODEL["text_dim"])).astype(np.float32),
        "text_mask": text_mask,
        "audio": rng.normal(size=(batch, 40, frames)).astype(np.float32),
        "audio_mask": audio_mask,
    }


def build_once(tmp_path_factory, name: str, build) -> str:
    """The folder `name`, made by `build(folder)` once per session however many workers ask:
    the first one builds it (the others wait on a lock), in the session's temporary folder that
    every worker sees."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder, done = shared / name, shared / f"{name}.done"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not done.exists():
                folder.mkdir(exist_ok=True)
                build(str(folder))
                done.touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """The tiny demo corpus with 16-d video features, built once per test session."""
    from msk_jax.demo.corpus import build_demo_corpus

    return build_once(tmp_path_factory, "tiny_demo",
                      lambda root: build_demo_corpus(root, size="tiny", feature_dim=16, progress=False))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_env(**extra) -> dict:
    """The environment of a process started by a test (the session's, see above), unbuffered."""
    return dict(os.environ, PYTHONUNBUFFERED="1", **extra)


UNINTERRUPTED_STEPS = 15


@pytest.fixture(scope="session")
def uninterrupted_run(tiny_corpus, tmp_path_factory):
    """The tiny demo trained for UNINTERRUPTED_STEPS steps in one go by `python -m msk_jax.main`
    (local workdir, checkpoints every 3 steps): the run that interrupted, resumed, bucket and
    multi-host runs must reproduce."""
    from tests.train_fixtures import main_args

    def train(folder):
        subprocess.run(main_args(os.path.join(folder, "run"), tiny_corpus, UNINTERRUPTED_STEPS), cwd=REPO_ROOT,
                       env=run_env(), check=True, capture_output=True)

    return os.path.join(build_once(tmp_path_factory, "uninterrupted", train), "run")


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """The small demo corpus (40 training videos, 100 clips per test set), 32-d video features,
    built once per test session."""
    from msk_jax.demo.corpus import build_demo_corpus

    return build_once(tmp_path_factory, "small_demo",
                      lambda root: build_demo_corpus(root, size="small", feature_dim=32, progress=False))


@pytest.fixture(scope="session")
def trained_run(small_corpus, tmp_path_factory):
    """A narrow model trained on the small corpus until it retrieves far above chance
    (tests/train_fixtures.py `trained_config`), once per test session by the first worker that
    needs it: (config, workdir, its final evaluation as written in eval/). The evaluation,
    conversion, search and analysis tests read its checkpoints (steps 40 and 80)."""
    from msk_jax import train
    from tests.train_fixtures import trained_config

    config = trained_config(small_corpus)
    folder = build_once(tmp_path_factory, "trained",
                        lambda root: train.train_and_evaluate(config, os.path.join(root, "run")))
    workdir = os.path.join(folder, "run")
    with open(os.path.join(workdir, "eval", f"step_{config.num_train_steps}.json")) as f:
        return config, workdir, json.load(f)


BUCKET = "msk-test"


@pytest.fixture(scope="session")
def gcs_bucket():
    """'gs://msk-test' on a Google Cloud Storage API served on localhost by gcp-storage-emulator
    (with object generations, tests/gcs_server.py).

    The standard clients are pointed at it only through their standard environment variables,
    set for this process and the processes it starts: STORAGE_EMULATOR_HOST (gcsfs,
    google-cloud-storage), TENSORSTORE_GCS_HTTP_URL (tensorstore, i.e. orbax),
    CLOUD_STORAGE_EMULATOR_ENDPOINT (google-cloud-cpp, i.e. array_record), and
    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (gcsfs would first probe a gRPC API the emulator lacks)."""
    pytest.importorskip("gcp_storage_emulator")
    from msk_jax.bench.bucket import LocalBucket

    with LocalBucket(BUCKET) as bucket:
        yield bucket.url


# What makes a test slow (README: Tests): a training run of the session, a bucket, the small corpus.
SLOW_FIXTURES = ("uninterrupted_run", "trained_run", "gcs_bucket", "small_corpus")


# The longest files first, alternating those that wait for the session's uninterrupted run with
# those that do not: each worker takes one file at a time in this order (--dist loadfile), so a
# long file taken last would leave the other worker idle until it ends.
LONGEST_FIRST = ("test_multihost.py", "test_experiments.py", "test_cloud.py", "test_train_step.py",
                 "test_stop_and_save.py", "test_parity.py", "test_train.py", "test_search.py", "test_video_search.py",
                 "test_extract.py", "test_hostile_input.py", "test_bench.py", "test_sharding.py", "test_evaluate.py",
                 "test_backbones.py", "test_notebooks.py")


def _file_rank(item) -> int:
    name = item.path.name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    """Marks the users of the slow fixtures `slow`; puts the longest files first."""
    for item in items:
        if any(f in getattr(item, "fixturenames", ()) for f in SLOW_FIXTURES):
            item.add_marker(pytest.mark.slow)
    items.sort(key=_file_rank)  # stable: a file's tests keep their order

