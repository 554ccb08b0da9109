"""The web console in a real browser: Debian's chromium driven by playwright against a real server on a repository
built here (models whose answers follow from the drawing or the text), plus the published examples when
`make models` has made them. Every browser test fails on a console error or an uncaught page error.

Screenshots for the README: DEEPSERVE_SCREENSHOTS=1 writes docs/console-*.png (otherwise they go to a temporary
folder, so a plain test run leaves the tree clean)."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import struct
import subprocess
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper
from support import ROOT, Server, add_sub_model, save

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PHONE, DESKTOP = {"width": 390, "height": 844}, {"width": 1280, "height": 720}
PUBLISHED = ROOT / "models"
LANGS = ["en", "fr", "de"]

# --- models whose answers are known ------------------------------------------------------------------------------


def region_masks() -> np.ndarray:
    """10 regions of the 8x8 image: columns 0..7 above row 6, then the bottom two rows' left and right halves."""
    masks = np.zeros((10, 8, 8), np.float32)
    for k in range(8):
        masks[k, :6, k] = 1
    masks[8, 6:, :4] = 1
    masks[9, 6:, 4:] = 1
    return masks


def regions_model():
    """image FP32 [B,1,8,8] -> probabilities = softmax(10 * mean intensity of each region): the class is the region
    drawn in."""
    masks = region_masks().reshape(10, 64)
    w = (masks / masks.sum(1, keepdims=True)).T * 10
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 8, 8])
    p = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])
    inits = [helper.make_tensor("w", TensorProto.FLOAT, [64, 10], w.ravel()),
             helper.make_tensor("flat", TensorProto.INT64, [2], [-1, 64])]
    nodes = [helper.make_node("Reshape", ["image", "flat"], ["x"]), helper.make_node("MatMul", ["x", "w"], ["s"]),
             helper.make_node("Softmax", ["s"], ["probabilities"], axis=-1)]
    return helper.make_model(helper.make_graph(nodes, "regions", [x], [p], initializer=inits))


REGIONS_CONFIG = """
max_batch_size: 8
input [ { name: "image" data_type: TYPE_FP32 dims: [ 1, 8, 8 ] } ]
output [ { name: "probabilities" data_type: TYPE_FP32 dims: [ 10 ] label_filename: "labels.txt" } ]
"""


def langs_model():
    """tokens INT64 [B,T] (byte + 1, 0 pads) -> probabilities over en/fr/de: 0.1 per ASCII letter for en, 5 per
    French or German accented letter (its UTF-8 continuation byte)."""
    w = np.zeros((257, 3), np.float32)
    for b in [*range(65, 91), *range(97, 123)]:
        w[b + 1, 0] = 0.1
    for ch, lang in [*((c, 1) for c in "éèçàê"), *((c, 2) for c in "üöäß")]:
        w[ch.encode()[1] + 1, lang] = 5
    t = helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "time"])
    p = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])
    inits = [helper.make_tensor("w", TensorProto.FLOAT, [257, 3], w.ravel()),
             helper.make_tensor("axes", TensorProto.INT64, [1], [1])]
    nodes = [helper.make_node("Gather", ["w", "tokens"], ["e"]),
             helper.make_node("ReduceSum", ["e", "axes"], ["s"], keepdims=0),
             helper.make_node("Softmax", ["s"], ["probabilities"], axis=-1)]
    return helper.make_model(helper.make_graph(nodes, "langs", [t], [p], initializer=inits))


LANGS_CONFIG = """
max_batch_size: 8
input [ { name: "tokens" data_type: TYPE_INT64 dims: [ -1 ] } ]
output [ { name: "probabilities" data_type: TYPE_FP32 dims: [ 3 ] label_filename: "labels.txt" } ]
parameters [ { key: "text_input" value { string_value: "tokens" } },
             { key: "text_offset" value { string_value: "1" } },
             { key: "text_max_length" value { string_value: "64" } } ]
"""


def sampler_table() -> np.ndarray:
    """The image each label gives: values in quarters, different per label."""
    r, c = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    return np.stack([((r * 8 + c + k) % 5) / 4 for k in range(10)]).astype(np.float32)[:, None]  # (10, 1, 8, 8)


