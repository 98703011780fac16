"""contrastive-embed index + serve on a model trained on the small demo set: the JSON API answers
captions, uploads and sample keys with the right digits, refuses bad requests with a 4xx and keeps
serving, and the web page works in a real headless browser (Debian's chromium), screenshot saved."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from ports import free_port

from contrastive.data.sources import iter_tar_samples

from conftest import BIN, REPO, run_cli, tiny_overrides
from pathological import many_channels_wav, png_claiming, silent_flac
from servers import _wait_until_up

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def service(demo_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search")
    run_cli(
        "contrastive-train",
        *tiny_overrides(demo_data, tmp / "run", "data.eval=null"),
        *("trainer.max_steps=150", "data.batch_size=32", "trainer.log_every=50"),
    )
    # the data named relatively, from its own directory: the index must find the shards from anywhere
    run_cli(
        "contrastive-embed",
        "embed",
        str(tmp / "run" / "export"),
        "--data",
        "train",
        "--out",
        str(tmp / "emb"),
        cwd=demo_data,
    )
    built = run_cli("contrastive-embed", "index", str(tmp / "emb"), "--out", str(tmp / "idx"))
    assert "audio: 156 rows, Flat" in built.stdout
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "contrastive-embed"), "serve", str(tmp / "idx"), "--port", str(port), "--upload-mb", "1"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(f"{url}/api/info", proc, timeout=180)
        yield url, proc, tmp
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def call(
    url: str, path: str, body: dict | None = None, files: dict | None = None, headers: dict | None = None
) -> tuple[int, dict]:
    """(status, JSON body) of a GET, a JSON POST, or a multipart POST with `files` ({field: bytes}), which
    carries the header the page sends unless `headers` say otherwise."""
    headers, data = dict(headers or {}), None
    if files is not None:
        boundary = "----contrastive-test"
        parts = []
        for name, value in (body or {}).items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
        for name, content in files.items():
            head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="q.bin"\r\n'
            parts.append(head.encode() + b"Content-Type: application/octet-stream\r\n\r\n" + content + b"\r\n")
        data = b"".join(parts) + f"--{boundary}--\r\n".encode()
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
        headers.setdefault("X-Requested-With", "contrastive-search")
    elif body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"  # Infinity as JSON's
    request = urllib.request.Request(url + path, data=data, headers=headers, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_api_finds_the_digit_asked_for_and_refuses_bad_requests(service, demo_data):
    url, proc, _ = service
    status, found = call(url, "/api/search", {"query": "the digit seven", "modality": "audio", "k": 5})
    assert status == 200 and len(found["results"]) == 5
    precision = sum(r["label"] == "seven" for r in found["results"]) / 5
    print(f"'the digit seven' -> audio: top-5 precision {precision:.0%}")
    assert precision >= 0.8
    first = found["results"][0]
    with urllib.request.urlopen(url + first["media"]["audio"]) as r:  # the clip, read back from its shard
        assert r.headers["Content-Type"].startswith("audio/") and len(r.read()) > 1000

    held = next(s for s in iter_tar_samples(str(next((demo_data / "heldout").glob("*.tar")))) if "png" in s)
    digit = json.loads(held["json"])["label"]
    status, found = call(
        url, "/api/search", {"query_modality": "image", "modality": "audio", "k": 5}, {"file": held["png"]}
    )
    assert status == 200
    precision = sum(r["label"] == digit for r in found["results"]) / 5
    print(f"an unseen image of {digit} -> audio: top-5 precision {precision:.0%}")
    assert precision >= 0.6
    status, by_key = call(url, "/api/search", {"key": first["key"], "query_modality": "audio", "modality": "image"})
    assert status == 200 and by_key["results"][0]["label"] == "seven"

    bad = {
        "unknown modality": ({"query": "seven", "modality": "smell"}, None, 400, "this index holds"),
        "k=10^9": ({"query": "seven", "modality": "audio", "k": 10**9}, None, 400, "k must be between 1 and 100"),
        "empty query": ({"query": "  ", "modality": "audio"}, None, 400, "the query is empty"),
        "oversized upload": (
            {"modality": "audio", "query_modality": "image"},
            {"file": b"\0" * (2 << 20)},
            413,
            "1 MB",
        ),
        "not an image": (
            {"modality": "audio", "query_modality": "image"},
            {"file": b"not a picture"},
            400,
            "could not read",
        ),
        "unknown key": ({"key": "nope", "modality": "audio", "query_modality": "audio"}, None, 404, "no sample 'nope'"),
        "a list for a name": ({"query": "seven", "query_modality": ["text"], "modality": "audio"}, None, 400, "string"),
        "k infinite": ({"query": "seven", "modality": "audio", "k": float("inf")}, None, 400, "whole number"),
        "k a float": ({"query": "seven", "modality": "audio", "k": 2.5}, None, 400, "whole number, not 2.5"),
        "a picture of 144 Mpx": (
            {"modality": "audio", "query_modality": "image"},
            {"file": png_claiming(12000, 12000)},
            413,
            "too large once decoded",
        ),
        "64 channels": (
            {"modality": "image", "query_modality": "audio"},
            {"file": many_channels_wav(64)},
            413,
            "too large once decoded",
        ),
    }
    for name, (body, files, code, message) in bad.items():
        status, answer = call(url, "/api/search", body, files)
        assert status == code and message in answer["error"], (name, status, answer)
    assert "BytesIO" not in call(url, "/api/search", bad["not an image"][0], {"file": b"x"})[1]["error"]
    assert call(url, "/api/info")[0] == 200 and proc.poll() is None, "still serving after the refusals"


def peak_kib(pid: int) -> int:
    return int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmHWM"))
               .split()[1])  # fmt: skip


def test_the_service_guards_its_hosts_its_forms_and_its_memory(service):
    url, proc, _ = service
    query = {"query": "seven", "modality": "audio"}
    # another site's name for 127.0.0.1 (DNS rebinding), and a form from another page (no preflight)
    status, answer = call(url, "/api/search", query, headers={"Host": "attacker.example:80"})
    assert status == 403 and "not 'attacker.example'" in answer["error"]
    form = {"query_modality": "image", "modality": "audio"}
    status, answer = call(url, "/api/search", form, {"file": b"x"}, headers={"X-Requested-With": ""})
    assert status == 403 and "X-Requested-With" in answer["error"]
    assert call(url, "/api/search", query, headers={"Host": f"localhost:{url.rsplit(':', 1)[1]}"})[0] == 200
    # 20 minutes of 8 channels at 48 kHz: 0.5 MB on the wire, 1.8 GB decoded whole; read by window
    before = peak_kib(proc.pid)
    bomb = silent_flac(20 * 60, rate=48000, channels=8)
    status, found = call(url, "/api/search", {"query_modality": "audio", "modality": "image"}, {"file": bomb})
    assert status == 200 and found["results"]
    assert peak_kib(proc.pid) - before < 100 * 1024, "the upload was decoded whole"


def chromium():
    """Debian's chromium, headless, through its WebDriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1100,900",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(DRIVER), options=options)


@pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver (scripts/install.sh)"
)
def test_the_page_shows_result_cards_in_a_real_browser(service, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, _, _ = service
    browser = chromium()
    try:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#modality option")) == 3)
        Select(browser.find_element(By.ID, "modality")).select_by_value("image")
        browser.find_element(By.ID, "query").send_keys("the digit seven")
        browser.find_element(By.ID, "k").clear()
        browser.find_element(By.ID, "k").send_keys("8")
        browser.find_element(By.ID, "go").click()
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "image results"))
        cards = browser.find_elements(By.CSS_SELECTOR, ".card")
        assert len(cards) == 8
        wait.until(
            lambda b: b.execute_script(
                "return [...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth > 0)"
            )
        )
        assert all(c.find_elements(By.TAG_NAME, "img") and c.find_elements(By.TAG_NAME, "audio") for c in cards)
        labels = [c.find_element(By.CLASS_NAME, "label").text for c in cards]
        assert labels.count("seven") >= 6, labels
        assert any(c.find_elements(By.CSS_SELECTOR, ".caption + .caption") for c in cards), "captions shown"
        out = Path(os.environ.get("CONTRASTIVE_TEST_ARTIFACTS", tmp_path))
        out.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(out / "search-page.png"))
        # "show" runs the same query again, shown as the other modality: each card leads with a clip
        Select(browser.find_element(By.ID, "modality")).select_by_value("audio")
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "audio results"))
        first = browser.find_element(By.CSS_SELECTOR, ".card > *")
        assert first.tag_name == "audio"
        # the query is in the URL: a reload (or a shared link) gives the same search
        assert "q=the+digit+seven" in browser.current_url and "show=audio" in browser.current_url
        browser.refresh()
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "8 audio results"))
        assert browser.find_element(By.ID, "query").get_attribute("value") == "the digit seven"
        assert browser.find_element(By.ID, "modality").get_attribute("value") == "audio"
        # an error clears the results it would stand beside, and speaks of the input
        browser.find_element(By.ID, "query").clear()
        browser.find_element(By.ID, "query").send_keys(" ")
        browser.find_element(By.ID, "go").click()
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "the query is empty"))
        assert not browser.find_elements(By.CSS_SELECTOR, ".card")
        assert "/" not in browser.find_element(By.ID, "info").text  # no server path shown
    finally:
        browser.quit()


@pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver (scripts/install.sh)"
)
def test_the_page_says_so_when_the_server_is_gone(service):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    _, _, tmp = service
    port = free_port()
    own = subprocess.Popen(
        [str(BIN / "contrastive-embed"), "serve", str(tmp / "idx"), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    browser = chromium()
    try:
        _wait_until_up(f"http://127.0.0.1:{port}/api/info", own, timeout=180)
        browser.get(f"http://127.0.0.1:{port}/?q=the+digit+seven&show=image&k=4")
        wait = WebDriverWait(browser, 60)
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "4 image results"))
        own.terminate()
        own.wait(timeout=30)
        browser.find_element(By.ID, "go").click()
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "the server did not answer"))
        assert not browser.find_elements(By.CSS_SELECTOR, ".card")
    finally:
        browser.quit()
        own.kill()
