"""A cold server (``--engine auto``, no cached decision) measures the engines in the background while eager
answers: the measurement reserves its estimated peak in the server's memory budget like a request does, and
one that can never fit leaves eager answering and says why in /health and the log (issue 24)."""
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from caer_fast.testing.serving import Server, make_checkpoint, write_png  # noqa: E402


def post_png(url, path):
    with open(path, "rb") as f:
        return httpx.post(url + "/predict", files={"file": ("x.png", f.read(), "image/png")}, timeout=300)


def wait_health(url, until, timeout=240.0, every=0.05):
    """/health polled until ``until(health)``; every answer seen."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = httpx.get(url + "/health", timeout=30).json()
        seen.append(h)
        if until(h):
            return seen
        time.sleep(every)
    raise AssertionError(f"/health never got there: {seen[-1]}")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("measure_budget")
    # seeds of their own: no other test has cached an auto decision for these models
    return {"dir": d, "png": write_png(d / "face.png", seed=3),
            "ck_small": make_checkpoint(d / "small_budget.pth", "caers", seed=2401),
            "ck_room": make_checkpoint(d / "room.pth", "caers", seed=2402)}


def test_a_measurement_that_never_fits_stays_eager_and_says_so(files):
    # at batch 64 the measurement's estimate (32× a batch's inputs + 256 MiB ≈ 766 MiB) exceeds what a 700 MiB
    # budget leaves above the server at rest (≈ 350-400 MiB); a small image's request (≈ 96 MiB) fits
    srv = Server(files["ck_small"], "--engine", "auto", "--max-batch", 64, "--memory-budget-mb", 700,
                 "--threads", 1, cwd=files["dir"])
    try:
        r = post_png(srv.url, files["png"])
        assert r.status_code == 200, r.text[:300]
        seen = wait_health(srv.url, lambda h: h["engine_measurement"]["state"] == "not measuring", timeout=60)
        h = seen[-1]
        m = h["engine_measurement"]
        room = h["limits"]["memory_budget_bytes"] - h["memory"]["base_bytes"]
        assert "does not fit" in m["reason"] and m["memory_bytes"] > room, (m, room)
        assert h["engine"] == "eager" and h["memory"]["reserved_bytes"] == 0, h
        assert post_png(srv.url, files["png"]).json()["probabilities"] == r.json()["probabilities"]
        assert "not measuring the engines" in srv.output()
    finally:
        srv.close()


def test_the_measurement_reserves_its_peak_in_the_budget(files):
    srv = Server(files["ck_room"], "--engine", "auto", "--max-batch", 8, "--memory-budget-mb", 4000,
                 "--threads", 1, cwd=files["dir"])
    try:
        before = httpx.get(srv.url + "/health", timeout=30).json()
        assert before["engine_measurement"]["state"] == "waiting for the first call", before
        assert post_png(srv.url, files["png"]).status_code == 200
        seen = wait_health(srv.url, lambda h: h["engine_measurement"]["state"] in ("done", "failed", "not measuring"))
        end = seen[-1]
        m = end["engine_measurement"]
        assert m["state"] == "done", m
        est = m["memory_bytes"]
        # the image request alone reserves ≈ 96 MiB; the measurement ≈ 320 MiB at batch 8
        assert end["memory"]["peak_reserved_bytes"] >= est > 100 * 2**20, end["memory"]
        during = [h for h in seen if h["engine_measurement"]["state"] == "measuring"]
        assert all(h["memory"]["reserved_bytes"] >= est for h in during), [h["memory"] for h in during]
        assert end["memory"]["reserved_bytes"] == 0 and end["engine"] != "eager (auto measuring)", end
    finally:
        srv.close()


def test_the_budget_serves_waiters_in_arrival_order():
    """A big reservation waiting for room (auto's measurement, a large video) is not overtaken by small ones
    that would fit beside the current holders: otherwise a steady stream of small requests starves it. A
    waiter that gives up leaves the line, and the next one goes."""
    import asyncio

    from caer_fast.serving.app import MemoryBudget

    async def scenario():
        budget = MemoryBudget(budget_bytes=100, base_bytes=0, wait_s=5.0)
        order = []

        async def take(name, n, wait_s=-1.0):
            await budget.acquire(n, wait_s)
            order.append(name)

        await take("a", 60)
        big = asyncio.create_task(take("big", 50, wait_s=None))  # does not fit beside a
        await asyncio.sleep(0.01)
        small = asyncio.create_task(take("small", 30))  # would fit beside a, but big came first
        await asyncio.sleep(0.05)
        assert order == ["a"], order
        await budget.release(60)
        await asyncio.wait_for(asyncio.gather(big, small), 5)
        assert order == ["a", "big", "small"] and budget.reserved == 80, (order, budget.reserved)

        # a waiter at the head that times out leaves the line: the one behind it is served
        impatient = asyncio.create_task(take("impatient", 70, wait_s=0.1))  # 80 + 70 > 100
        await asyncio.sleep(0.01)
        patient = asyncio.create_task(take("patient", 20))  # fits, after impatient gives up
        with pytest.raises(TimeoutError, match="server busy"):
            await impatient
        await asyncio.wait_for(patient, 5)
        assert order[-1] == "patient" and budget.reserved == 100 and not budget._line, order

    asyncio.run(scenario())
