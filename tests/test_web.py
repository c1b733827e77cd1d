"""`edgeexit web` and the examples/web page: the page's preprocessing is InputSpec.preprocess's, the server
serves what the page needs and nothing else, bad input is one line, and in headless Chromium the page
decides as `edgeexit run` does."""
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgeexit.cli import main
from edgeexit.errors import BundleError, ConfigError
from edgeexit.runtime import web
from edgeexit.runtime.cascade_bytes import tunable_cascade_bytes
from edgeexit.runtime.manifest import CASCADE_NAME, MANIFEST_NAME, InputSpec, load_manifest

WEB = Path(__file__).resolve().parent.parent / "examples" / "web"
NODE_INSTALL = "install Node.js (apt-get install -y nodejs npm)"
CHROMIUM = "/usr/bin/chromium"


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def node_or_skip() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip(f"node is not installed: {NODE_INSTALL}")
    return node


# ---------------------------------------------------------------- preprocessing: JS against Python
RUN_PREPROCESS = """
import { readFileSync, writeFileSync } from 'node:fs';
const [module, casesFile, outFile] = process.argv.slice(1);
const { preprocess, pixelsToImage } = await import(module);
const cases = JSON.parse(readFileSync(casesFile, 'utf8'));
const out = cases.map((c) => c.rgba
  ? Array.from(pixelsToImage(Uint8ClampedArray.from(c.rgba), c.width, c.height, c.channels).data)
  : Array.from(preprocess({ data: Float32Array.from(c.data), channels: c.channels, height: c.height, width: c.width }, c.spec)));
writeFileSync(outFile, JSON.stringify(out));
"""


def run_js(cases: list[dict], tmp_path: Path) -> list[np.ndarray]:
    node = node_or_skip()
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    done = subprocess.run([node, "--input-type=module", "-e", RUN_PREPROCESS, (WEB / "preprocess.js").as_uri(),
                           str(tmp_path / "cases.json"), str(tmp_path / "out.json")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [np.asarray(values, dtype=np.float64) for values in json.loads((tmp_path / "out.json").read_text())]


def spec_dict(channels: int, height: int, width: int, mean, std) -> dict:
    return {"name": "input", "shape": ["batch", channels, height, width], "dtype": "float32", "layout": "NCHW",
            "mean": list(mean), "std": list(std), "class_names": ["a", "b"]}


# (image channels, h, w) -> (bundle channels, H, W): up, down, odd ratios, same size, gray <-> RGB
RESIZES = [((1, 8, 8), (1, 16, 16)), ((1, 37, 23), (1, 16, 16)), ((3, 20, 31), (3, 32, 32)), ((3, 28, 28), (1, 28, 28)),
           ((1, 5, 9), (3, 12, 7)), ((3, 64, 48), (1, 28, 28)), ((1, 3, 3), (1, 1, 1)), ((3, 17, 17), (3, 17, 17))]


def test_page_preprocessing_matches_inputspec(tmp_path):
    rng = np.random.default_rng(0)
    cases, want = [], []
    for (have, h, w), (channels, height, width) in RESIZES:
        image = rng.random((have, h, w), dtype=np.float32)
        image[:, 0, 0] = (0.0, 1.0, 0.5)[:have]  # the ends of the range
        mean, std = rng.uniform(0.1, 0.6, channels), rng.uniform(0.15, 0.4, channels)
        spec = spec_dict(channels, height, width, mean.tolist(), std.tolist())
        cases.append({"data": image.ravel().tolist(), "channels": have, "height": h, "width": w, "spec": spec})
        want.append(InputSpec.from_dict(spec, 2).preprocess(image[None])[0].ravel())
    for got, expected, case in zip(run_js(cases, tmp_path), want, RESIZES):
        assert got.shape == expected.shape, case
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6, err_msg=str(case))


def test_page_pixels_are_pillows(tmp_path):
    """RGBA bytes as a canvas gives them -> [0, 1] floats as `edgeexit run` reads an image file (Pillow "L" or "RGB")."""
    from PIL import Image

    rgba = np.random.default_rng(1).integers(0, 256, (9, 13, 4), dtype=np.uint8)
    rgba[0, :4, :3] = [[0, 0, 0], [255, 255, 255], [255, 0, 0], [1, 2, 3]]
    image = Image.fromarray(rgba, mode="RGBA")
    cases = [{"rgba": rgba.ravel().tolist(), "width": 13, "height": 9, "channels": c} for c in (1, 3)]
    gray, rgb = run_js(cases, tmp_path)
    np.testing.assert_array_equal(gray, (np.asarray(image.convert("L"), dtype=np.float32) / 255.0).ravel())
    np.testing.assert_array_equal(rgb, (np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).transpose(2, 0, 1).ravel())


# ---------------------------------------------------------------- the server
@pytest.fixture
def page_root(tmp_path, monkeypatch):
    """A stand-in for examples/web with onnxruntime-web 'installed' (placeholder files), so the server runs without npm."""
    root = tmp_path / "web"
    for name in web.PAGE_FILES.values():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"// {name}")
    (root / web.ORT_DIST).mkdir(parents=True)
    for name in web.ORT_FILES:
        (root / web.ORT_DIST / name).write_bytes(name.encode())
    monkeypatch.setattr(web, "WEB_ROOT", root)
    return root


