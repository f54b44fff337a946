"""clipzoo serve: a real HTTP server on loopback (port 0), real HTTP clients, bounded in count and time.

Every test starts its own server in-process (:class:`clipzoo.serve.app.Running`) and stops it on
leaving its ``with`` block."""

from __future__ import annotations

import base64
import io
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")
httpx = pytest.importorskip("httpx")

from clipzoo.serve.app import Running, create_app  # noqa: E402
from clipzoo.serve.batcher import Options, predict_batch  # noqa: E402
from clipzoo.serve.inputs import Limits  # noqa: E402

TIMEOUT = 60


def png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(served_zoo):
    """A zoo of two tasks and mixed test images (PIL) from both (tests/conftest.py)."""
    return served_zoo


def files(images, names=None) -> list:
    return [("files", (names[i] if names else f"img{i}.png", png(im), "image/png")) for i, im in enumerate(images)]


def one_line_error(r) -> str:
    msg = r.json()["error"]
    assert msg and "\n" not in msg
    return msg


def test_concurrent_clients_get_what_zoo_predict_gives(served):
    from clipzoo.zoo.zoo import Zoo

    root, images = served
    want = Zoo.open(root).predict(images)
    requests = [[(i + k) % len(images), (i + 2 * k + 1) % len(images)] for i in range(4) for k in range(5)]

    def client(batch: list[list[int]]) -> list[tuple[list[int], int, dict]]:
        out = []
        with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
            for idx in batch:
                r = c.post("/predict", files=files([images[i] for i in idx]))
                out.append((idx, r.status_code, r.json()))
        return out

    with Running(create_app(root, max_batch=8, max_wait_ms=20)) as srv:
        with ThreadPoolExecutor(4) as pool:  # 4 concurrent clients x 5 requests of 2 images
            results = [x for part in pool.map(client, [requests[c::4] for c in range(4)]) for x in part]
        health = httpx.get(f"{srv.url}/health", timeout=TIMEOUT).json()
    assert len(results) == 20 and all(code == 200 for _, code, _ in results)
    for idx, _, body in results:
        assert body["zoo_version"] == Zoo.open(root).registry["router"]["version"]
        got = [(p["task"], p["label"]) for p in body["predictions"]]
        assert got == [(want[i]["task"], want[i]["label"]) for i in idx]
        assert [p["path"] for p in body["predictions"]] == ["img0.png", "img1.png"]
    assert health["status"] == "ok" and health["requests"] >= 20 and health["images"] >= 40


def test_json_base64_and_options(served):
    root, images = served
    with Running(create_app(root)) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
        b64 = [base64.b64encode(png(im)).decode() for im in images[:3]]
        r = c.post("/predict", json={"images": b64, "top_k": 2, "mode": "fusion", "names": ["a", "b", "c"]})
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        assert [p["path"] for p in preds] == ["a", "b", "c"] and all("fusion" in p for p in preds)
        r = c.post("/predict", json={"images": ["data:image/png;base64," + b64[0]], "task": "colours"})
        assert r.status_code == 200 and r.json()["predictions"][0]["task"] == "colours"
        r = c.post("/predict?fallback=false&top_k=2", content=png(images[0]), headers={"content-type": "image/png"})
        assert r.status_code == 200 and len(r.json()["predictions"][0]["routing"]) == 2


def test_a_bad_image_gets_400_while_a_concurrent_good_request_gets_200(served):
    root, images = served
    good, bad = png(images[0]), png(images[1])[:70]  # a truncated PNG
    with Running(create_app(root, max_wait_ms=200)) as srv:
        def post(payload: bytes, name: str):
            return httpx.post(f"{srv.url}/predict", files=[("files", (name, payload, "image/png"))], timeout=TIMEOUT)

        with ThreadPoolExecutor(2) as pool:
            f_bad, f_good = pool.submit(post, bad, "broken.png"), pool.submit(post, good, "fine.png")
            r_bad, r_good = f_bad.result(), f_good.result()
        assert r_bad.status_code == 400 and "broken.png" in one_line_error(r_bad)
        assert r_good.status_code == 200 and r_good.json()["predictions"][0]["path"] == "fine.png"
        assert httpx.get(f"{srv.url}/health", timeout=TIMEOUT).json()["status"] == "ok"


