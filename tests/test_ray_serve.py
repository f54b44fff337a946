"""The Ray Serve deployment (clipzoo/serve/ray_app.py) on a local Ray instance (2 CPUs, one replica),
called over HTTP through Serve's proxy on loopback: its answers are those of ``Zoo.predict``, and a
bad request costs only itself a one-line 4xx.

Needs the ``ray`` extra (``pip install -e '.[ray]'``, which brings Ray Serve); skipped without it."""

from __future__ import annotations

import base64
import io
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

TIMEOUT = 60


def png64(im) -> str:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_served(served_zoo):
    """The two-task zoo (tests/conftest.py) served by one Ray Serve replica; yields (url, zoo root,
    images, app)."""
    import ray
    from ray import serve

    from clipzoo.serve.ray_app import deployment

    root, images = served_zoo

    started = not ray.is_initialized()  # test_ray.py's session cluster may be up already: reuse it
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 logging_level="WARNING")
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = deployment(str(root), replicas=1, max_batch=8, max_wait_ms=50)
        serve.run(app, name="clipzoo-test", route_prefix="/")
        yield f"http://127.0.0.1:{port}", root, images, app
    finally:
        try:
            serve.shutdown()
        finally:
            if started:
                ray.shutdown()


def one_line_error(r) -> str:
    msg = r.json()["error"]
    assert msg and "\n" not in msg
    return msg


def test_concurrent_requests_get_what_zoo_predict_gives(ray_served):
    from clipzoo.zoo.zoo import Zoo

    url, root, images, _ = ray_served
    zoo = Zoo.open(root)
    want, version = zoo.predict(images), zoo.registry["router"]["version"]
    b64 = [png64(im) for im in images]
    requests = [[i, (i + 3) % len(images), (i + 5) % len(images)] for i in range(len(images))]

    def post(idx: list[int]) -> tuple[list[int], httpx.Response]:
        body = {"images": [b64[i] for i in idx], "names": [f"img{i}.png" for i in idx]}
        return idx, httpx.post(f"{url}/predict", json=body, timeout=TIMEOUT)

    with ThreadPoolExecutor(4) as pool:  # concurrent requests, so @serve.batch gathers several
        results = list(pool.map(post, requests))
    for idx, r in results:
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["zoo_version"] == version and r.headers["x-clipzoo-version"] == str(version)
        preds = body["predictions"]
        assert [p["path"] for p in preds] == [f"img{i}.png" for i in idx]
        assert [(p["task"], p["label"]) for p in preds] == [(want[i]["task"], want[i]["label"]) for i in idx]
        for p, i in zip(preds, idx):
            assert p["score"] == pytest.approx(want[i]["score"], abs=1e-4)


def test_a_bad_request_gets_a_one_line_4xx_while_a_good_one_succeeds(ray_served):
    url, _, images, _ = ray_served
    good = {"images": [png64(images[0])], "names": ["fine.png"]}
    bad = {"images": [base64.b64encode(b"this is not an image, only text").decode()], "names": ["broken.png"]}
    with ThreadPoolExecutor(2) as pool:
        f_bad = pool.submit(httpx.post, f"{url}/predict", json=bad, timeout=TIMEOUT)
        f_good = pool.submit(httpx.post, f"{url}/predict", json=good, timeout=TIMEOUT)
        r_bad, r_good = f_bad.result(), f_good.result()
    assert r_bad.status_code == 400 and "broken.png" in one_line_error(r_bad)
    assert r_good.status_code == 200, r_good.text
    assert [p["path"] for p in r_good.json()["predictions"]] == ["fine.png"]

    for body, status, words in [({"images": ["@@not base64@@"]}, 400, "base64"),
                                ({"images": [png64(images[0])], "top_k": 0}, 400, "top_k"),
                                ({"images": [png64(images[0])], "task": "no-such-task"}, 400, "no-such-task"),
                                ({"pictures": []}, 400, "images")]:
        r = httpx.post(f"{url}/predict", json=body, timeout=TIMEOUT)
        assert r.status_code == status and words in one_line_error(r), (body, r.status_code, r.text)
    r = httpx.post(f"{url}/predict", content=b"{not json", headers={"content-type": "application/json"},
                   timeout=TIMEOUT)
    assert r.status_code == 400 and "JSON" in one_line_error(r)
    r = httpx.post(f"{url}/predict", json={"images": [png64(images[4])], "task": "colours"}, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["predictions"][0]["task"] == "colours"  # still serving


def test_a_replica_holds_enough_requests_to_fill_a_batch(ray_served):
    """Ray's default cap of 5 ongoing requests per replica would keep batches of 8 from filling."""
    from clipzoo.errors import ConfigError
    from clipzoo.serve.ray_app import deployment

    app = ray_served[3]
    assert app._bound_deployment.max_ongoing_requests >= 8
    with pytest.raises(ConfigError):
        deployment("unused", max_batch=0)
