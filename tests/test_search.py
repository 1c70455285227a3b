"""Text search over videos (`python -m msk_jax.search`): the trained demo run indexes the small
corpus's training videos in 8 s windows every 4 s, and digit strings spoken and shown in them
find the windows where they are said far more often than chance; the command line's JSON, the
words without a vector, a video that cannot be read, and bad input in one line. The index grows:
an append embeds only the videos it does not hold (a SIGKILL before its switch leaves the old
index answering), a removal and a changed video rewrite their shards, an approximate index
follows, and an index of the first format is still read. The search benchmark in small mode."""

import contextlib
import io
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from msk_jax import bench, configs, search
from msk_jax.bench import search as search_bench
from msk_jax.demo.corpus import DIGIT_WORDS, corpus_paths
from msk_jax.search import scoring
from tests.conftest import REPO_ROOT, run_env

MISSING = "demo/not_extracted"
FIRST = 30  # videos of the index an append grows


def _csv(folder, rows):
    (folder / "videos.csv").write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def corpus_layout(trained_run, tmp_path_factory):
    """The small corpus's training videos as a folder of their own (its feature folders linked),
    listed by a csv that also names a video whose features do not exist."""
    config, _, _ = trained_run
    paths = corpus_paths(config.data.demo_dir)
    folder = tmp_path_factory.mktemp("my_videos")
    for name, target in (("features_2d", paths.features_2d), ("features_3d", paths.features_3d),
                         ("audio", paths.audio), ("caption.pickle", paths.caption)):
        os.symlink(target, folder / name)
    with open(paths.csv) as f:
        rows = f.read().splitlines()
    _csv(folder, rows[:3] + [MISSING] + rows[3:])
    return str(folder)


@pytest.fixture(scope="module")
def index(trained_run, corpus_layout, tmp_path_factory):
    """(index folder, summary, what the indexing printed)."""
    config, workdir, _ = trained_run
    out = str(tmp_path_factory.mktemp("search") / "index")
    printed = io.StringIO()
    with contextlib.redirect_stderr(printed):
        summary = search.build_index(config, workdir, corpus_layout, out, window=8, stride=4)
    return out, summary, printed.getvalue()


@pytest.fixture(scope="module")
def first_videos(trained_run, corpus_layout, tmp_path_factory):
    """(feature folder of the first FIRST videos, index of them) for the appends."""
    config, workdir, _ = trained_run
    folder = tmp_path_factory.mktemp("first_videos")
    for name in ("features_2d", "features_3d", "audio", "caption.pickle"):
        os.symlink(os.path.join(corpus_layout, name), folder / name)
    with open(corpus_paths(config.data.demo_dir).csv) as f:
        _csv(folder, f.read().splitlines()[:FIRST + 1])  # the header and FIRST videos
    out = str(tmp_path_factory.mktemp("first_index") / "index")
    with contextlib.redirect_stderr(io.StringIO()):
        search.build_index(config, workdir, str(folder), out, window=8, stride=4)
    return str(folder), out