def test_bad_requests_are_4xx_with_one_line(served, monkeypatch):
    root, images = served
    monkeypatch.setenv("CLIPZOO_MAX_IMAGE_PIXELS", "4096")  # a "huge" image: 128 x 128
    big = images[0].resize((128, 128))
    with Running(create_app(root, limits=Limits(max_images=2, max_bytes=200_000))) as srv, \
            httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
        cases = {
            "empty": (400, dict(content=b"", headers={"content-type": "application/json"})),
            "too many": (413, dict(files=files(images[:3]))),
            "too large": (413, dict(content=b"0" * 300_000, headers={"content-type": "image/png"})),
            "not an image": (400, dict(files=[("files", ("notes.png", b"hello world", "image/png"))])),
            "huge image": (413, dict(files=[("files", ("big.png", png(big), "image/png"))])),
            "bad json": (400, dict(content=b"{images:", headers={"content-type": "application/json"})),
            "bad base64": (400, dict(json={"images": ["not base64!"]})),
            "no images": (400, dict(json={"images": []})),
            "bad top_k": (400, dict(json={"images": [base64.b64encode(png(images[0])).decode()], "top_k": 0})),
            "unknown task": (400, dict(json={"images": [base64.b64encode(png(images[0])).decode()], "task": "nope"})),
            "content type": (415, dict(content=b"abc", headers={"content-type": "text/plain"})),
        }
        for what, (status, kwargs) in cases.items():
            r = c.post("/predict", **kwargs)
            assert r.status_code == status, (what, r.status_code, r.text)
            one_line_error(r)
        assert c.post("/predict", files=files(images[:2])).status_code == 200  # still serving
        assert c.get("/health").json()["status"] == "ok"


def test_health_version_openapi(served):
    root, _ = served
    with Running(create_app(root)) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
        v = c.get("/version").json()
        assert v["experts"] == ["shapes", "colours"] and isinstance(v["zoo_version"], int)
        doc = c.get("/openapi.json").json()
        assert doc["openapi"].startswith("3.") and "/predict" in doc["paths"]
        assert c.get("/health").status_code == 200


def test_hot_reload_under_load_fails_no_request(served, builtin_tasks, tmp_path):
    from clipzoo.zoo.train import TrainSettings
    from clipzoo.zoo.zoo import Zoo

    src, images = served
    root = tmp_path / "zoo"
    shutil.copytree(src, root, ignore=shutil.ignore_patterns(".readers"))
    before = Zoo.open(root).registry["router"]["version"]
    stop, seen, lock = threading.Event(), [], threading.Lock()

    def client(k: int) -> None:
        with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
            for i in range(200):  # bounded; normally stopped long before
                if stop.is_set():
                    return
                r = c.post("/predict", files=files([images[(i + k) % len(images)]]))
                with lock:
                    seen.append((k, r.status_code, r.json().get("zoo_version")))

    with Running(create_app(root, max_wait_ms=5)) as srv:
        threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        try:
            other = Zoo.open(root)  # another writer on the same directory
            other.add_task(builtin_tasks["digits"], train=TrainSettings(epochs=3, batch_size=32))
            after = other.registry["router"]["version"]
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                with lock:
                    if sum(v == after for _, _, v in seen) >= 3:
                        break
                time.sleep(0.05)
        finally:
            stop.set()
            for t in threads:
                t.join(TIMEOUT)
        v = httpx.get(f"{srv.url}/version", timeout=TIMEOUT).json()
    assert after > before
    assert seen and all(code == 200 for _, code, _ in seen), [s for s in seen if s[1] != 200][:3]
    assert {ver for _, _, ver in seen} <= {before, after} and any(ver == after for _, _, ver in seen)
    for k in range(3):  # each client sees the versions in order: never back to the old one
        mine = [ver for c, _, ver in seen if c == k]
        assert mine == sorted(mine)
    assert v["zoo_version"] == after and "digits" in v["experts"] and v["reloads"] == 1


