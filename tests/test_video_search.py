"""From video files to text search in a browser, as a user runs it: demo test clips written as mp4
files (`msk_jax.demo.videos`), their features and stills extracted with the demo backbone
(`msk_jax.extract`), indexed with the session's trained demo run and queried with their own digit
strings (`msk_jax.search`): each query ranks its own clip far above chance. (The session's run is
a narrow model trained for 80 steps: measured here 2026-12-08, its own clip's mean rank 13.9 of
40 against 20.5 by chance, top-5 25 % against 12.5 %, top-1 10 % against 2.5 %, the same with
the float16 index as with the float32 one before it; the demo's own 600-step run is in
docs/search.md.)

Then `python -m msk_jax.search serve` on an index of the clips in 4 s windows every 2 s, in a
process of its own on a free port: its JSON API answers what the command line prints, refuses
bad and oversized queries and any file the index does not list, one JSON line each; Debian's
Chromium (headless, through Selenium and chromedriver) loads the page, searches a digit string,
finds its clip among the first results, clicks it and the player seeks to the window's start;
SIGTERM stops the server cleanly."""

import contextlib
import dataclasses
import http.client
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.parse

import numpy as np
import pytest

from msk_jax import search
from msk_jax.demo.videos import write_demo_videos
from msk_jax.extract import extractor
from tests.conftest import REPO_ROOT, run_env

CLIPS = 40


@pytest.fixture(scope="module")
def extracted(trained_run, tmp_path_factory):
    """The clips written as mp4 files and extracted: (videos folder, features folder, csv rows)."""
    config, _, _ = trained_run
    base = tmp_path_factory.mktemp("video_search")
    videos, features = str(base / "videos"), str(base / "features")
    rows = write_demo_videos(videos, count=CLIPS, split="msrvtt", size=config.data.demo_size, progress=False)
    logged = []
    summary = extractor.run(extractor.Options(
        videos=videos, output=features, backbone="demo", captions=os.path.join(videos, "captions.csv"),
        demo_feature_dim=config.data.dim_2d, progress_seconds=1e9, log=logged.append))
    assert summary["extracted_now"] == CLIPS and not summary["failed"], logged
    return videos, features, rows


def test_extracted_clips_are_found_by_their_digit_strings(trained_run, extracted, tmp_path):
    config, workdir, _ = trained_run
    videos, features, rows = extracted
    index = str(tmp_path / "index")
    with contextlib.redirect_stderr(io.StringIO()):
        search.build_index(config, workdir, features, index, window=8, stride=4, progress=False)
    searcher = search.Searcher(index)
    windows = len(searcher.index)
    queries = [row["caption"] for row in rows]
    own = [os.path.splitext(row["video"])[0] for row in rows]
    results = searcher.search(queries, k=windows)
    # The rank of each query's own clip: the best rank of any of its windows.
    ranks = []
    for result, video in zip(results, own):
        videos_in_order = list(dict.fromkeys(hit["video"] for hit in result.hits))
        ranks.append(videos_in_order.index(video) + 1)
    ranks = np.array(ranks)
    top1, top5 = float(np.mean(ranks == 1)), float(np.mean(ranks <= 5))
    # Chance: 1 / CLIPS at rank 1, 5 / CLIPS in the top 5, a mean rank of (CLIPS + 1) / 2.
    print(f"top-1 {top1:.3f} (chance {1 / CLIPS:.3f}), top-5 {top5:.3f} (chance {5 / CLIPS:.3f}), "
          f"mean rank {ranks.mean():.1f} (chance {(CLIPS + 1) / 2:.1f}), {windows} windows")
    # Under chance a rank is uniform on 1..CLIPS: its mean has standard error sqrt((CLIPS^2 - 1) / 12 / CLIPS).
    chance_mean, standard_error = (CLIPS + 1) / 2, np.sqrt((CLIPS ** 2 - 1) / 12 / CLIPS)
    assert ranks.mean() < chance_mean - 3 * standard_error, ranks
    assert top5 > 5 / CLIPS and top1 > 0, ranks
    # The index keeps what the page shows: each window's still (a JPEG of the clip's frame at
    # its middle second) and the clip's file, found through the extractor's index.json.
    shard = searcher.index.shards[0]
    assert all(shard.still(i)[:2] == b"\xff\xd8" for i in range(len(shard)))
    first = searcher.index.window(0)
    assert searcher.index.video_file(searcher.index.video_number(0)) == \
        os.path.join(videos, first["video"] + ".mp4")