def segments_with_digits(caption_path):
    """(video id, start, end, the segment's digit words) of every ASR segment."""
    with open(caption_path, "rb") as f:
        captions = pickle.load(f)
    return [(vid, float(s), float(e), " ".join(w for w in str(t).split() if w in DIGIT_WORDS))
            for vid, c in captions.items() for s, e, t in zip(c["start"], c["end"], c["text"])]


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_index_holds_every_window_and_names_the_unreadable_video(index, trained_run):
    out, summary, printed = index
    config = trained_run[0]
    assert summary["videos"] == 40 and [s["path"] for s in summary["skipped"]] == [MISSING]
    assert f"skipped {MISSING}: " in printed and "not_extracted_2d.npz" in printed
    assert "[index] 41/41 videos" in printed
    loaded = search.SearchIndex(out)
    c = loaded.columns
    assert len(loaded) == summary["windows"] > 300 and loaded.format == search.FORMAT
    assert loaded.meta["step"] == 80 and loaded.meta["weights"] == "ema" and loaded.meta["window"] == 8
    assert loaded.config.model.to_dict() == json.loads(config.to_json())["model"]
    assert c["fused"].shape == c["video"].shape == c["audio"].shape == (len(loaded), config.model.projection_dim)
    assert np.all(c["end"] - c["start"] <= 8 + 1e-9) and np.all(c["start"] >= 0)
    first = c["video_id"] == "video_0000"
    np.testing.assert_allclose(c["start"][first][:3], [0, 4, 8])
    # Stored as float16 unit rows; the fused one is evaluation's v+a (the mean of the normalised
    # video and audio embeddings), normalised.
    for key in ("video", "audio", "fused"):
        assert loaded.shards[0].embeddings[key].dtype == np.float16
        np.testing.assert_allclose(np.linalg.norm(c[key], axis=1), 1, atol=2e-3)
    np.testing.assert_allclose(c["fused"], unit(c["video"] + c["audio"]), atol=3e-3)
    # The demo corpus has no video files: each window's still is drawn from its digits.
    shard = loaded.shards[0]
    assert all(shard.still(i)[:2] == b"\xff\xd8" for i in range(0, len(shard), 50))
    assert loaded.video_file(0) is None


def test_digit_strings_find_their_windows_far_above_chance(index, trained_run):
    """Every digit string of the training videos as a query, against the windows that hold at
    least half of a segment where it is said: how often the top window and the top 10 hold one,
    and the AUC of the whole ranking (the fraction of relevant-irrelevant pairs ranked right),
    each against random rankings of the same windows. (The demo run is narrow and brief: t2v R@10
    25 against 10 on its 100-clip test set; here, measured 2026-12-04 with fused v+a: top-1 1.7 %
    against 0.64 %, top-10 13.7 % against 6.3 %, AUC 0.67 against 0.5, 233 queries of 377
    windows. Top-1 is reported, not asserted: 4 hits.)"""
    out, _, _ = index
    config = trained_run[0]
    segments = segments_with_digits(corpus_paths(config.data.demo_dir).caption)
    queries = sorted({digits for *_, digits in segments if digits})
    searcher = search.Searcher(out)
    c, n, q = searcher.index.columns, len(searcher.index), len(queries)
    report = {}
    for embedding in ("v+a", "v"):
        hits1 = hits10 = chance1 = chance10 = 0.0
        aucs = []
        for result in searcher.search(queries, k=n, embedding=embedding):
            relevant = np.zeros(n, bool)
            for vid, start, end, digits in segments:
                if f" {result.query} " in f" {digits} ":
                    overlap = np.minimum(c["end"], end) - np.maximum(c["start"], start)
                    relevant |= (c["video_id"] == vid) & (overlap >= 0.5 * (end - start))
            r = int(relevant.sum())
            assert 0 < r < n, result.query
            found = {(str(c["video_id"][i]), float(c["start"][i])) for i in np.flatnonzero(relevant)}
            ranks = np.array([h["rank"] for h in result.hits if (h["video"], h["start"]) in found])
            assert len(ranks) == r
            hits1 += ranks[0] == 1
            hits10 += ranks[0] <= 10
            chance1 += r / n
            chance10 += 1 - math.comb(n - r, 10) / math.comb(n, 10)
            aucs.append(1 - (ranks - np.arange(1, r + 1)).sum() / (r * (n - r)))
        auc, auc_error = float(np.mean(aucs)), float(np.std(aucs) / math.sqrt(q))
        report[embedding] = {"top1": hits1 / q, "top1 chance": chance1 / q, "top10": hits10 / q,
                             "top10 chance": chance10 / q, "AUC": auc, "windows": n, "queries": q}
        # Far above chance: the top-10 hits beyond 3 standard deviations of random rankings' and
        # twice their rate, the AUC beyond 0.5 by more than 5 standard errors.
        assert hits10 > chance10 + 3 * math.sqrt(chance10 * (1 - chance10 / q)), report
        assert hits10 > 1.8 * chance10 and auc > max(0.6, 0.5 + 5 * auc_error), report
    print("search hit rates:", json.dumps(report))


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "msk_jax.search", *args], cwd=REPO_ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_query_command_json_and_words_without_vectors(index, tmp_path):
    out, _, _ = index
    queries = tmp_path / "queries.txt"
    queries.write_text("three four seven\n\nuhh three four seven\nfoo bar\n")
    done = _cli("query", f"--index={out}", f"--queries={queries}", "--json", "--k", "4")
    assert done.returncode == 1, done.stderr  # one query had no word with a vector
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["query"] for r in lines] == ["three four seven", "uhh three four seven", "foo bar"]
    first = lines[0]
    assert first["embedding"] == "v+a" and first["unknown_words"] == [] and "error" not in first
    assert [h["rank"] for h in first["results"]] == [1, 2, 3, 4]
    for hit in first["results"]:
        assert set(hit) == {"rank", "video", "path", "start", "end", "score", "text"}
        assert hit["path"].endswith(hit["video"]) and hit["end"] > hit["start"] and -1 <= hit["score"] <= 1
    assert [h["score"] for h in first["results"]] == sorted((h["score"] for h in first["results"]), reverse=True)
    assert lines[1]["unknown_words"] == ["uhh"] and len(lines[1]["results"]) == 4
    assert lines[2]["results"] == [] and "no word of the query 'foo bar' has a word vector" in lines[2]["error"]
    assert "note: no word vector for 'uhh' in 'uhh three four seven'" in done.stderr
    assert "error: no word of the query 'foo bar' has a word vector ('foo', 'bar')" in done.stderr
    assert "Traceback" not in done.stderr

    table = _cli("query", f"--index={out}", "three four seven", "--k=3", "--embedding=v")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert "cosine with each window's video embedding" in lines[0] and lines[1].split()[:5] == \
        ["rank", "video", "start", "end", "score"]
    assert [line.split()[0] for line in lines[2:]] == ["1", "2", "3"]


