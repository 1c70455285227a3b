"""Mutation fuzzing of the readers of third-party files: each reader is fed mutated copies of a real
file (bytes flipped, cut, inserted, size fields forged, chunks repeated) and must give a result or
a one-line `DataError` naming the file: never another exception, and never memory beyond a bound
(the process's peak resident memory, checked after each input, and an address-space limit).

    python -m tests.fuzz_readers OUT_DIR [--seconds S] [--kinds caption,npz,...]

Prints one line per reader (inputs tried, results, errors) and, for a violation, the input's seed
and what happened; exits 1 on any violation. Deterministic for a given seed and count.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import random
import resource
import shutil
import sys
import time

import numpy as np

MEMORY_BOUND = 512 << 20       # how far the peak resident memory may rise over the fuzzing's start
ADDRESS_SPACE = 16 << 30       # the process's limit: a reader reserving beyond it fails loudly


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to three random mutations of `data`."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(7)
        at = rng.randrange(max(1, len(out)))
        if kind == 0:  # flip bytes
            for _ in range(rng.randint(1, 8)):
                out[rng.randrange(len(out))] = rng.randrange(256)
        elif kind == 1:  # cut
            del out[at:]
        elif kind == 2:  # insert random bytes
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif kind == 3:  # a forged 32-bit size or count: a huge little-endian number
            out[at:at + 4] = rng.choice([0xFFFFFFF0, 0x7FFFFFFF, 0x40000000, 0x10000000]).to_bytes(4, "little")
        elif kind == 4:  # a chunk repeated
            chunk = out[at:at + rng.randint(1, 64)]
            out[at:at] = chunk * rng.randint(2, 50)
        elif kind == 5:  # a range zeroed
            out[at:at + rng.randint(1, 64)] = bytes(len(out[at:at + rng.randint(1, 64)]))
        else:  # a digit string made huge (a pickle's or a header's number)
            digits = [i for i, b in enumerate(out) if 48 <= b <= 57]
            if digits:
                i = rng.choice(digits)
                out[i:i + 1] = b"9" * rng.randint(8, 20)
        if not out:
            out = bytearray(b"\0")
    return bytes(out)


# --- the real files and their readers -----------------------------------------------------------

def _captions() -> bytes:
    caption = {"start": np.array([1.0, 6.0]), "end": np.array([5.0, 9.5]), "text": ["a b", "c d"]}
    return pickle.dumps({"v1": caption, "v2": dict(caption, text=["e", "p q"]), "v3": None}, protocol=4)


def _read_captions(path: str):
    from msk_jax.data import howto100m

    captions = howto100m.load_captions(path)
    checked = []
    for video_id, caption in captions.items():
        try:
            checked.append(howto100m.check_caption(path, str(video_id), caption))
        except _data_error():
            pass
    return checked


def _npz(compressed: bool) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(
        buffer, features=np.random.default_rng(0).uniform(size=(12, 8)).astype(np.float32))
    return buffer.getvalue()


def _read_npz(path: str):
    from msk_jax.data import howto100m, model_inputs

    return model_inputs.check_features(path, howto100m.read_feature_npz(path, "features"), None, "2D features")


def _eval_pickle() -> bytes:
    rng = np.random.default_rng(0)
    entries = [{"id": f"clip{i}", "2d": rng.uniform(size=(4, 4)).astype(np.float32),
                "3d": rng.uniform(size=(6, 6)).astype(np.float32), "audio": rng.normal(size=(40, 400)).astype(np.float32),
                "eval_caption": f"a b x{i}"} for i in range(3)]
    return pickle.dumps(entries, protocol=2)


def _read_eval(path: str):
    from msk_jax.data import eval_sets

    return eval_sets.load_eval_entries(path, eval_sets.MSRVTT)


def _word2vec() -> bytes:
    out = io.BytesIO()
    out.write(b"3 4\n")
    for i, word in enumerate(["a", "bb", "ccc"]):
        out.write(word.encode() + b" " + np.full(4, i, "<f4").tobytes() + b"\n")
    return out.getvalue()


def _read_word2vec(path: str):
    from msk_jax.data.word2vec import load_word2vec_binary

    return load_word2vec_binary(path)


# The paper's clip settings with short clips (JAX, which the configuration imports, does not load
# under this process's address-space limit).
SETTINGS = dict(min_time=8.0, n_video_tokens=12, fps_2d=1.0, fps_3d=1.5, max_words=20, num_audio_frames=256,
                n_clips=2, text_audio_misaligned=True, audio_bins=40)


class _Store:
    """A feature store built once from a tiny corpus; inputs replace its index.npz."""

    def __init__(self, folder: str):
        from msk_jax.data.feature_store import build_feature_store
        from msk_jax.data.howto100m import ClipSettings, HowTo100MReader
        from msk_jax.data.word2vec import load_word2vec_binary
        from tests.data_fixtures import segments, write_howto

        corpus = os.path.join(folder, "corpus")
        write_howto(corpus, [(f"demo/v{i}", 10 + i, segments((1.0, 5.0, "a b"), (6.0, 9.0, "c d")), {})
                             for i in range(3)])
        self.settings = ClipSettings(**SETTINGS)
        reader = HowTo100MReader(
            os.path.join(corpus, "howto_train.csv"), os.path.join(corpus, "caption.pickle"),
            os.path.join(corpus, "features_2d"), os.path.join(corpus, "audio"),
            load_word2vec_binary(os.path.join(corpus, "word2vec.bin")), features_3d=os.path.join(corpus, "features_3d"),
            settings=self.settings)
        self.folder = os.path.join(folder, "store")
        shutil.rmtree(self.folder, ignore_errors=True)
        build_feature_store(reader, self.folder, progress=False)
        self.index = open(os.path.join(self.folder, "index.npz"), "rb").read()

    def read(self, path: str):
        from msk_jax.data.feature_store import FeatureStoreSource

        os.replace(path, os.path.join(self.folder, "index.npz"))
        source = FeatureStoreSource(self.folder, self.settings)
        done = []
        for i in range(len(source)):
            try:
                done.append(source.sample_clips(i, np.random.default_rng(i)))
            except _data_error():
                pass
        return done


def _video(folder: str) -> bytes:
    import av

    path = os.path.join(folder, "base.mp4")
    container = av.open(path, "w")
    stream = container.add_stream("mpeg4", rate=24)
    stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
    for i in range(12):
        frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * 20, np.uint8), format="rgb24")
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))
    container.close()
    return open(path, "rb").read()


def _read_video(path: str):
    from msk_jax.extract import video

    # The duration bound as the extractor's flag sets it: a forged timestamp may make a decoder fill
    # up to that much time with frames, which is the bound's cost, not a reader's fault.
    return video.stream_video(path, lambda frame: None, lambda frame: None, audio=True,
                              limits=video.Limits(max_seconds=60))


def _data_error():
    from msk_jax.errors import DataError

    return DataError


# --- the loop -----------------------------------------------------------------------------------

def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def fuzz(kind: str, base: bytes, read, folder: str, seconds: float, seed: int, suffix: str,
         names: str | None = None, start_rss: int = 0) -> tuple[dict, list]:
    """Mutated copies of `base` through `read` for `seconds`: (counts, violations). An error must
    name the input (or start with `names`, for a reader that moves it)."""
    DataError = _data_error()
    counts, violations, rng = {"inputs": 0, "results": 0, "errors": 0}, [], random.Random(seed)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        case = rng.randrange(1 << 30)
        data = mutate(base, random.Random(case))
        path = os.path.join(folder, f"{kind}-input{suffix}")
        with open(path, "wb") as f:
            f.write(data)
        try:
            read(path)
            counts["results"] += 1
        except DataError as err:
            text = str(err)
            if "\n" in text or not text.startswith(names or path):
                violations.append(f"{kind} case {case}: error not one line naming the file: {text[:300]!r}")
            counts["errors"] += 1
        except BaseException as err:  # noqa: BLE001 - what the fuzzing looks for
            violations.append(f"{kind} case {case}: {type(err).__name__}: {str(err)[:300]}")
        if _peak_rss() > start_rss + MEMORY_BOUND:
            violations.append(f"{kind} case {case}: resident memory rose to {_peak_rss():,} bytes for a "
                              f"{len(data):,}-byte input")
            start_rss = _peak_rss()  # one report per rise
        counts["inputs"] += 1
    return counts, violations


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--seconds", type=float, default=4.0, help="per reader")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default="caption,npz,eval,word2vec,store,video")
    args = parser.parse_args(argv)
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    os.makedirs(args.folder, exist_ok=True)
    start_rss = _peak_rss()
    readers = {
        "caption": lambda: (_captions(), _read_captions, ".pickle"),
        "npz": lambda: (_npz(False), _read_npz, ".npz"),
        "npz_compressed": lambda: (_npz(True), _read_npz, ".npz"),
        "eval": lambda: (_eval_pickle(), _read_eval, ".pkl"),
        "word2vec": lambda: (_word2vec(), _read_word2vec, ".bin"),
        "video": lambda: (_video(args.folder), _read_video, ".mp4"),
    }
    kinds = args.kinds.split(",")
    if "npz" in kinds:
        kinds.append("npz_compressed")
    failed = []
    for kind in kinds:
        names = None
        if kind == "store":
            store = _Store(args.folder)
            base, read, suffix, names = store.index, store.read, ".npz", store.folder
        else:
            base, read, suffix = readers[kind]()
        read(_write(args.folder, f"{kind}-base{suffix}", base))  # the unmutated file reads
        counts, violations = fuzz(kind, base, read, args.folder, args.seconds, args.seed, suffix, names, start_rss)
        start_rss = max(start_rss, _peak_rss())  # a rise is reported once, by the reader that made it
        print(f"{kind}: {counts['inputs']} inputs, {counts['results']} read, {counts['errors']} one-line errors, "
              f"{len(violations)} violations", flush=True)
        failed += violations
    for line in failed[:20]:
        print("VIOLATION", line, flush=True)
    return 1 if failed else 0


def _write(folder: str, name: str, data: bytes) -> str:
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


if __name__ == "__main__":
    sys.exit(main())
