"""`msk_jax.extract` on odd and hostile input: output paths that leave --output, two videos with
one name, videos beyond the bounds (read from the header, before decoding), files that are not
local videos in a common container (a playlist naming a URL: nothing may connect), a video that
killed the extractor, and frames that reach the backbones while the video is being decoded."""

import os
import shutil
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

av = pytest.importorskip("av")
pytest.importorskip("sklearn")  # the demo backbone's digit images

from msk_jax.extract import extractor as E  # noqa: E402
from msk_jax.extract import video as V  # noqa: E402
from tests.test_extract import REPO_ROOT, grey_frames, write_video  # noqa: E402


def cli(*args):
    return subprocess.run([sys.executable, "-m", "msk_jax.extract", "--process_index=0", "--process_count=1",
                           "--backbone=demo", "--batch=8", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)


def failed_lines(stderr):
    return [line for line in stderr.splitlines() if "failed: " in line]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 2 s video (48 frames of 32x48 at 24/s) with a tone."""
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    write_video(path, grey_frames(48, 32, 48), fps=24)
    return path


@pytest.fixture(scope="module")
def thin(tmp_path_factory):
    """A 1-pixel-wide video: 1x40, aspect ratio 40:1 (its 2D frames would be 8960 x 224)."""
    path = tmp_path_factory.mktemp("thin") / "thin.mp4"
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=24)
    stream.width, stream.height, stream.pix_fmt = 1, 40, "yuv444p"
    for i in range(24):
        frame = av.VideoFrame.from_ndarray(np.full((40, 1, 3), 128, np.uint8), format="rgb24")
        frame.pts = i
        container.mux(stream.encode(frame))
    container.mux(stream.encode())
    container.close()
    return path


@pytest.fixture
def listener():
    """A TCP server on 127.0.0.1: its port, and the list of connections it accepted."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.1)
    accepted, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except (socket.timeout, OSError):
                continue
            accepted.append(conn.getpeername())
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join(2)
    server.close()


def files_under(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_cli_keeps_features_inside_output_and_names_every_refused_video(tmp_path, clip, thin, listener):
    port, accepted = listener
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(clip, inputs / "ok.mp4")
    shutil.copy(thin, inputs / "thin.mp4")
    playlist = f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10.0,\nhttp://127.0.0.1:{port}/x.ts\n#EXT-X-ENDLIST\n"
    (inputs / "playlist.m3u8").write_text(playlist)
    (inputs / "fake.mp4").write_text(playlist)
    out = tmp_path / "work" / "out"
    out.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", out / "linked")
    rows = [("in/ok.mp4", "good/ok"),                       # row 2: extracted
            ("in/ok.mp4", "../../escaped"),                 # row 3: tmp_path/escaped
            ("in/ok.mp4", f"{tmp_path}/absolute/x"),        # row 4
            ("in/ok.mp4", "linked/y"),                      # row 5: through the symbolic link
            ("in/ok.mp4", "videos.csv"),                    # row 6: the run's own csv
            ("in/thin.mp4", "thin"),                        # beyond --max_aspect
            ("in/playlist.m3u8", "playlist"),               # an HLS playlist naming a URL
            ("in/fake.mp4", "fake"),                        # the same playlist named .mp4
            (f"http://127.0.0.1:{port}/remote.mp4", "remote")]
    listing = tmp_path / "list.csv"
    listing.write_text("video,path\n" + "".join(f"{v},{p}\n" for v, p in rows))
    before = [f for f in files_under(tmp_path) if not f.startswith("work/")]

    result = cli(f"--videos={listing}", f"--output={out}")

    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    # Nothing outside --output was written, nothing connected; the good row has its features.
    assert [f for f in files_under(tmp_path) if not f.startswith("work/")] == before
    assert accepted == []
    assert {"good/ok/ok_2d.npz", "good/ok/ok_3d.npz", "good/ok/ok_spec.npz"} <= set(files_under(out))
    assert (out / "videos.csv").read_text().split() == ["path", "good/ok"]
    # One line per refused video, naming it and why; then one line of the count.
    failed = failed_lines(result.stderr)
    assert len(failed) == 8, result.stderr

    def line(*words):
        hits = [f for f in failed if all(w in f for w in words)]
        assert len(hits) == 1, (words, failed)

    line(f"{listing} row 3", "'..'")
    line(f"{listing} row 4", "absolute")
    line(f"{listing} row 5", "symbolic link")
    line(f"{listing} row 6", "the run's own files")
    line("thin", "1x40", "aspect ratio", "by its header")
    line("playlist.m3u8", "container format")
    line("fake.mp4", "cannot be opened")
    line("remote.mp4", "is a URL")
    assert result.stderr.strip().splitlines()[-1].startswith("error: 8 of 9 videos failed")


def test_cli_two_videos_with_one_name_stop_the_run_before_extracting(tmp_path, clip):
    same_folder = tmp_path / "same_folder"
    same_folder.mkdir()
    shutil.copy(clip, same_folder / "x.mp4")
    shutil.copy(clip, same_folder / "x.webm")
    two_folders = tmp_path / "two_folders"
    for sub in ("a", "b"):
        (two_folders / sub).mkdir(parents=True)
        shutil.copy(clip, two_folders / sub / "x.mp4")
    for videos, names in ((same_folder, ("x.mp4", "x.webm")), (two_folders, ("a/x.mp4", "b/x.mp4"))):
        out = tmp_path / f"out_{videos.name}"
        result = cli(f"--videos={videos}", f"--output={out}")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and all(f"{videos}/{name}" in errors[0] for name in names), result.stderr
        assert not out.exists() or not files_under(out)


def test_bounds_refuse_a_video_from_its_header_before_any_frame(clip, thin, tmp_path):
    frames = []
    cases = [(thin, V.Limits(), "aspect ratio 40:1"),
             (clip, V.Limits(max_pixels=1000), "1,536 pixels"),
             (clip, V.Limits(max_seconds=1.5), "lasts 2.0 s by its header")]
    for path, limits, words in cases:
        with pytest.raises(E.DataError) as err:
            V.stream_video(str(path), frames.append, frames.append, limits=limits)
        assert words in str(err.value) and str(path) in str(err.value)
        assert frames == []
    # Within the bounds, the same video decodes.
    assert V.stream_video(str(clip), frames.append, None, limits=V.Limits(max_pixels=1536)).frames_2d == 2
    # A header without a duration (a live matroska stream): the frames' timestamps bound it.
    live = tmp_path / "live.mkv"
    container = av.open(str(live), "w", format="matroska", options={"live": "1"})
    stream = container.add_stream("libx264", rate=24)
    stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
    for i, image in enumerate(grey_frames(72, 32, 48)):  # 3 s
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = i
        container.mux(stream.encode(frame))
    container.mux(stream.encode())
    container.close()
    with av.open(str(live)) as opened:
        assert V.header_duration(opened) is None
    frames.clear()
    with pytest.raises(E.DataError, match="runs past the bound of 1 s"):
        V.stream_video(str(live), None, frames.append, limits=V.Limits(max_seconds=1))
    assert 24 <= len(frames) < 72
    with pytest.raises(ValueError):
        V.Limits(max_aspect=0.5)


def test_frames_reach_the_backbones_while_decoding_with_the_rows_of_a_whole_decode(clip, tmp_path, monkeypatch):
    pushed, seen_at_call = [0], []
    push = V._FrameGraph.push

    def counting_push(self, frame, sink):
        pushed[0] += frame is not None
        return push(self, frame, sink)

    monkeypatch.setattr(V._FrameGraph, "push", counting_push)

    def backbone(batch):
        # Rows that depend on the whole batch (its padding included), so batches must match too.
        flat = np.asarray(batch, np.float32).reshape(len(batch), -1)
        seen_at_call.append(pushed[0])
        return np.stack([flat.mean(1), flat.std(1) + 1, np.full(len(flat), flat.mean()) + 2], 1)

    item = E.VideoItem(str(clip), "clip")
    for batch in (1, 16, 40):
        seen_at_call.clear()
        pushed[0] = 0
        E.extract_video(item, str(tmp_path / f"b{batch}"), backbone, 3, backbone, 3, batch)
        if batch == 16:  # 3D: one clip of 16 frames per call, the first after 16 of 48 decoded frames
            assert min(seen_at_call) < pushed[0] // 2
        whole = E.compute_features(V.decode_video(str(clip)), backbone, 3, backbone, 3, batch)
        for kind, key in (("2d", "features"), ("3d", "features"), ("audio", "arr_0")):
            with np.load(E.feature_files(str(tmp_path / f"b{batch}"), item)[kind]) as saved:
                np.testing.assert_array_equal(saved[key], whole[kind])


def test_a_video_that_killed_the_extractor_is_skipped_and_named_next_time(tmp_path, clip, monkeypatch):
    videos, out = tmp_path / "videos", tmp_path / "out"
    videos.mkdir()
    for name in ("a", "b", "c"):
        shutil.copy(clip, videos / f"{name}.mp4")
    extract_video = E.extract_video

    def dies_on(name, error):
        def extract(item, *args, **kwargs):
            if item.id == name:
                raise error
            return extract_video(item, *args, **kwargs)
        return extract

    def options(**kwargs):
        return E.Options(videos=str(videos), output=str(out), backbone="demo", batch=8, log=lambda m: None, **kwargs)

    # Out of memory on b: the process dies there and b's mark stays. Ctrl-C on c (in the next run,
    # which skips b): not the video's doing, and no mark stays.
    monkeypatch.setattr(E, "extract_video", dies_on("b", MemoryError("out of memory")))
    with pytest.raises(MemoryError):
        E.run(options())
    assert files_under(out / E.STATE_DIR) == ["b.started"]
    monkeypatch.setattr(E, "extract_video", dies_on("c", KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        E.run(options())
    monkeypatch.setattr(E, "extract_video", extract_video)
    assert files_under(out / E.STATE_DIR) == ["b.started"]

    skipped = cli(f"--videos={videos}", f"--output={out}")
    assert skipped.returncode == 1 and "Traceback" not in skipped.stderr, skipped.stderr
    failed = failed_lines(skipped.stderr)
    assert len(failed) == 1 and f"{videos}/b.mp4: killed the extractor last time" in failed[0]
    assert "--retry_killed" in failed[0]
    assert (out / "videos.csv").read_text().split() == ["path", "a", "c"]
    assert not (out / "b").exists()

    retried = cli(f"--videos={videos}", f"--output={out}", "--retry_killed")
    assert retried.returncode == 0, retried.stderr
    assert (out / "videos.csv").read_text().split() == ["path", "a", "b", "c"]
    assert files_under(out / E.STATE_DIR) == []


def test_sigterm_stops_the_cli_without_blaming_the_video(tmp_path):
    videos, out = tmp_path / "videos", tmp_path / "out"
    videos.mkdir()
    write_video(videos / "long.mp4", grey_frames(24 * 40, 32, 48), fps=24)  # 40 s: seconds to extract
    process = subprocess.Popen([sys.executable, "-m", "msk_jax.extract", "--process_index=0", "--process_count=1",
                                "--backbone=demo", f"--videos={videos}", f"--output={out}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    marker = out / E.STATE_DIR / "long.started"
    try:
        for _ in range(6000):
            if marker.exists() or process.poll() is not None:
                break
            threading.Event().wait(0.005)
        assert marker.exists(), "the run ended before its video was marked"
        process.terminate()
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 143 and not marker.exists(), stderr