def test_bad_input_is_one_line(index, tmp_path):
    out, _, _ = index
    missing = _cli("query", f"--index={tmp_path / 'nowhere'}", "three")
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nowhere' / 'index.json'}: no search index here (build one with "
        "`python -m msk_jax.search index`)"]
    wrong = _cli("query", f"--index={out}", "--config=configs/howto.py:demo", "three")
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    message = wrong.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: {out}/index.json: config.") and "in the index but" in message
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "index.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(search.SearchError, match="field 'format'"):
        search.SearchIndex(str(broken))
    with pytest.raises(search.SearchError, match="--remove: demo/nope not in the index"):
        search.remove_videos(out, ["demo/nope"], progress=False)


def test_append_embeds_only_the_new_videos(index, first_videos, corpus_layout, tmp_path):
    """An index of 30 videos grown with the whole folder (40 and the missing one): only the 10
    new videos are embedded, the 30 are named as skipped, and the index holds the windows a
    build of the whole folder holds, with their embeddings; an approximate index written with
    it finds what exact search finds."""
    full, _, _ = index
    _, first = first_videos
    grown = str(tmp_path / "index")
    shutil.copytree(first, grown)
    printed = io.StringIO()
    with contextlib.redirect_stderr(printed):
        summary = search.build_index(None, None, corpus_layout, grown, append=True, approximate=True)
    new = [f"demo/video_{i:04d}" for i in range(FIRST, 40)]
    assert summary["embedded_videos"] == new and len(summary["already_indexed"]) == FIRST
    assert [s["path"] for s in summary["skipped"]] == [MISSING] and summary["changed"] == []
    assert f"[index] {FIRST} videos already in the index, skipped: demo/video_0000, " in printed.getvalue()
    assert "[index] 10/11 videos" in printed.getvalue() or "[index] 11/11 videos" in printed.getvalue()
    grown_index, full_index = search.SearchIndex(grown), search.SearchIndex(full)
    assert len(grown_index.shards) == 2 and summary["embedded_windows"] == len(grown_index.shards[1])
    g, f = grown_index.columns, full_index.columns
    order_g = np.lexsort((g["start"], g["path"]))
    order_f = np.lexsort((f["start"], f["path"]))
    assert list(g["path"][order_g]) == list(f["path"][order_f])
    np.testing.assert_array_equal(g["start"][order_g], f["start"][order_f])
    np.testing.assert_allclose(g["fused"][order_g], f["fused"][order_f], atol=2e-3)
    # The approximate index (faiss) of the grown index: the same best windows as exact search.
    assert summary["approximate"]["windows"] == len(grown_index) and summary["approximate"]["recall_at_10"] > 0.9
    searcher = search.Searcher(grown)
    queries = ["three four seven", "one two", "nine eight"]
    exact = searcher.search(queries, k=5)
    approximate = searcher.search(queries, k=5, approximate=True)
    assert [r.method for r in approximate] == ["approximate"] * 3
    for e, a in zip(exact, approximate):
        assert len(set(e.windows) & set(a.windows)) >= 4
    # Appending again embeds nothing.
    with contextlib.redirect_stderr(io.StringIO()):
        again = search.build_index(None, None, corpus_layout, grown, append=True)
    assert again["embedded_videos"] == [] and len(again["already_indexed"]) == 40 and "approximate" in again


