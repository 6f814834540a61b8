"""`dpokit annotate serve` end to end in headless Chromium (Playwright driving Debian's chromium): two annotators in
two browser contexts label by key and by click, one reloads mid-way, the server is killed with SIGKILL and started
again, and the database and both exports hold every decision exactly once. A screenshot shows the guidelines and
the two responses; a response holding a <script> is shown as text."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from dpokit.annotate.store import Store

SCRIPT = "<script>document.title = 'pwned'</script>"
LONG = "\n".join(f"line {i}: " + "word " * 12 for i in range(150))
GUIDELINES = "Prefer the answer that is correct and kind.\nMarkdown such as **this** stays text."
LEFT_BG, RIGHT_BG, GUIDE_BG = (0xE4, 0xEF, 0xFF), (0xFF, 0xE9, 0xD6), (0xFF, 0xF6, 0xCC)  # style.css


def items(n: int = 8) -> list[dict]:
    rows = []
    for i in range(n):
        good = LONG if i == 0 else f"good answer {i}: ```python\nprint({i})\n``` <b>not bold</b>"
        bad = f"bad answer {i} {SCRIPT}"
        rows.append({"prompt": [{"role": "system", "content": "You are terse."},
                                {"role": "user", "content": f"question {i} {SCRIPT}"}],
                     "chosen": [{"role": "assistant", "content": good}],
                     "rejected": [{"role": "assistant", "content": bad}]})
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], port: int, log) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "dpokit", "annotate", "serve", *args, "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited with {proc.returncode}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    pytest.fail("the server did not answer within 60 s")


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("this test needs Debian's chromium: `apt-get install chromium` (.ci/run installs it)")
    return path


class Annotator:
    """One browser context: its page and every decision it saw the server accept."""

    def __init__(self, browser, url: str, name: str):
        self.page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        self.name, self.url, self.decided = name, url, []
        self.page.goto(url)
        self.page.fill("#name", name)
        self.page.click("#login-form button")
        self.wait_for_item()

    def wait_for_item(self):
        from playwright.sync_api import expect

        expect(self.page.locator("#progress")).to_contain_text(f"you: {len(self.decided)} decided")
        expect(self.page.locator("#work")).to_be_visible()

    def shown(self) -> tuple[str, str, str]:
        p = self.page
        texts = ["".join(p.locator(f"{side} .content").all_text_contents()) for side in ("#left", "#right")]
        return p.get_attribute("#work", "data-item"), *texts

    def decide(self, choice: str, how: str, rationale: str = "") -> None:
        item, left, right = self.shown()
        if rationale:
            self.page.fill("#rationale", rationale)
        if how == "key":
            self.page.locator("body").press({"left": "1", "right": "2", "tie": "t", "skip": "s"}[choice])
        else:
            self.page.click(f"button.choose[data-choice='{choice}']")
        self.decided.append({"item": item, "annotator": self.name, "shown": choice, "left": left, "right": right,
                             "rationale": rationale})
        self.after()

    def after(self):
        from playwright.sync_api import expect

        expect(self.page.locator("#progress")).to_contain_text(f"you: {len(self.decided)} decided")

    def good_side(self) -> str:
        _, left, _ = self.shown()
        return "right" if left.startswith("bad") else "left"


def check_screenshot(page, path) -> None:
    import matplotlib.image

    page.screenshot(path=str(path))
    pixels = (matplotlib.image.imread(str(path))[..., :3] * 255).round().astype(int)
    boxes = {}
    for selector, colour in (("#guidelines-box", GUIDE_BG), ("#left-box", LEFT_BG), ("#right-box", RIGHT_BG)):
        box = page.locator(selector).bounding_box()
        assert box is not None and box["width"] > 100 and box["height"] > 30, selector
        region = pixels[int(box["y"]):int(box["y"] + box["height"]), int(box["x"]):int(box["x"] + box["width"])]
        assert region.size, f"{selector} is outside the screenshot"
        background = (region == colour).all(axis=-1).mean()
        text = (region.max(axis=-1) < 100).mean()  # dark pixels: rendered text
        assert background > 0.05 and text > 0.002, f"{selector}: background {background:.3f}, text {text:.4f}"
        boxes[selector] = box
    left, right = boxes["#left-box"], boxes["#right-box"]
    assert abs(left["y"] - right["y"]) < 2 and right["x"] > left["x"] + left["width"] - 1  # side by side


def test_two_annotators_reload_kill_and_restart_lose_nothing(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from dpokit.annotate.export import export

    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in items()))
    (tmp_path / "guidelines.md").write_text(GUIDELINES)
    db, port = tmp_path / "db.sqlite", free_port()
    args = [str(data), "--db", str(db), "--guidelines", str(tmp_path / "guidelines.md"), "--overlap", "2"]
    log = open(tmp_path / "server.log", "w")
    server = start(args, port, log)
    url = f"http://127.0.0.1:{port}/"
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
            alice, bob = Annotator(browser, url, "alice"), Annotator(browser, url, "bob")

            # What is shown: guidelines, prompt turn by turn, two responses; markup and scripts as text.
            page = alice.page
            expect(page.locator("#guidelines")).to_have_text(GUIDELINES)
            assert page.locator("#prompt .turn").count() == 2
            assert page.locator("#prompt .role").all_text_contents() == ["system", "user"]
            assert SCRIPT in page.text_content("#prompt") and page.locator("main script").count() == 0
            assert page.title() == "dpokit annotate" and bob.page.title() == "dpokit annotate"
            side = "#left" if alice.shown()[1].startswith("line 0") else "#right"
            pane, text = page.locator(side).bounding_box(), page.locator(f"{side} .content").bounding_box()
            assert text["height"] > 2000 and pane["height"] < 0.5 * 900  # 150 lines in a pane that scrolls
            check_screenshot(page, tmp_path / "page.png")

            # Both label at once, by key and by click, with a rationale.
            alice.decide(alice.good_side(), "key")
            bob.decide("tie", "click", rationale="both fine <i>really</i>")
            alice.decide(alice.good_side(), "click", rationale="clearer")
            bob.decide(bob.good_side(), "key")
            alice.decide("skip", "key")

            # A reload resumes at the next unlabelled item, the name remembered.
            before = alice.shown()[0]
            page.reload()
            alice.wait_for_item()
            expect(page.locator("#who")).to_have_text("annotator: alice")
            assert alice.shown()[0] == before
            assert before not in {d["item"] for d in alice.decided}

            # SIGKILL: a decision made while the server is down is not saved, and the page says so ...
            server.send_signal(signal.SIGKILL)
            server.wait(timeout=30)
            page.locator("body").press("1")
            expect(page.locator("#message")).to_contain_text("Not saved")
            assert alice.shown()[0] == before
            # ... and after a restart it is, and work goes on.
            server = start(args, port, log)
            alice.decide(alice.good_side(), "key")
            bob.page.reload()
            bob.wait_for_item()
            for who in (alice, bob):
                while not who.page.locator("#done").is_visible():
                    who.decide(who.good_side(), "key" if len(who.decided) % 2 else "click")
            browser.close()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        log.close()

    # The database holds every accepted decision exactly once, on the response the annotator saw on that side.
    made = alice.decided + bob.decided
    assert len(made) == 16  # 8 items x overlap 2
    store = Store(db, create=False)
    stored = store.decisions()
    assert len(stored) == len(made) == len({(d["item"], d["annotator"]) for d in stored})
    contents = {it["id"]: it for it in store.items()}
    texts = lambda v: "".join(m["content"] for m in v)  # noqa: E731

    def expected(d):
        it = contents[d["item"]]
        if d["shown"] in ("tie", "skip"):
            return d["shown"]
        seen = d["left"] if d["shown"] == "left" else d["right"]
        return "a" if texts(it["a"]) == seen else "b"

    want = sorted((d["item"], d["annotator"], expected(d), d["rationale"]) for d in made)
    got = sorted((d["item"], d["annotator"], d["choice"], d["rationale"]) for d in stored)
    assert got == want

    # The exports: Label Studio tasks hold every decision once; the training rows every label of their items.
    summary, _ = export(str(db), output=str(tmp_path / "pairs.jsonl"), label_studio=str(tmp_path / "ls.json"))
    tasks = json.loads((tmp_path / "ls.json").read_text())
    assert sum(len(t["annotations"]) for t in tasks) == 16
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    for row in rows:
        labels = sorted((a["annotator"], a["preferred"], a["rationale"]) for a in row["annotations"])
        mine = [d for d in stored if d["item"] == row["item"] and d["choice"] != "skip"]
        assert len(labels) == len(mine)
    assert summary["output"]["pairs"] == len(rows) >= 5 and summary["output"]["skips"] == 1
