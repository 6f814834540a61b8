"""Load on loopback: 20 simulated annotators fetch items and post decisions at once for 30 s (each loop bounded in
requests and time) against a real `dpokit annotate serve` process, some requests repeated as a flaky network
repeats them; then the server is killed with SIGKILL and the database must hold every acknowledged decision exactly
once. The p99 latency of a decision is printed (`pytest -s`)."""

from __future__ import annotations

import json
import random
import signal
import threading
import time

from dpokit.annotate.store import Store

from test_annotate_browser import free_port, start

ANNOTATORS = 20
SECONDS = 30.0
MAX_REQUESTS = 5000  # per annotator: the loop stops by itself whatever the machine's speed


def test_twenty_annotators_for_thirty_seconds_lose_and_duplicate_nothing(tmp_path):
    import httpx

    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}", "chosen": f"yes {i}", "rejected": f"no {i}"}) + "\n"
                            for i in range(3000)))
    db, port = tmp_path / "db.sqlite", free_port()
    log = open(tmp_path / "server.log", "w")
    server = start([str(data), "--db", str(db), "--overlap", "3"], port, log)
    url = f"http://127.0.0.1:{port}"
    acked, latencies, errors, lock = [], [], [], threading.Lock()
    deadline = time.monotonic() + SECONDS

    def annotator(k: int) -> None:
        rng, name = random.Random(k), f"annotator-{k:02d}"
        with httpx.Client(base_url=url, headers={"X-Annotator": name}, timeout=30) as c:
            for _ in range(MAX_REQUESTS):
                if time.monotonic() > deadline:
                    return
                r = c.get("/api/next")
                if r.status_code != 200:
                    errors.append(f"next {r.status_code} {r.text}")
                    return
                item = r.json()["item"]
                if item is None:
                    return
                body = {"item": item["id"], "choice": rng.choice(["left", "right", "tie", "skip"]),
                        "rationale": rng.choice(["", f"because {k}"])}
                t0 = time.perf_counter()
                r = c.post("/api/decision", json=body)
                took = time.perf_counter() - t0
                if r.status_code != 200 or r.json()["repeated"]:
                    errors.append(f"decision {r.status_code} {r.text}")
                    return
                with lock:
                    latencies.append(took)
                    acked.append((item["id"], name, body["choice"], item["left"], body["rationale"]))
                if rng.random() < 0.05:  # the same request again: answered, not recorded twice
                    again = c.post("/api/decision", json=body)
                    if again.status_code != 200 or not again.json()["repeated"]:
                        errors.append(f"repeat {again.status_code} {again.text}")

    threads = [threading.Thread(target=annotator, args=(k,)) for k in range(ANNOTATORS)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=SECONDS + 120)
        assert not any(t.is_alive() for t in threads), "an annotator loop did not stop"
    finally:
        server.send_signal(signal.SIGKILL)  # no clean shutdown: what was acknowledged must already be on disk
        server.wait(timeout=30)
        log.close()
    assert not errors, errors[:3]
    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2], latencies[int(0.99 * (len(latencies) - 1))]
    print(f"\nload: {ANNOTATORS} annotators, {len(acked)} decisions in {SECONDS:.0f} s "
          f"({len(acked) / SECONDS:.0f}/s); decision latency p50 {1000 * p50:.1f} ms, p99 {1000 * p99:.1f} ms")
    assert len(acked) > 200, "the load test made too few decisions to mean anything"
    store = Store(db, create=False)
    stored = store.decisions()
    assert len(stored) == len(acked) == len({(d["item"], d["annotator"]) for d in stored})
    items = {it["id"]: it for it in store.items()}

    def choice(item, shown, left):
        if shown in ("tie", "skip"):
            return shown
        side = "a" if items[item]["a"] == left else "b"
        return side if shown == "left" else ("b" if side == "a" else "a")

    want = sorted((i, n, choice(i, s, left), why) for i, n, s, left, why in acked)
    assert sorted((d["item"], d["annotator"], d["choice"], d["rationale"]) for d in stored) == want
    per_item = {}
    for d in stored:
        if d["choice"] != "skip":
            per_item[d["item"]] = per_item.get(d["item"], 0) + 1
    assert max(per_item.values()) <= 3  # the overlap holds under concurrency
    assert p99 < 2.0, f"p99 decision latency {p99:.3f} s"