_KILLED_APPEND = """
import os, signal, sys
from msk_jax import search, storage


def die_before_the_switch(path, data, write=storage.write_atomic):
    if os.path.basename(path) == "index.json":
        os.kill(os.getpid(), signal.SIGKILL)  # every new shard is written, the manifest not yet
    write(path, data)


if __name__ == "__main__":
    index, features = sys.argv[1:]
    storage.write_atomic = die_before_the_switch
    search.build_index(None, None, features, index, append=True)
"""


def test_an_append_killed_before_its_switch_leaves_the_old_index(first_videos, corpus_layout, tmp_path):
    """An append SIGKILLed once its shards are written, just before its manifest: the index
    answers queries as before; the next append finishes, and no file of the killed one is left."""
    _, first = first_videos
    copy = str(tmp_path / "index")
    shutil.copytree(first, copy)
    before = sorted(os.listdir(copy))
    script = tmp_path / "append.py"
    script.write_text(_KILLED_APPEND)
    killed = subprocess.run([sys.executable, str(script), copy, corpus_layout], cwd=REPO_ROOT,
                            env=run_env(PYTHONPATH=REPO_ROOT), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = sorted(set(os.listdir(copy)) - set(before))
    assert len(left) == 1 and left[0].startswith("shard-"), left  # the killed append's shard
    queries = ["three four seven", "one two", "nine"]
    want = [r.hits for r in search.Searcher(first).search(queries, k=5)]
    assert [r.hits for r in search.Searcher(copy).search(queries, k=5)] == want
    assert search.SearchIndex(copy).videos == FIRST
    with contextlib.redirect_stderr(io.StringIO()):
        grown = search.build_index(None, None, corpus_layout, copy, append=True)
    assert len(grown["embedded_videos"]) == 40 - FIRST and search.SearchIndex(copy).videos == 40
    assert sorted(os.listdir(copy)) == sorted(["index.json"] + [s["name"] for s in grown["shards"]])


def test_removed_and_changed_videos_rewrite_their_shards(trained_run, tmp_path):
    """Three videos with features of their own: removing one rewrites its shard without it; a
    video whose features are written again is embedded again by the next append, the others
    are skipped; a rebuild of the index leaves only its own shard."""
    config, workdir, _ = trained_run
    paths = corpus_paths(config.data.demo_dir)
    folder = tmp_path / "three"
    rows = []
    for i in range(3):
        rel = f"demo/video_{i:04d}"
        for root, suffix in ((paths.features_2d, "_2d.npz"), (paths.features_3d, "_3d.npz"),
                             (paths.audio, "_spec.npz")):
            target = folder / os.path.basename(root) / rel
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(os.path.join(root, rel, f"video_{i:04d}{suffix}"), target)
        rows.append(rel)
    _csv(folder, ["path"] + rows)
    out = str(tmp_path / "index")
    with contextlib.redirect_stderr(io.StringIO()):
        built = search.build_index(config, workdir, str(folder), out, shard_windows=1)
    assert len(built["shards"]) == 3  # whole videos, one a shard here
    windows = {p: n for p, n in zip(rows, (s["windows"] for s in built["shards"]))}
    removed = search.remove_videos(out, [rows[1]], progress=False)
    assert removed["videos"] == 2 and removed["windows"] == windows[rows[0]] + windows[rows[2]]
    assert set(search.SearchIndex(out).video_paths()) == {rows[0], rows[2]}
    assert len(os.listdir(out)) == 3  # index.json and two shards
    os.utime(folder / "features_2d" / rows[2] / "video_0002_2d.npz", ns=(1, 1))
    printed = io.StringIO()
    with contextlib.redirect_stderr(printed):
        again = search.build_index(None, None, str(folder), out, append=True)
    assert again["changed"] == [rows[2]] and again["embedded_videos"] == [rows[1], rows[2]]
    assert again["already_indexed"] == [rows[0]] and again["windows"] == sum(windows.values())
    assert f"embedded again: {rows[2]}" in printed.getvalue()
    with contextlib.redirect_stderr(io.StringIO()):
        rebuilt = search.build_index(config, workdir, str(folder), out)
    assert sorted(os.listdir(out)) == sorted(["index.json"] + [s["name"] for s in rebuilt["shards"]])


def test_an_index_of_the_first_format_is_read_and_not_grown(index, corpus_layout, tmp_path):
    """The first format (one windows file): read as one shard, with the same rankings; an
    append says to build it again."""
    out, _, _ = index
    loaded = search.SearchIndex(out)
    c = loaded.columns
    old = tmp_path / "old"
    old.mkdir()
    np.savez(old / "windows-0123456789abcdef.npz", **{k: c[k] for k in search.WINDOW_FIELDS})
    meta = {k: v for k, v in loaded.meta.items() if k not in ("shards", "next_key")}
    meta.update(format=search.FORMAT_1, windows_file="windows-0123456789abcdef.npz")
    (old / "index.json").write_text(json.dumps(meta))
    first = search.SearchIndex(str(old))
    assert first.format == search.FORMAT_1 and len(first) == len(loaded)
    queries = ["three four seven", "two nine"]
    assert [[(h["video"], h["start"]) for h in r.hits] for r in search.Searcher(str(old)).search(queries)] == \
        [[(h["video"], h["start"]) for h in r.hits] for r in search.Searcher(out).search(queries)]
    with pytest.raises(search.SearchError, match="format msk_jax.search/1 .* cannot grow: build it again without "
                                                 "--append"):
        search.build_index(None, None, corpus_layout, str(old), append=True)


def test_exact_scoring_in_chunks_and_on_an_accelerator_agree():
    """Chunked exact top-k (usearch's float16 kernels) equals a float32 ranking of the same
    float16 rows, ties and all; JAX's scorer (what an accelerator runs) gives the same windows."""
    rng = np.random.default_rng(0)
    rows = unit(rng.standard_normal((1000, 48))).astype(np.float16)
    rows[700] = rows[3]  # a tie: the smaller window number first
    queries = unit(rng.standard_normal((3, 48)))
    queries[2] = rows[3]
    chunks = [(lo, rows[lo:lo + 128]) for lo in range(0, 1000, 128)]
    scores, windows = scoring.exact_top_k(chunks, queries, 20)
    want = queries.astype(np.float16).astype(np.float32) @ rows.astype(np.float32).T
    for q in range(3):
        order = np.lexsort((np.arange(1000), -want[q]))[:20]
        np.testing.assert_allclose(scores[q], want[q][order], atol=1e-5)
        assert list(windows[q][:2]) == list(order[:2]) and set(windows[q]) == set(order)
    assert list(windows[2][:2]) == [3, 700]
    jax_scores, jax_windows = scoring.exact_top_k(chunks, queries, 20, backend="jax")
    np.testing.assert_allclose(jax_scores, scores, atol=1e-4)
    assert all(set(a) == set(b) for a, b in zip(jax_windows, windows))


def test_search_benchmark_in_small_mode(capsys, tmp_path):
    """`python -m msk_jax.bench search` at small sizes and width: both methods timed, the
    approximate index's recall reported; its library is unit float16 rows."""
    config = configs.get_config("bench")
    config.search.update(sizes=(2000, 5000), dim=64, queries=8, exact_queries=3)
    results = bench.run("search", config)
    printed = capsys.readouterr().out
    assert results["dim"] == 64 and list(results["sizes"]) == ["2000", "5000"]
    for row in results["sizes"].values():
        assert row["exact"]["p50_ms"] > 0 and row["exact"]["queries"] == 3 and row["vectors_mb"] > 0
        assert row["approximate"]["queries"] == 8 and 0.5 <= row["approximate"]["recall_at_10"] <= 1
    assert printed.count("windows  vectors") == 2 and "recall@10" in printed
    json.dumps(results)
    data = search_bench.synthetic(str(tmp_path / "windows.npy"), 300, 16)
    assert data.dtype == np.float16 and data.shape == (300, 16)
    np.testing.assert_allclose(np.linalg.norm(data.astype(np.float32), axis=1), 1, atol=2e-3)


def test_a_query_builds_no_data(tmp_path, monkeypatch):
    """An index of a demo run queried where the demo corpus is absent (another machine, a
    removed cache): the query reads only the word vectors that exist, names the missing file in
    one line, and creates no data folder, neither config.data.demo_dir nor the default cache's."""
    def write_index(folder, demo_dir):
        config = configs.get_config("howto", "demo")
        config.data.demo_dir, config.data.demo_size = demo_dir, "tiny"
        folder.mkdir()
        columns = {k: np.zeros(1, np.float64) for k in ("start", "end")}
        columns.update({k: np.array(["v"]) for k in ("video_id", "path", "text")})
        columns.update({k: np.ones((1, config.model.projection_dim), np.float32) for k in ("video", "audio", "fused")})
        np.savez(folder / "windows.npz", **{k: columns[k] for k in search.WINDOW_FIELDS})
        (folder / "index.json").write_text(json.dumps({
            "format": search.FORMAT_1, "checkpoint": str(tmp_path / "run" / "checkpoints"), "step": 1,
            "weights": "ema", "config": config.to_json()}))
        return str(folder)

    demo_dir = tmp_path / "demo_data"
    index = write_index(tmp_path / "index", str(demo_dir))
    done = subprocess.run([sys.executable, "-m", "msk_jax.search", "query", f"--index={index}", "three"],
                          cwd=REPO_ROOT, env=run_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {demo_dir / 'word2vec.bin'}: missing, "), done.stderr
    assert "python -m msk_jax.demo.corpus" in lines[0]
    assert not demo_dir.exists()

    cache = tmp_path / "cache"
    monkeypatch.setenv("MSK_JAX_CACHE_DIR", str(cache))
    with pytest.raises(search.SearchError, match=f"{cache / 'demo_corpus_tiny' / 'word2vec.bin'}: missing"):
        search.Searcher(write_index(tmp_path / "default_index", ""))
    assert not cache.exists()