def test_predict_batch_answers_each_request_with_its_options(served):
    from clipzoo.serve.reload import open_warm

    root, images = served
    z = open_warm(root)
    px = __import__("torch").stack([z.backbone.preprocess(im.convert("RGB")) for im in images])
    jobs = [(px[:3], Options()), (px[3:5], Options(top_k=2, mode="avg")), (px[5:], Options(task="shapes")),
            (px[:1], Options(task="no-such-task"))]
    out = predict_batch(z, jobs)
    assert [len(o) for o in out[:3]] == [3, 2, len(images) - 5] and isinstance(out[3], Exception)
    assert all(p["task"] == "shapes" for p in out[2])
    alone = z.predict_features(z.backbone.encode_images(px[:3]))
    assert [(p["task"], p["label"]) for p in out[0]] == [(p["task"], p["label"]) for p in alone]


def test_bench_serve_grows_zoos_of_distinct_tasks(builtin_tasks):
    """bench-serve's grown zoos use distinct two-class tasks of the built-in domains (labels
    renumbered, disjoint pairs first, in turn over the domains), so a batch is routed to several
    experts; asking for more experts than there are pairs is a one-line error before any work."""
    from click.testing import CliRunner

    from clipzoo.cli import main
    from clipzoo.serve.bench import _pngs
    from clipzoo.tasks.sequence import class_pair_tasks

    tasks = [builtin_tasks[d] for d in ("shapes", "digits")]
    parts = class_pair_tasks(tasks, 5)
    assert [p.name for p in parts] == ["shapes-0-1", "digits-0-1", "shapes-2-3", "digits-2-3", "shapes-0-2"]
    assert len({tuple(p.classes) for p in parts}) == 5
    for p in parts:
        t = next(x for x in tasks if p.name.startswith(x.name))
        assert set(p.test.labels) == {0, 1} and len(p.test.images) == len(p.test.labels)
        for im, y in zip(p.test.images, p.test.labels):
            assert p.classes[y] == t.classes[t.test.labels[t.test.images.index(im)]]
    assert len(_pngs(parts[:4])) == sum(len(p.test.images) for p in parts[:4])  # disjoint pairs: no image twice
    assert len(class_pair_tasks(tasks, 55)) == 55 and len(_pngs(class_pair_tasks(tasks, 55))) == sum(len(t.test.images) for t in tasks)
    res = CliRunner().invoke(main, ["bench-serve", "--out", "x.json", "--experts", "1,99"])
    assert res.exit_code != 0 and "use at most 80" in res.output and len(res.output.strip().splitlines()) == 1


def test_bench_serve_runs_end_to_end(tmp_path):
    """A minimal bench-serve (one client count, a grown zoo of 2 experts, no reload, no in-encoder
    row): every section is there and no request failed (figures are not asserted: a benchmark)."""
    from clipzoo.serve.bench import run_bench, summary

    res = run_bench(tmp_path / "b.json", [2], n_requests=2, experts=[2], in_encoder=[], per_class=2, reload=False)
    t = res["throughput"][0]
    assert t["failed"] == 0 and t["images_per_s"] > 0 and len(t["base_before_after"]) == 2
    assert t["ratio_to_backbone"] == round(t["images_per_s"] / (sum(t["base_before_after"]) / 2), 3)
    (row,) = res["experts"]
    assert row["experts"] == 2 and row["failed"] == 0 and row["in_process_cost_x_forward"] > 0
    assert 1 <= row["distinct_per_batch"] <= 2 and res["in_encoder"] == []
    assert "experts in the zoo" in summary(res) and (tmp_path / "b.json").is_file()
