"""view: neuroglancer serves a crop on 127.0.0.1 and headless Chromium draws its layers.

The browser test needs Debian's ``chromium`` (CI: ``apt-get install -y chromium``); it is
driven over the DevTools protocol with tornado's websocket client (tornado comes with
neuroglancer), so no browser-automation package is needed.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import zarr

from cellmap_repro.errors import ReproError
from cellmap_repro.view import build_state, open_viewer

from test_evaluate import write_processed

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--use-angle=swiftshader",  # WebGL in software: no GPU, no display
    "--enable-unsafe-swiftshader",
    "--window-size=900,700",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
]


class Browser:
    """Just enough of the DevTools protocol: navigate, evaluate, screenshot."""

    def __init__(self, profile: Path):
        self.process = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.profile = profile
        self.next_id = 0

    async def connect(self, timeout: float = 20.0):
        from tornado.websocket import websocket_connect

        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
            assert time.monotonic() < deadline and self.process.poll() is None, "chromium did not start"
            await asyncio.sleep(0.05)
        port = port_file.read_text().split()[0]
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5))
        page = next(t for t in targets if t["type"] == "page")
        self.socket = await websocket_connect(page["webSocketDebuggerUrl"], max_message_size=64 << 20)

    async def call(self, method: str, **params):
        self.next_id += 1
        await self.socket.write_message(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self.socket.read_message())
            if message.get("id") == self.next_id:
                return message.get("result", {})

    async def text(self) -> str:
        result = await self.call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''", returnByValue=True)
        return result["result"].get("value", "")

    async def screenshot(self) -> np.ndarray:
        from PIL import Image

        data = base64.b64decode((await self.call("Page.captureScreenshot", format="png"))["data"])
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    def close(self):
        self.process.terminate()
        self.process.wait(timeout=10)


async def capture_then_clear(url: str, wanted: list[str], clear, drawn, profile: Path, timeout: float = 20.0):
    """Screenshots once every wanted layer name shows and ``drawn(screenshot)`` holds (or the
    time is up: data chunks arrive after the layer list), then again after ``clear()``."""
    browser = Browser(profile)

    async def wait_for_text(condition, what):
        deadline = time.monotonic() + timeout
        text = await browser.text()
        while not condition(text):
            assert time.monotonic() < deadline, f"{what}; page text: {text[:300]!r}"
            await asyncio.sleep(0.2)
            text = await browser.text()
        return text

    try:
        await browser.connect()
        await browser.call("Page.navigate", url=url)
        text = await wait_for_text(lambda t: all(name in t for name in wanted), "layers never appeared")
        deadline = time.monotonic() + timeout
        shot = await browser.screenshot()
        while not drawn(shot) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            shot = await browser.screenshot()
        clear()
        await wait_for_text(lambda t: not any(name in t for name in wanted), "layers never went away")
        await asyncio.sleep(0.5)
        return text, shot, await browser.screenshot()
    finally:
        browser.close()


def panel_spread(image: np.ndarray) -> float:
    """Grey-level spread inside the cross-section panel (the crop's middle region)."""
    height, width, _ = image.shape
    middle = image[height // 3 : 2 * height // 3, width // 3 : 2 * width // 3].astype(float)
    return float(middle.std())


def colourful(image: np.ndarray) -> float:
    """Fraction of pixels whose channels differ clearly (segment colours; raw and background are grey)."""
    pixels = image.reshape(-1, 3).astype(int)
    return float(np.mean(pixels.max(axis=1) - pixels.min(axis=1) > 40))


@pytest.fixture
def viewed(fast_experiment, tiny_dataset, tmp_path):
    data_root = tmp_path / "data"
    write_processed(data_root / "processed" / "fast", tiny_dataset, 3, ["mito", "ecs"])
    # logits for mito only: +2 inside, -2 outside
    write_processed(data_root / "predictions" / "fast", tiny_dataset, 3, ["mito"], transform=lambda name, a: np.where(a > 0, 2.0, -2.0).astype(np.float32))
    return fast_experiment, data_root


def test_state_has_raw_truth_and_processed_layers_in_place(viewed, tiny_dataset):
    experiment, data_root = viewed
    state, notes = build_state("fast", 3, data_root, experiment.parent, classes=["mito", "ecs"])
    assert list(state["layers"]) == ["raw", "truth mito", "truth ecs", "prediction mito", "processed mito", "processed ecs"]
    assert [n for n in notes if n.startswith("no ")] == [n for n in notes if "no prediction 'ecs'" in n] and len(notes) == 1
    # the crop's 4 nm voxel 0 is centred at its translation; the view opens on the crop's centre
    levels = zarr.open_group(str(tiny_dataset / "recon-1/labels/groundtruth/crop3/mito"), mode="r").attrs["multiscales"][0]["datasets"][0]
    translation = np.array(levels["coordinateTransformations"][1]["translation"])
    shape = np.array(zarr.open_array(str(tiny_dataset / "recon-1/labels/groundtruth/crop3/mito/s0"), mode="r").shape)
    centre_nm = translation - 2 + 4 * shape / 2
    assert np.allclose(np.array(state["view"]["position"]) * 4, centre_nm[::-1])  # global space is x, y, z
    truth_source = state["layers"]["truth mito"].source[0]
    assert np.allclose(np.array(truth_source.transform.matrix)[:, 3], (translation - 2) / 4)


def test_unknown_crop_and_class_are_one_line_errors(viewed):
    experiment, data_root = viewed
    with pytest.raises(ReproError, match=r"crop 999 is not in fast.s datasplit \(crops: 1, 2, 3\)"):
        build_state("fast", 999, data_root, experiment.parent)
    with pytest.raises(ReproError, match="unknown class"):
        build_state("fast", 3, data_root, experiment.parent, classes=["mitochondria"])


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium)")
def test_headless_chromium_shows_the_layers(viewed, tmp_path):
    experiment, data_root = viewed
    viewer, url, _ = open_viewer("fast", 3, data_root, experiment.parent, classes=["mito", "ecs"], layout="xy")
    assert url.startswith("http://127.0.0.1:")
    with viewer.txn() as s:
        s.layers["processed mito"].visible = True
    def clear():
        with viewer.txn() as s:
            for name in [layer.name for layer in s.layers]:
                del s.layers[name]

    def drawn(image):
        return panel_spread(image) > 10 and colourful(image) > 0.02

    text, shot, empty = asyncio.run(capture_then_clear(url, ["raw", "truth mito", "prediction mito", "processed mito"], clear, drawn, tmp_path / "profile"))
    assert "truth ecs" in text and "processed ecs" in text
    from PIL import Image

    Image.fromarray(shot).save(tmp_path / "view.png")  # kept for a person to look at
    # An empty viewer's panel is flat grey; raw noise and segment colours make it vary.
    print(f"spread {panel_spread(shot):.1f} vs {panel_spread(empty):.1f}; colourful {colourful(shot):.3f} vs {colourful(empty):.3f}")
    assert panel_spread(shot) > panel_spread(empty) + 10
    # mito (and its processed mask) and ecs are drawn in colour over the grey raw
    assert colourful(shot) > colourful(empty) + 0.02


def test_cli_prints_the_url_and_stops_at_the_timeout(viewed, capsys):
    from cellmap_repro.cli import main

    experiment, data_root = viewed
    start = time.monotonic()
    assert main(["view", "-e", "fast", "--crop", "3", "--classes", "mito", "--data", str(data_root), "--experiments-root", str(experiment.parent), "--timeout", "0.5"]) == 0
    assert time.monotonic() - start < 20
    out = capsys.readouterr().out
    assert "neuroglancer: http://127.0.0.1:" in out and "note:" not in out  # mito has truth, prediction and mask