def sampler_model():
    """z FP32 [B,4], label INT64 [B] -> image FP32 [B,1,8,8] = table[label] + 0 * sum(z): a conditional sampler
    whose samples are known."""
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 4])
    label = helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"])
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 8, 8])
    inits = [helper.make_tensor("table", TensorProto.FLOAT, [10, 1, 8, 8], sampler_table().ravel()),
             helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
             helper.make_tensor("more", TensorProto.INT64, [2], [2, 3]),
             helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])]
    nodes = [helper.make_node("Gather", ["table", "label"], ["t"], axis=0),
             helper.make_node("ReduceSum", ["z", "axes"], ["zs"], keepdims=1),
             helper.make_node("Unsqueeze", ["zs", "more"], ["z4"]), helper.make_node("Mul", ["z4", "zero"], ["z0"]),
             helper.make_node("Add", ["t", "z0"], ["image"])]
    return helper.make_model(helper.make_graph(nodes, "sampler", [z, label], [image], initializer=inits))


def png(width: int = 4, height: int = 3) -> bytes:
    """A small grey PNG (the training curve stand-in)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


GENERATORS: dict = {}  # generation models served with their torch reference, where torch is installed
CARD = {"name": "digits_regions", "version": 1, "job": "digits_regions", "task": "classify",
        "data": {"name": "ten regions of an 8x8 image", "samples": 10}, "test": {"accuracy": 0.875},
        "parity": {"max_abs_diff": 1.5e-7}}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("console") / "models"
    v1 = save(regions_model(), repo, "digits_regions", config=REGIONS_CONFIG).parent
    (repo / "digits_regions" / "labels.txt").write_text("".join(f"{i}\n" for i in range(10)))
    (v1 / "card.json").write_text(json.dumps(CARD))
    (v1 / "training_curve.png").write_bytes(png())
    save(langs_model(), repo, "langs", config=LANGS_CONFIG)
    (repo / "langs" / "labels.txt").write_text("\n".join(LANGS) + "\n")
    save(sampler_model(), repo, "sampler")
    save(add_sub_model(), repo, "add_sub")
    save(add_sub_model(), repo, "watched")
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    for name in ("digits_cnn", "langid_transformer", "text_gpt", "digits_gan", "digits_vae"):
        if (PUBLISHED / name / "config.pbtxt").is_file():
            shutil.copytree(PUBLISHED / name, repo / name, ignore=shutil.ignore_patterns(".*"))
    try:  # a generation model: the tiny byte GPT the generation tests train in seconds (needs the train extra)
        from gpt_support import publish_tiny_gpt
        GENERATORS["tiny_gpt"] = publish_tiny_gpt(repo, 64, "tiny_gpt")[1]
    except ImportError:
        pass
    return repo


@pytest.fixture(scope="module")
def server(repo):
    s = Server(repo, "--no-strict-readiness")
    yield s
    s.stop()


def get(url: str, headers: dict | None = None, context: ssl.SSLContext | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def post(url: str, doc: dict, headers: dict | None = None) -> dict:
    req = urllib.request.Request(url, json.dumps(doc).encode(), {"content-type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"null")


# --- without a browser ----------------------------------------------------------------------------------------------


def test_static_files_and_artifacts(server, repo):
    status, headers, body = get(server.http_url + "/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert body == (ROOT / "service" / "console" / "index.html").read_bytes()
    assert "script-src 'self'" in headers["content-security-policy"]
    for name, ctype in (("console.js", "text/javascript; charset=utf-8"), ("console.css", "text/css; charset=utf-8"),
                        ("favicon.svg", "image/svg+xml")):
        status, headers, body = get(f"{server.http_url}/console/{name}")
        assert (status, headers["content-type"]) == (200, ctype)
        assert body == (ROOT / "service" / "console" / name).read_bytes()
        assert get(f"{server.http_url}/console/{name}", {"if-none-match": headers["etag"]})[0] == 304
    status, _, body = get(server.http_url + "/console/index.js")
    assert status == 404 and b"no such endpoint" in body
    base = server.http_url + "/console/models"
    status, headers, body = get(f"{base}/digits_regions/versions/1/card")
    assert (status, headers["content-type"], json.loads(body)) == (200, "application/json", CARD)
    status, headers, body = get(f"{base}/digits_regions/versions/1/curve")
    assert (status, headers["content-type"], body) == (200, "image/png", png())
    assert get(f"{base}/langs/versions/1/card")[0] == 204  # a version no training job published
    assert get(f"{base}/broken/versions/1/curve")[0] == 204
    status, _, body = get(f"{base}/nope/versions/1/card")
    assert (status, json.loads(body)) == (404, {"error": "unknown model 'nope'"})
    # nothing of the request but a known model name and an integer version reaches the disk
    for bad in ("..%2F..%2Fetc/versions/1/card", "digits_regions/versions/..%2F1/card",
                "digits_regions/versions/1/model.onnx", "digits_regions/versions/1/card.json"):
        assert get(f"{base}/{bad}")[0] in (400, 404), bad


def test_no_console(repo):
    s = Server(repo, "--no-strict-readiness", "--no-console")
    try:
        for path in ("/", "/console/console.js", "/console/models/digits_regions/versions/1/card"):
            status, _, body = get(s.http_url + path)
            assert (status, json.loads(body)) == (404, {"error": f"GET {path}: no such endpoint; see "
                                                                 "/v2/openapi.json"})
        assert get(s.http_url + "/v2")[0] == 200
    finally:
        s.stop()


# --- in the browser ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no {CHROMIUM}: `make browser` installs Debian's chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


class Console:
    """A page on the console with every console error and uncaught exception collected."""

    def __init__(self, browser, url: str, viewport: dict = DESKTOP, **context) -> None:
        self.context = browser.new_context(viewport=viewport, **context)
        self.page = self.context.new_page()
        self.page.set_default_timeout(15000)
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}")
                     if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        self.url = url

    def open(self, hash_: str = "#models") -> None:
        self.page.goto(self.url + "/" + hash_)
        self.page.wait_for_selector("#models article", state="attached")

    def close(self) -> list[str]:
        self.context.close()
        return self.errors


@pytest.fixture
def console(browser, server):
    c = Console(browser, server.http_url)
    yield c
    assert c.close() == []


def shots_dir(tmp_path: Path) -> Path:
    return ROOT / "docs" if os.environ.get("DEEPSERVE_SCREENSHOTS") else tmp_path


def no_horizontal_scroll(page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_models_view(console, server, repo, tmp_path):
    console.open()
    page = console.page
    index = post(server.http_url + "/v2/repository/index", {})
    names = sorted({e["name"] for e in index})
    assert sorted(page.eval_on_selector_all("#models article", "es => es.map(e => e.dataset.model)")) == names
    broken = next(e for e in index if e["name"] == "broken")
    assert broken["state"] == "UNAVAILABLE"
    card = page.locator('article[data-model="broken"]')
    assert card.locator(".badge").first.inner_text() == "UNAVAILABLE"
    assert card.locator(".reason").inner_text() == broken["reason"]
    regions = page.locator('article[data-model="digits_regions"]')
    assert regions.locator(".provider").inner_text() == "CPUExecutionProvider"
    assert regions.locator("table").first.locator("td").all_inner_texts() == ["image", "FP32", "[-1, 1, 8, 8]"]
    assert regions.locator("table").nth(1).locator("td").all_inner_texts() == [
        "probabilities (labels: labels.txt)", "FP32", "[-1, 10]"]
    regions.locator("details.card > summary").click()
    regions.locator("details.card img").wait_for()
    page.wait_for_function("() => document.querySelector('article[data-model=digits_regions] img').naturalWidth === 4")
    assert "accuracy" in regions.locator("details.card").inner_text()
    assert "0.875" in regions.locator("details.card").inner_text()
    page.locator('article[data-model="langs"] details.card > summary').click()
    page.locator('article[data-model="langs"] details.card p.muted').wait_for()


def draw_column(page, k: int) -> None:
    """A vertical stroke down the middle of 8x8 column k, rows 0..5: region k of the regions model."""
    box = page.locator("canvas.draw").bounding_box()
    x = box["x"] + box["width"] * (4 * k + 2) / 32
    page.mouse.move(x, box["y"] + box["height"] * 2 / 32)
    page.mouse.down()
    for i in range(3, 23):
        page.mouse.move(x, box["y"] + box["height"] * i / 32)
    page.mouse.up()


def top_label(page) -> str:
    return page.locator(".result ol.top li.best .label").inner_text()


def test_draw_a_digit(console, tmp_path):
    console.open("#try/digits_regions")
    page = console.page
    page.locator("#fit").uncheck()  # the regions model answers where the stroke is, so keep it there
    for k in (2, 7, 0):
        page.get_by_role("button", name="Clear").click()
        draw_column(page, k)
        page.wait_for_function(f"() => document.querySelector('.result li.best')?.dataset.index === '{k}'")
        assert top_label(page) == str(k)
        counts = [int(c) for c in page.locator("canvas.preview").get_attribute("data-counts").split(",")]
        expected = np.zeros((8, 8), int)
        # the thick pen (a disk of radius 2 sub-pixels) centred on the column's middle covers its 4 sub-columns;
        # the stroke's round ends leave the outer two of the first and last sub-rows blank
        expected[:6, k] = [14, 16, 16, 16, 16, 14]
        assert counts == expected.ravel().tolist()
    assert len(page.locator(".result ol.top li").all()) == 3
    # by keyboard: the cursor starts at the middle sub-pixel (16, 16), in column 4 of the 8x8 grid
    page.get_by_role("button", name="Clear").click()
    page.locator("#brush").select_option("0")
    page.locator("canvas.draw").focus()
    page.keyboard.press("Space")
    for _ in range(3):
        page.keyboard.press("Shift+ArrowDown")
    page.wait_for_function("() => document.querySelector('.result li.best')?.dataset.index === '4'")
    assert page.locator("canvas.preview").get_attribute("data-counts") == ",".join(
        "4" if (r, c) == (4, 4) else "0" for r in range(8) for c in range(8))  # sub-pixels (16..19, 16)


def draw_counts(page, counts: np.ndarray) -> None:
    """Draw an 8x8 image of counts 0..16 with the fine pen: in each 4x4 block, the first `count` sub-pixels in row
    order, one horizontal stroke per run of sub-pixels on a row of the 32x32 bitmap."""
    bits = np.zeros((32, 32), bool)
    for (r, c), n in np.ndenumerate(counts):
        block = np.zeros(16, bool)
        block[:int(n)] = True
        bits[4 * r:4 * r + 4, 4 * c:4 * c + 4] = block.reshape(4, 4)
    box = page.locator("canvas.draw").bounding_box()
    cell = box["width"] / 32
    for i in range(32):
        j = 0
        while j < 32:
            if not bits[i, j]:
                j += 1
                continue
            start = j
            while j < 32 and bits[i, j]:
                j += 1
            y = box["y"] + (i + 0.5) * cell
            page.mouse.move(box["x"] + (start + 0.5) * cell, y)
            page.mouse.down()
            page.mouse.move(box["x"] + (j - 0.5) * cell, y)  # the page interpolates between pointer events
            page.mouse.up()


def test_draw_published_examples(console):
    examples = PUBLISHED / "digits_cnn"
    found = sorted(examples.glob("*/examples.npz"), key=lambda p: int(p.parent.name)) if examples.is_dir() else []
    if not found:
        pytest.skip("models/digits_cnn has no published examples.npz: `make models` trains it")
    data = np.load(found[-1])
    y = data["label"]  # the published test rows: the model's input by name, and their true labels
    x = data[next(k for k in data.files if k not in ("label", "text"))].reshape(len(y), 8, 8)
    console.open("#try/digits_cnn")
    page = console.page
    page.locator("#fit").uncheck()
    page.locator("#brush").select_option("0")
    for i in range(3):
        page.get_by_role("button", name="Clear").click()
        counts = np.rint(x[i] * 16).astype(int)
        draw_counts(page, counts)
        assert page.locator("canvas.preview").get_attribute("data-counts") == ",".join(map(str, counts.ravel()))
        page.wait_for_function(f"() => document.querySelector('.result li.best')?.dataset.index === '{int(y[i])}'")


FREEHAND = {  # strokes as fractions of the drawing area, drawn with the thick pen and "fit to the box" on
    0: [[(0.5, 0.15), (0.7, 0.3), (0.72, 0.6), (0.5, 0.85), (0.3, 0.6), (0.3, 0.3), (0.5, 0.15)]],
    1: [[(0.5, 0.15), (0.5, 0.85)]],
    4: [[(0.6, 0.15), (0.3, 0.6), (0.75, 0.6)], [(0.6, 0.4), (0.6, 0.85)]],
}


def test_freehand_digits_published_model(console, tmp_path):
    """Digits drawn by hand at any size: fitted to the box as the scans were, the trained CNN reads them."""
    if not (PUBLISHED / "digits_cnn" / "config.pbtxt").is_file():
        pytest.skip("models/digits_cnn is not published: `make models` trains it")
    console.open("#try/digits_cnn")
    page = console.page
    for digit, lines in FREEHAND.items():
        page.get_by_role("button", name="Clear").click()
        box = page.locator("canvas.draw").bounding_box()
        for line in lines:
            page.mouse.move(box["x"] + line[0][0] * box["width"], box["y"] + line[0][1] * box["height"])
            page.mouse.down()
            for x, y in line[1:]:
                page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"], steps=8)
            page.mouse.up()
        page.wait_for_function(f"() => document.querySelector('.result li.best')?.dataset.index === '{digit}'")
    page.screenshot(path=shots_dir(tmp_path) / "console-desktop.png")


def test_identify_a_language(console):
    console.open("#try/langs")
    page = console.page
    for text, lang in (("hello world", "en"), ("Ça été très bien, merci", "fr"), ("Grüße aus München", "de")):
        page.locator("#text").fill(text)
        page.get_by_role("button", name="Identify").click()
        page.wait_for_function(f"() => document.querySelector('.result li.best .label')?.textContent === '{lang}'")
    if (PUBLISHED / "langid_transformer" / "config.pbtxt").is_file():
        console.open("#try/langid_transformer")
        page.locator("#text").fill("Bonjour, comment allez-vous aujourd'hui ?")
        page.get_by_role("button", name="Identify").click()
        page.locator(".result li.best .label").wait_for()
        assert "fr" in page.locator(".result li.best .label").inner_text().lower()


def test_sampler_images(console):
    console.open("#try/sampler")
    page = console.page
    page.locator("#label").fill("3")
    page.locator("#count").fill("5")
    page.get_by_role("button", name="Sample").click()
    page.wait_for_function("() => document.querySelectorAll('.result canvas.sample').length === 5")
    grey = page.evaluate("""[...document.querySelectorAll('.result canvas.sample')].map(c => {
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        return Array.from({length: d.length / 4}, (_, k) => d[4 * k]); })""")
    expected = (255 - np.floor(sampler_table()[3].ravel() * 255 + 0.5)).astype(int).tolist()
    assert grey == [expected] * 5


def test_tensors_json_and_npy(console, tmp_path):
    console.open("#try/add_sub")
    page = console.page
    request = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]},
                          {"name": "y", "datatype": "FP32", "shape": [1, 4], "data": [10, 20, 30, 40]}]}
    page.locator("textarea.request").fill(json.dumps(request))
    page.locator("button.run").click()
    page.locator('.output[data-output="sum"] pre').wait_for()
    assert json.loads(page.locator('.output[data-output="sum"] pre').inner_text()) == [11, 22, 33, 44]
    assert page.locator('.output[data-output="sum"] h3').inner_text() == "sum: FP32 [1, 4]"
    x, y = np.arange(8, dtype=np.float32).reshape(2, 4), np.full((2, 4), 0.5, np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    page.locator('input[data-input="x"]').set_input_files(tmp_path / "x.npy")
    page.locator('input[data-input="y"]').set_input_files(tmp_path / "y.npy")
    page.get_by_text("FP32 [2, 4], 32 bytes").first.wait_for()
    page.locator("button.run").click()
    page.wait_for_function("() => document.querySelector('.output[data-output=diff] h3')?.textContent"
                           ".endsWith('[2, 4]')")
    assert json.loads(page.locator('.output[data-output="diff"] pre').inner_text()) == (x - y).ravel().tolist()
    # a wrong request shows the server's own message
    page.locator('input[data-input="x"]').set_input_files([])
    page.locator('input[data-input="y"]').set_input_files([])
    page.locator("textarea.request").fill(json.dumps({"inputs": [request["inputs"][0]]}))
    page.locator("button.run").click()
    page.locator(".result .error").wait_for()
    assert "input" in page.locator(".result .error").inner_text()
    console.errors[:] = [e for e in console.errors if "status of 400" not in e]  # the 400 itself, logged by chromium


def test_stream_a_generation(console, server):
    console.open()
    kinds = console.page.evaluate("""[...document.querySelectorAll('#try-model option')].map(o => o.textContent)""")
    generators = [k.split(" ")[0] for k in kinds if "text generation" in k]
    if not generators:
        pytest.skip("no generation model is served (text_gpt is published by `make models` once its job exists)")
    console.open(f"#try/{generators[0]}")
    page = console.page
    page.locator("#prompt").fill("Hello")
    page.locator("#max-tokens").fill("16")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_selector(".generate .done, .generate .error")
    if page.locator(".generate .error").count():
        message = page.locator(".generate .error").inner_text()
        console.errors[:] = [e for e in console.errors if "status of 404" not in e and "status of 501" not in e]
        if "does not offer streamed generation" in message:
            pytest.skip(f"the server serves {generators[0]} but has no generate_stream endpoint yet: {message}")
        pytest.fail(message)
    text = page.locator("pre.generated").inner_text()
    if generators[0] in GENERATORS:
        from gpt_support import reference

        assert text == reference(GENERATORS[generators[0]], "Hello", 16)[0]  # greedy: the torch decode exactly
    else:
        assert text != ""


def test_watch(console, server, tmp_path):
    console.open("#watch")
    page = console.page
    page.locator("#interval").select_option("1000")
    page.locator('#watch tr[data-model="watched"]').wait_for()
    body = {"inputs": [{"name": n, "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]} for n in "xy"]}
    for _ in range(7):
        post(server.http_url + "/v2/models/watched/infer", body)
    row = page.locator('#watch tr[data-model="watched"]')
    page.wait_for_function("() => document.querySelector('#watch tr[data-model=watched] .total').textContent === '7'")
    assert row.locator(".failed").inner_text() == "0"
    assert row.locator(".mean-batch").inner_text() == "1.00"
    page.wait_for_function("() => /^\\d+\\.\\d\\d ms$/.test(document.querySelector('#watch tr[data-model=watched] "
                           ".compute').textContent) || document.querySelector('#watch tr[data-model=watched] "
                           ".batches').textContent === 'idle'")
    page.screenshot(path=shots_dir(tmp_path) / "console-watch.png")


def test_phone_layout(browser, server, tmp_path):
    c = Console(browser, server.http_url, PHONE)
    try:
        c.open()
        assert no_horizontal_scroll(c.page)
        c.page.screenshot(path=shots_dir(tmp_path) / "console-phone.png")
        c.open("#try/digits_regions")
        c.page.locator("canvas.draw").wait_for()
        assert no_horizontal_scroll(c.page)
        c.open("#watch")
        c.page.locator('#watch tr[data-model="watched"]').wait_for()
    finally:
        assert c.close() == []


def test_token_auth_over_tls(browser, repo, tmp_path):
    """With --auth-token-file and TLS the page loads (its static files are open), says it needs a token, and works
    once one is given; the card and every data call need it."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
                    "server.pem", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, cwd=tmp_path)
    (tmp_path / "tokens").write_text("s3cret\n")
    s = Server(repo, "--no-strict-readiness", "--auth-token-file", str(tmp_path / "tokens"), "--tls-cert",
               str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "server.key"), wait_ready=False)
    url = s.http_url.replace("http://", "https://")
    c = Console(browser, url, ignore_https_errors=True)
    try:
        s.wait_log("listening on")
        tls = ssl.create_default_context(cafile=str(tmp_path / "server.pem"))
        assert get(url + "/", context=tls)[0] == 200
        assert get(url + "/console/models/digits_regions/versions/1/card", context=tls)[0] == 401
        c.page.goto(url + "/")
        c.page.locator("#status").get_by_text("needs a bearer token").wait_for()
        c.page.locator("#token").fill("s3cret")
        c.page.get_by_role("button", name="Use").click()
        c.page.wait_for_selector('#models article[data-model="digits_regions"]')
        assert c.page.evaluate("sessionStorage.getItem('deepserve-token')") == "s3cret"
        c.page.locator('article[data-model="digits_regions"] details.card > summary').click()
        c.page.wait_for_function("() => document.querySelector('article[data-model=digits_regions] img')"
                                 "?.naturalWidth === 4")
    finally:
        errors = c.close()
        s.stop()
    assert errors and all("status of 401" in e for e in errors), errors  # the calls made before the token only