# ------------------------------------------------------------------------------------ the server


@dataclasses.dataclass
class Server:
    url: str
    host: str
    port: int
    process: subprocess.Popen
    index: str
    lines: list
    reader: threading.Thread

    def request(self, path: str, method: str = "GET", body: bytes | None = None, headers=None):
        """(status, headers, body) of one request, the path sent as written."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def json(self, path: str, method: str = "GET", payload=None):
        body = json.dumps(payload).encode() if payload is not None else None
        status, headers, data = self.request(path, method, body,
                                             {"Content-Type": "application/json"} if body else None)
        assert headers.get("content-type") == "application/json", (path, headers)
        assert data.count(b"\n") == 0  # one line
        return status, json.loads(data)


@pytest.fixture(scope="module")
def served(trained_run, extracted, tmp_path_factory):
    """`python -m msk_jax.search serve --port=0` on an index of the clips in 4 s windows every
    2 s (windows that start inside the clips), once its address is printed."""
    config, workdir, _ = trained_run
    _, features, _ = extracted
    index = str(tmp_path_factory.mktemp("served") / "index")
    with contextlib.redirect_stderr(io.StringIO()):
        search.build_index(config, workdir, features, index, window=4, stride=2, progress=False)
    process = subprocess.Popen([sys.executable, "-m", "msk_jax.search", "serve", f"--index={index}", "--port=0"],
                               cwd=REPO_ROOT, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    lines, ready = [], threading.Event()

    def read():
        for line in process.stderr:
            lines.append(line.rstrip("\n"))
            if "http://" in line:
                ready.set()
        ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    ready.wait(timeout=240)
    started = [line for line in lines if "http://" in line]
    assert started, "\n".join(lines)
    url = started[0].split(" at ")[1].split()[0]
    address = urllib.parse.urlsplit(url)
    yield Server(url, address.hostname, address.port, process, index, lines, reader)
    if process.poll() is None:
        process.kill()
        process.wait()


def _search_cli(index: str, queries: list[str], tmp_path, *extra) -> list[dict]:
    file = tmp_path / "queries.txt"
    file.write_text("\n".join(queries) + "\n")
    done = subprocess.run([sys.executable, "-m", "msk_jax.search", "query", f"--index={index}", f"--queries={file}",
                           "--json", *extra], cwd=REPO_ROOT, env=run_env(), capture_output=True, text=True,
                          timeout=180)
    assert "Traceback" not in done.stderr, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def _without_extras(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("method", "links")}


def test_the_api_answers_what_the_command_line_prints(served, extracted, tmp_path):
    """The same queries through `query --json` and the API (GET one by one, POST together):
    the same objects; each hit links its still (a JPEG) and its clip (served by byte ranges);
    the server listens on 127.0.0.1 unless told otherwise."""
    videos, _, rows = extracted
    queries = [rows[0]["caption"], rows[1]["caption"], "uhh " + rows[2]["caption"], "foo bar", "Three four"]
    cli = _search_cli(served.index, queries, tmp_path, "--k=5")
    assert served.host == "127.0.0.1"
    status, health = served.json("/api/health")
    assert status == 200 and health["status"] == "ok" and health["videos"] == CLIPS
    assert health["windows"] == len(search.SearchIndex(served.index)) and health["approximate"] is False
    status, posted = served.json("/api/search", "POST", {"queries": queries, "k": 5})
    assert status == 200 and [_without_extras(r) for r in posted["results"]] == cli
    for query, want in zip(queries, cli):
        status, got = served.json("/api/search?" + urllib.parse.urlencode({"q": query, "k": 5, "embedding": "v+a"}))
        assert status == 200 and _without_extras(got) == want
    assert cli[2]["unknown_words"] == ["uhh"] and "error" in cli[3] and cli[3]["results"] == []
    assert cli[4]["unknown_words"] == ["Three"] and len(cli[4]["results"]) == 5  # vectors are case-sensitive
    status, by_video = served.json("/api/search?" + urllib.parse.urlencode({"q": queries[0], "embedding": "v"}))
    assert status == 200 and by_video["embedding"] == "v" and len(by_video["results"]) == 10
    first = posted["results"][0]
    assert first["method"] == "exact" and len(first["links"]) == len(first["results"]) == 5
    for hit, link in zip(first["results"], first["links"]):
        status, headers, still = served.request(link["still"])
        assert status == 200 and headers["content-type"] == "image/jpeg" and still[:2] == b"\xff\xd8"
        with open(os.path.join(videos, hit["video"] + ".mp4"), "rb") as f:
            mp4 = f.read()
        status, headers, part = served.request(link["video"], headers={"Range": "bytes=100-1099"})
        assert status == 206 and headers["content-type"] == "video/mp4" and part == mp4[100:1100]
        assert headers["content-range"] == f"bytes 100-1099/{len(mp4)}"


def test_the_api_refuses_bad_requests_in_one_json_line(served):
    """Bad and oversized queries, unknown parameters, and any path that is not a number into
    what the index lists: an HTTP error with one JSON line naming the problem, never a file."""
    long_query = "three " * 100
    cases = {
        "/api/search?" + urllib.parse.urlencode({"q": long_query}): (413, "a query of 600 characters; at most 500"),
        "/api/search": (400, "q: missing"),
        "/api/search?q=": (400, "empty query"),
        "/api/search?q=one&k=0": (400, "k=0: must be between 1 and 200"),
        "/api/search?q=one&k=ten": (400, "k='ten': not a whole number"),
        "/api/search?q=one&embedding=t": (400, "embedding='t': expected one of v+a, v, a"),
        "/api/search?q=one&approximate=1": (400, "has no approximate index"),
        "/api/search?q=one&path=/etc/passwd": (400, "unknown parameter 'path'"),
        "/video/0/../../../../etc/passwd": (404, "no such page"),
        "/video/0/%2e%2e%2f%2e%2e%2fetc%2fpasswd": (404, "no such page"),
        "/video/0/999": (404, "no video 999 in the index"),
        "/video/7/0": (404, "the index changed since this search"),
        "/still/0/100000": (404, "no window 100000 in the index"),
        "/still/0/-1": (404, "no such page"),
        "/../../etc/passwd": (404, "no such page"),
        "//etc/passwd": (404, "no such page"),
        "/index.json": (404, "no such page"),
        "/page.html": (404, "no such page"),
    }
    for path, (status, message) in cases.items():
        got, body = served.json(path)
        assert got == status and list(body) == ["error"] and message in body["error"], (path, got, body)
        assert "root:" not in body["error"] and "Traceback" not in body["error"]
    posts = [({"queries": ["one"] * 33}, 413, "33 queries; at most 32"),
             ({"queries": "one"}, 400, "queries: a non-empty list of strings"),
             ({"queries": ["one", 2]}, 400, "queries[1]: a query is a string, got int"),
             ({"queries": ["one"], "k": True}, 400, "k='True': not a whole number"),
             ({"queries": ["one"], "file": "x"}, 400, "unknown field 'file'"),
             ({"queries": ["x" * 70_000]}, 413, "bytes; at most 65536")]
    for payload, status, message in posts:
        got, body = served.json("/api/search", "POST", payload)
        assert got == status and message in body["error"], (payload, got, body)
    got, body = served.json("/api/search", "DELETE")
    assert got == 405 and body == {"error": "DELETE is not accepted at /api/search"}
    status, headers, data = served.request("/api/search", "POST", b"{not json", {"Content-Type": "application/json"})
    assert status == 400 and json.loads(data)["error"].startswith("the body is not JSON")
    assert not any("Traceback" in line for line in served.lines)


CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


def _own_hit(served, rows) -> tuple[str, dict]:
    """(a clip's caption, the hit of that clip in its own query's first 5 results that starts
    latest): the clip the page must show and the window to play."""
    captions = [row["caption"] for row in rows]
    for lo in range(0, len(captions), 32):
        status, answer = served.json("/api/search", "POST", {"queries": captions[lo:lo + 32], "k": 5})
        assert status == 200
        for row, result in zip(rows[lo:lo + 32], answer["results"]):
            own = [h for h in result["results"] if h["video"] == os.path.splitext(row["video"])[0]]
            if own and max(h["start"] for h in own) > 0:
                return row["caption"], max(own, key=lambda h: h["start"])
    pytest.fail("no clip is among the first 5 results of its own caption in a window after its start")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="Chromium and chromedriver are not installed "
                    "(Debian: apt-get install chromium chromium-driver; .ci/run installs them)")
def test_the_page_in_a_browser(served, extracted, tmp_path):
    """Headless Chromium loads the page, types a clip's digit string and sees the clip among the
    first results (in the API's order), clicks that window and the player reports a currentTime
    at its start; the page's screenshot is written beside the test's files."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements-dev.txt)")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    _, _, rows = extracted
    query, hit = _own_hit(served, rows)
    status, answer = served.json("/api/search?" + urllib.parse.urlencode({"q": query}))
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900", "--mute-audio", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_script_timeout(30)
        driver.get(served.url)
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        assert "windows of 40 videos" in driver.find_element(By.ID, "status").text
        driver.find_element(By.ID, "q").send_keys(query, Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .hit")) == 10)
        items = driver.find_elements(By.CSS_SELECTOR, "#results .hit")
        shown = [(item.get_attribute("data-video"), float(item.get_attribute("data-start"))) for item in items]
        assert shown == [(h["video"], h["start"]) for h in answer["results"]]
        assert (hit["video"], hit["start"]) in shown[:5]
        item = items[shown.index((hit["video"], hit["start"]))]
        still = item.find_element(By.CSS_SELECTOR, "img.still")
        wait.until(lambda d: int(still.get_attribute("naturalWidth") or 0) > 0)
        item.click()
        current, seeked_to = driver.execute_async_script("""
            const done = arguments[arguments.length - 1], player = document.getElementById("player");
            const check = () => player.dataset.seekedTo !== undefined ?
                done([player.currentTime, player.dataset.seekedTo]) : setTimeout(check, 5);
            check();""")
        assert float(seeked_to) == hit["start"] > 0 and abs(current - hit["start"]) < 0.25, (current, hit)
        assert driver.find_element(By.ID, "playing").text.startswith(hit["video"])
        assert driver.execute_script("return document.getElementById('player').error") is None
        screenshot = tmp_path / "search_page.png"
        driver.save_screenshot(str(screenshot))
        assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        print(f"screenshot: {screenshot}")
    finally:
        driver.quit()


def test_sigterm_stops_the_server_cleanly(served):
    """Last of the module: a file of the index gone under the server is one JSON line of error
    and one line of its log; SIGTERM ends the server, exit status 0, saying so in one line."""
    index = search.SearchIndex(served.index)
    os.unlink(os.path.join(served.index, index.shards[0].name, "thumbs.bin"))
    status, body = served.json("/still/0/0")
    assert status == 500 and body["error"].startswith("internal error: FileNotFoundError: "), body
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=60) == 0, "\n".join(served.lines)
    served.reader.join(timeout=10)
    assert served.lines[-1] == "[serve] stopped by SIGTERM", served.lines
    assert [line for line in served.lines if "FileNotFoundError" in line][0].startswith(
        "[serve] GET /still/0/0: FileNotFoundError: ")
    assert not any("Traceback" in line or "ERROR" in line for line in served.lines), served.lines
    with pytest.raises(ConnectionRefusedError):
        served.request("/api/health")