@pytest.fixture
def graph_bundle(handmade_bundles, tmp_path):
    """A hand-made bundle with its cascade.onnx built."""
    import handmade
    from edgeexit.export.cascade_graph import rebuild_cascade

    bundle = Path(shutil.copytree(handmade_bundles["confidence"], tmp_path / "bundle"))
    rebuild_cascade(bundle, handmade.synthetic_scores(n=32)[0])
    return bundle


def fetch(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        return exc.code, b"", ""


def test_server_serves_the_page_the_bundle_and_nothing_else(page_root, graph_bundle):
    server = web.open_server(graph_bundle, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address
        assert host == "127.0.0.1"
        base = f"http://127.0.0.1:{port}"
        assert fetch(f"{base}/") == (200, b"// index.html", "text/html; charset=utf-8")
        assert fetch(f"{base}/app.js")[:2] == (200, b"// app.js")
        assert fetch(f"{base}/ort/ort-wasm-simd-threaded.wasm") == (200, b"ort-wasm-simd-threaded.wasm", "application/wasm")
        assert fetch(f"{base}/bundle/{MANIFEST_NAME}")[1] == (graph_bundle / MANIFEST_NAME).read_bytes()
        status, content, _ = fetch(f"{base}/bundle/{CASCADE_NAME}")
        manifest = load_manifest(graph_bundle)
        assert status == 200 and content == tunable_cascade_bytes(manifest) != (graph_bundle / CASCADE_NAME).read_bytes()
        for path in ("/bundle/stage_0.onnx", "/../manifest.json", "/bundle/../manifest.json", "/ort/", "/node_modules/", "/web.py"):
            assert fetch(base + path)[0] == 404, path
    finally:
        server.shutdown()
        server.server_close()


def test_bad_bundle_is_a_one_line_error(page_root, tmp_path, handmade_bundles):
    code, out = cli("web", tmp_path / "missing", "--port", 0)
    assert code == BundleError.exit_code and out.strip().splitlines() == [f"error: bundle folder not found: {tmp_path / 'missing'}"]
    code, out = cli("web", handmade_bundles["confidence"], "--port", 0)  # no cascade.onnx
    assert code == BundleError.exit_code and len(out.strip().splitlines()) == 1 and "has no cascade.onnx" in out


def test_port_in_use_is_a_one_line_error(page_root, graph_bundle):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out = cli("web", graph_bundle, "--port", port)
    assert code == ConfigError.exit_code
    assert out.strip().splitlines() == [f"error: port {port} on 127.0.0.1 is in use: choose another with --port (0 picks a free one)"]
    code, out = cli("web", graph_bundle, "--port", 70000)
    assert code == ConfigError.exit_code and out.strip().splitlines() == ["error: --port must be 0..65535, got 70000"]


def test_missing_onnxruntime_web_names_the_install_command(page_root, graph_bundle):
    shutil.rmtree(page_root / "node_modules")
    code, out = cli("web", graph_bundle, "--port", 0)
    assert code == ConfigError.exit_code and len(out.strip().splitlines()) == 1
    assert "onnxruntime-web is not installed" in out and web.INSTALL in out


# ---------------------------------------------------------------- the page in headless Chromium
@pytest.mark.slow
def test_page_in_chromium_decides_as_edgeexit_run(tiny_bundle, tmp_path):
    from PIL import Image

    from edgeexit.runtime.datasets import load_digits_raw, split_indices

    node = node_or_skip()
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"Chromium is not installed: apt-get install -y chromium ({CHROMIUM})")
    for package in ("onnxruntime-web", "playwright-core"):
        if not (WEB / "node_modules" / package).is_dir():
            pytest.skip(f"{package} is not installed: {web.INSTALL}")
    images, _ = load_digits_raw()  # the demo bundle's test split, as 8x8 gray PNG files
    folder = tmp_path / "images"
    folder.mkdir()
    for k, i in enumerate(split_indices(len(images), "test")[:32]):
        Image.fromarray(np.round(images[i] / 16 * 255).astype(np.uint8), mode="L").save(folder / f"{k:02d}.png")
    files = sorted(str(p) for p in folder.iterdir())
    expected = {}
    for name, threshold in (("manifest", None), ("slider", 0.9)):
        extra = [] if threshold is None else ["--threshold", threshold]
        code, out = cli("run", tiny_bundle, "--input", folder, "--engine", "graph", "--json", tmp_path / f"{name}.json", *extra)
        assert code == 0, out
        expected[name] = json.loads((tmp_path / f"{name}.json").read_text())

    server = subprocess.Popen([sys.executable, "-m", "edgeexit", "web", str(tiny_bundle), "--port", "0"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = server.stdout.readline()
        assert first.startswith(f"serving {tiny_bundle} at http://127.0.0.1:") and first.rstrip().endswith("(Ctrl-C stops)"), first
        url = first.split(" at ", 1)[1].split()[0]
        config = {"webDir": str(WEB), "url": url, "chromium": CHROMIUM, "files": files, "threshold": 0.9,
                  "screenshot": str(tmp_path / "page.png")}
        (tmp_path / "config.json").write_text(json.dumps(config))
        done = subprocess.run([node, str(Path(__file__).parent / "web_page.mjs"), str(tmp_path / "config.json")],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        page = json.loads(done.stdout)
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = server.communicate(timeout=30)
    assert server.returncode == 0 and out.strip() == "stopped" and err == "", (out, err)

    assert page["errors"] == [] and "onnxruntime-web" in page["status"]
    names = load_manifest(tiny_bundle).input_spec.class_names
    for key, report in (("shown", expected["manifest"]), ("afterSlider", expected["slider"])):
        assert [r["prediction"] for r in page[key]] == report["predictions"], key
        assert [r["exit"] for r in page[key]] == report["exit_index"], key
        assert [r["classText"] for r in page[key]] == [names[p] for p in report["predictions"]], key
    assert page["histogram"] == np.bincount(expected["manifest"]["exit_index"], minlength=3).tolist()
    assert page["thresholdsUsed"] == "thresholds per exit: 0.9, 0.9"
    assert set(expected["manifest"]["exit_index"]) != set(expected["slider"]["exit_index"])  # the slider changed decisions
    assert (tmp_path / "page.png").stat().st_size > 10_000
