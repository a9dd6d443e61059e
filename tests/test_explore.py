"""tokenbudget explore without a browser: the explorer's numbers, its JSON API over real HTTP on a
tiny timm model, bad input answered with a 4xx and a sentence, concurrent requests, the command."""

from __future__ import annotations

import argparse
import http.client
import io
import json
import re
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_tiny
from tokenbudget.cli.explore import cmd_explore, register
from tokenbudget.config import method_names
from tokenbudget.explore import Explorer, ImageStore, UnknownImage, make_server, merging_methods, server
from tokenbudget.flops import ideal_speedup
from tokenbudget.models import load_model, register_model

register_model("tiny-explore", lambda pretrained=False, img_size=None: make_tiny("dinov2_registers"))

PREFIX, GRID, PATCH = 5, (8, 8), 4  # the tiny model: 4 register tokens + class, 8x8 patches of 4 px
PATCHES = GRID[0] * GRID[1]


@pytest.fixture(scope="module")
def explorer() -> Explorer:
    return Explorer(load_model("tiny-explore"), model_name="tiny-explore")


@pytest.fixture(scope="module")
def base_url(explorer: Explorer) -> Iterator[tuple[str, int]]:
    httpd = make_server(explorer, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[:2]
    httpd.shutdown()
    httpd.server_close()


def call(
    address: tuple[str, int], method: str, path: str, body: object = None, raw: bytes | None = None
) -> tuple[int, str, bytes]:
    """(status, content type, body) of one request."""
    connection = http.client.HTTPConnection(*address, timeout=60)
    payload = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    connection.request(method, path, body=payload)
    response = connection.getresponse()
    result = response.status, response.getheader("Content-Type"), response.read()
    connection.close()
    return result


def run(address: tuple[str, int], **fields: object) -> tuple[int, dict]:
    request = {"image": "skimage:astronaut", "method": "tome", "kind": "keep", "value": 0.5} | fields
    status, _, body = call(address, "POST", "/api/run", request)
    return status, json.loads(body)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_data_url(url: str) -> np.ndarray:
    import base64

    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


# -- the explorer ------------------------------------------------------------------------------


def test_methods_are_the_merging_methods_that_trace_their_sources() -> None:
    methods = merging_methods()
    assert {"tome", "tome-detail", "tome-guard", "tome-optimal", "pool", "tofu"} <= set(methods)
    # random drop and pruning leave no groups to draw; methods without a keep budget have no slider
    assert not {"random", "prune", "dynamicvit"} & set(methods)
    assert set(methods) <= set(method_names())


def test_full_budget_changes_nothing(explorer: Explorer) -> None:
    result = explorer.run("skimage:coffee", "tome", "keep", 1.0)
    assert result["tokens_per_layer"] == [PREFIX + PATCHES] * 5
    assert result["groups"] == PATCHES
    assert result["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert result["ideal_speedup"] == pytest.approx(1.0)


@pytest.mark.parametrize("method", merging_methods())
def test_every_method_merges_to_the_budget(explorer: Explorer, method: str) -> None:
    result = explorer.run("skimage:astronaut", method, "keep", 0.25)
    tokens = result["tokens_per_layer"]
    assert tokens[0] == PREFIX + PATCHES
    assert tokens[-1] == PREFIX + round(0.25 * PATCHES)
    assert tokens == sorted(tokens, reverse=True)
    # every remaining patch token stands for one group of input patches drawn on the picture
    assert result["groups"] == tokens[-1] - PREFIX
    dims = explorer.adapter.block_dims()
    assert result["ideal_speedup"] == pytest.approx(ideal_speedup(tokens[0], tokens[1:], dims))
    assert 0.0 < result["cosine"] < 1.0 - 1e-6
    picture = decode_data_url(result["picture"])
    assert picture.shape == (GRID[0] * PATCH, GRID[1] * PATCH, 3)


def test_methods_draw_different_groups(explorer: Explorer) -> None:
    tome = explorer.run("skimage:chelsea", "tome", "keep", 0.3)
    pool = explorer.run("skimage:chelsea", "pool", "keep", 0.3)
    assert tome["tokens_per_layer"] == pool["tokens_per_layer"]
    assert not np.array_equal(decode_data_url(tome["picture"]), decode_data_url(pool["picture"]))


def test_a_speedup_budget_reaches_the_speedup(explorer: Explorer) -> None:
    lo, hi = explorer.info()["speedup_range"]
    for target in np.linspace(lo, hi, 25):
        result = explorer.run("skimage:rocket", "tome", "speedup", float(target))
        assert result["ideal_speedup"] >= target - 1e-9, (target, result["keep"])


def test_the_fastest_keep_is_the_slider_end(explorer: Explorer) -> None:
    lo = explorer.info()["keep_range"][0]
    result = explorer.run("skimage:rocket", "tome", "keep", lo)
    assert result["ideal_speedup"] == pytest.approx(explorer.info()["speedup_range"][1])
    with pytest.raises(ValueError, match="out of range"):
        explorer.run("skimage:rocket", "tome", "keep", lo * 0.9)


def test_measured_speed_pairs_the_two_models(explorer: Explorer) -> None:
    result = explorer.measure_speed("skimage:coffee", "tome", "keep", 0.5, samples=3)
    assert result["samples"] == 3
    assert result["unpatched_ms"] > 0 and result["patched_ms"] > 0
    q1, q3 = result["speedup_quartiles"]
    assert q1 <= result["speedup"] <= q3


def test_the_model_is_left_unpatched(explorer: Explorer) -> None:
    from tokenbudget.patch import is_patched

    explorer.run("skimage:coffee", "tofu", "keep", 0.5)
    explorer.measure_speed("skimage:coffee", "tofu", "keep", 0.5, samples=1)
    assert not is_patched(explorer.model)


def test_the_upload_store_keeps_the_latest() -> None:
    store = ImageStore(max_uploads=2)
    ids = [store.add_upload(png_bytes(np.full((20, 30, 3), i * 40, np.uint8))) for i in range(3)]
    assert len(set(ids)) == 3
    assert store.add_upload(png_bytes(np.full((20, 30, 3), 80, np.uint8))) == ids[2]  # same bytes, same id
    assert store.get(ids[1]).size == (30, 20)
    with pytest.raises(UnknownImage, match="upload it again"):
        store.get(ids[0])
    with pytest.raises(UnknownImage, match="unknown sample"):
        store.get("skimage:nope")


# -- the HTTP API ------------------------------------------------------------------------------


def test_the_page_loads_nothing_from_the_network(base_url: tuple[str, int]) -> None:
    status, content_type, page = call(base_url, "GET", "/")
    assert status == 200 and content_type.startswith("text/html")
    for name in ("app.js", "style.css"):
        assert f'"/{name}"' in page.decode()
        status, _, body = call(base_url, "GET", f"/{name}")
        assert status == 200 and len(body) > 100
    for path in resources.files("tokenbudget.explore").joinpath("static").iterdir():
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", path.read_text()), path.name


def test_info_and_run_over_http(base_url: tuple[str, int]) -> None:
    status, _, body = call(base_url, "GET", "/api/info")
    info = json.loads(body)
    assert status == 200
    assert (
        info["grid"] == list(GRID) and info["num_prefix"] == PREFIX and info["methods"] == merging_methods()
    )
    status, result = run(base_url, method="pool", value=0.5)
    assert status == 200
    assert result["tokens_per_layer"][-1] == PREFIX + PATCHES // 2
    status, content_type, crop = call(base_url, "GET", "/api/crop?image=skimage:astronaut")
    assert status == 200 and content_type == "image/png"
    assert Image.open(io.BytesIO(crop)).size == (32, 32)


def test_upload_then_run(base_url: tuple[str, int]) -> None:
    rng = np.random.default_rng(0)
    status, _, body = call(
        base_url, "POST", "/api/upload", raw=png_bytes(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8))
    )
    assert status == 200
    image_id = json.loads(body)["image"]
    status, result = run(base_url, image=image_id, value=0.25)
    assert status == 200 and result["image"] == image_id
    status, _, body = call(
        base_url,
        "POST",
        "/api/time",
        {"image": image_id, "method": "tome", "kind": "speedup", "value": 1.5, "samples": 2},
    )
    assert status == 200 and json.loads(body)["samples"] == 2


def test_concurrent_requests_get_their_own_answers(base_url: tuple[str, int], explorer: Explorer) -> None:
    requests = [("tome", 0.3), ("pool", 0.6), ("tofu", 0.4), ("tome-detail", 0.2)] * 2
    expected = {r: explorer.run("skimage:camera", r[0], "keep", r[1]) for r in requests}
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(
            pool.map(lambda r: run(base_url, image="skimage:camera", method=r[0], value=r[1]), requests)
        )
    for r, (status, result) in zip(requests, answers, strict=True):
        assert status == 200
        assert result["tokens_per_layer"] == expected[r]["tokens_per_layer"]
        assert result["picture"] == expected[r]["picture"]
        assert result["cosine"] == pytest.approx(expected[r]["cosine"], abs=1e-6)


BAD_RUNS = [
    ({"method": "random"}, 400, "unknown method"),
    ({"method": "nope"}, 400, "unknown method"),
    ({"kind": "tokens"}, 400, "budget kind"),
    ({"value": 0.0}, 400, "out of range"),
    ({"value": 1.5}, 400, "out of range"),
    ({"value": "half"}, 400, "must be a number"),
    ({"value": None}, 400, "must be a number"),
    ({"kind": "speedup", "value": 0.5}, 400, "out of range"),
    ({"kind": "speedup", "value": 100.0}, 400, "out of range"),
    ({"image": "skimage:nope"}, 404, "unknown sample"),
    ({"image": "upload:0123"}, 404, "upload it again"),
    ({"image": 7}, 400, "image id"),
]


@pytest.mark.parametrize(("fields", "status", "message"), BAD_RUNS)
def test_bad_runs_get_a_sentence(base_url: tuple[str, int], fields: dict, status: int, message: str) -> None:
    got, body = run(base_url, **fields)
    assert got == status
    assert message in body["error"]
    assert "Traceback" not in body["error"]


@pytest.mark.parametrize(
    ("method", "path", "raw", "status", "message"),
    [
        ("POST", "/api/run", b"not json", 400, "not JSON"),
        ("POST", "/api/run", b"[1, 2]", 400, "JSON object"),
        ("POST", "/api/run", b'{"image": "skimage:coffee"}', 400, "lacks method, kind, value"),
        (
            "POST",
            "/api/time",
            b'{"image": "skimage:coffee", "method": "tome", "kind": "keep", "value": 0.5, "samples": 0}',
            400,
            "samples",
        ),
        ("POST", "/api/upload", b"", 400, "empty"),
        ("POST", "/api/upload", b"GIF89a but not really an image at all", 400, "not an image"),
        ("GET", "/api/crop", None, 400, "give the image id"),
        ("GET", "/api/nothing", None, 404, "no such page"),
        ("POST", "/api/nothing", b"{}", 404, "no such page"),
    ],
)
def test_bad_requests_get_a_sentence(
    base_url: tuple[str, int], method: str, path: str, raw: bytes | None, status: int, message: str
) -> None:
    got, content_type, body = call(base_url, method, path, raw=raw)
    assert got == status and content_type == "application/json"
    assert message in json.loads(body)["error"]


def test_damaged_and_huge_images_are_refused(base_url: tuple[str, int]) -> None:
    whole = png_bytes(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    status, _, body = call(base_url, "POST", "/api/upload", raw=whole[: len(whole) // 2])
    assert status == 400 and "damaged or truncated" in json.loads(body)["error"]
    buffer = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buffer, format="PNG")  # 64 megapixels in a few kB
    status, _, body = call(base_url, "POST", "/api/upload", raw=buffer.getvalue())
    assert status == 400 and "megapixels" in json.loads(body)["error"]


def test_a_body_over_the_limit_is_refused_unread(base_url: tuple[str, int]) -> None:
    with socket.create_connection(base_url, timeout=30) as sock:
        sock.sendall(b"POST /api/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert "the limit is" in json.loads(body)["error"]


def test_a_failure_is_a_sentence_not_a_traceback(
    base_url: tuple[str, int],
    explorer: Explorer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    def broken(**kwargs: object) -> None:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(explorer, "run", broken)
    status, body = run(base_url)
    assert status == 500
    assert "RuntimeError: out of memory" in body["error"] and "Traceback" not in body["error"]
    assert "Traceback" in capsys.readouterr().err  # the server's log keeps it


def test_the_upload_limit_applies_over_http(
    base_url: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "MAX_UPLOAD_BYTES", 1000)
    status, _, body = call(base_url, "POST", "/api/upload", raw=bytes(2000))
    assert status == 413 and "resize the image" in json.loads(body)["error"]


# -- the command -------------------------------------------------------------------------------


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tokenbudget")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_the_command_defaults_to_this_machine_only() -> None:
    args = _parse(["explore"])
    assert (args.model, args.host, args.port, args.img_size, args.threads) == (
        "dinov2_small",
        "127.0.0.1",
        7860,
        None,
        None,
    )
    assert args.func is cmd_explore


def test_the_command_reports_an_unknown_model() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        cmd_explore(_parse(["explore", "--model", "no_such_model_anywhere", "--port", "0"]))


def test_the_command_reports_a_busy_port() -> None:
    threads = torch.get_num_threads()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match="cannot listen"):
            cmd_explore(_parse(["explore", "--model", "tiny-explore", "--port", str(port), "--threads", "1"]))
    torch.set_num_threads(threads)
