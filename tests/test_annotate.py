"""`dpokit annotate`: the store's exactly-once decisions and assignments, items from every source, agreement,
the export, Label Studio both ways, the server's checks (in process), and the human win rate of a blind A/B."""

from __future__ import annotations

import json

import pytest

from dpokit.annotate import labelstudio
from dpokit.annotate.agreement import cohen_kappa, krippendorff_alpha
from dpokit.annotate.export import export, training_rows, verdicts
from dpokit.annotate.items import read_items
from dpokit.annotate.store import Refused, Store
from dpokit.cli import main
from dpokit.errors import ConfigError, DataError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PAIRS = [{"prompt": f"question {i}", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"} for i in range(6)]


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "db.sqlite")
    found = read_items(write_jsonl(tmp_path / "items.jsonl", PAIRS))
    s.add_items(found.kind, found.items)
    return s


def label(store, name, pick, rationale=""):
    """Decide every item `name` is given; `pick(item, left, right)` returns left/right/tie/skip."""
    done = []
    while (item := store.next_item(name)) is not None:
        choice = pick(item)
        store.decide(name, item["id"], choice, rationale)
        done.append((item["id"], choice))
    return done


def prefer(text):
    """Picks the side showing `text`-ish responses ('good' or 'bad')."""
    return lambda item: "left" if text in item["left"] else "right"


# --------------------------------------------------------------------------------------------------------- store


def test_items_are_read_once_in_file_order_and_the_file_label_is_hidden(tmp_path, store):
    items = store.items()
    assert [it["source"] for it in items] == [f"{tmp_path / 'items.jsonl'}:{i}" for i in range(1, 7)]
    assert all(it["meta"] == {"line": i + 1, "label": "a"} for i, it in enumerate(items))
    again = read_items(tmp_path / "items.jsonl")
    assert store.add_items(again.kind, again.items) == (0, 6)  # content ids: nothing is added twice
    shown = store.next_item("alice")
    assert set(shown) == {"id", "position", "prompt", "system", "left", "right"}  # no a/b, no source, no label


def test_a_reload_shows_the_same_item_in_the_same_order_and_decisions_are_exactly_once(store):
    first = store.next_item("alice")
    assert store.next_item("alice") == first  # reload: same item, same sides
    assert store.decide("alice", first["id"], "left") is False
    assert store.decide("alice", first["id"], "left") is True  # the same request repeated: recorded once
    with pytest.raises(Refused) as err:
        store.decide("alice", first["id"], "right")
    assert err.value.status == 409
    with pytest.raises(Refused) as err:
        store.decide("alice", "0" * 32, "left")
    assert err.value.status == 404
    with pytest.raises(Refused) as err:
        store.decide("bob", first["id"], "left")  # never assigned to bob
    assert err.value.status == 409
    decisions = store.decisions()
    assert len(decisions) == 1 and decisions[0]["choice"] == decisions[0]["left"]  # "left" is the side shown left


def test_the_database_survives_a_new_process(tmp_path, store):
    label(store, "alice", prefer("good"))
    store.close()
    again = Store(tmp_path / "db.sqlite", create=False)
    assert len(again.decisions()) == 6 and again.next_item("alice") is None
    assert {d["choice"] for d in again.decisions()} == {"a"}


def test_overlap_gives_each_item_to_n_annotators_and_skips_do_not_count(store):
    store.set_overlap(2)
    a = label(store, "alice", lambda item: "skip" if item["position"] == 1 else "left")
    b = label(store, "bob", prefer("bad"))
    c = label(store, "carol", prefer("good"))
    assert len(a) == 6 and len(b) == 6
    # Only the item alice skipped still needed a label after alice and bob.
    assert [store.items()[0]["id"]] == [i for i, _ in c]
    assert store.count_items()["complete"] == 6


def test_with_overlap_one_two_annotators_at_once_split_the_items(store):
    got = [store.next_item("alice"), store.next_item("bob")]
    assert got[0]["id"] != got[1]["id"]  # the open assignment holds its item from others


def test_an_abandoned_assignment_frees_its_item_after_the_lease(tmp_path):
    s = Store(tmp_path / "db.sqlite", lease_s=60)
    found = read_items(write_jsonl(tmp_path / "items.jsonl", PAIRS[:1]))
    s.add_items(found.kind, found.items)
    item = s.next_item("alice", now=1000.0)
    assert s.next_item("bob", now=1030.0) is None
    assert s.next_item("bob", now=1100.0)["id"] == item["id"]
    s.decide("bob", item["id"], "tie", now=1101.0)
    assert s.next_item("alice", now=1200.0) is None  # it needs no more labels: alice's idle assignment is dropped


def test_a_database_holds_one_kind_and_refuses_other_files(tmp_path, store):
    (tmp_path / "not.sqlite").write_text("hello")
    with pytest.raises(Exception, match="not a usable SQLite database"):
        Store(tmp_path / "not.sqlite")
    ab = write_jsonl(tmp_path / "ab.jsonl", [{"prompt": "p", "policy": "x", "reference": "y"}])
    found = read_items(ab)
    with pytest.raises(ConfigError, match="holds pairs items"):
        store.add_items(found.kind, found.items)
    with pytest.raises(ConfigError, match="no such file"):
        Store(tmp_path / "missing.sqlite", create=False)


# --------------------------------------------------------------------------------------------------------- items


def test_items_from_conversations_scored_samples_and_eval_samples(tmp_path):
    conv = [{"prompt": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi <b>"}],
             "chosen": [{"role": "assistant", "content": "hello"}],
             "rejected": [{"role": "assistant", "content": "go away"}]}]
    got = read_items(write_jsonl(tmp_path / "conv.jsonl", conv))
    assert got.kind == "pairs" and got.items[0]["prompt"][1]["content"] == "hi <b>"
    scored = [{"prompt": "p", "completions": [{"text": t, "score": s} for t, s in (("x", 1), ("y", 2), ("z", 3))]},
              {"prompt": "q", "completions": [{"text": "u", "score": 1}, {"text": "v", "score": 1}]}]
    path = write_jsonl(tmp_path / "scored.jsonl", scored)
    one, two = read_items(path, seed=3), read_items(path, seed=3)
    assert len(one.items) == 1 and one.items == two.items  # the all-tied prompt gives no item; draws are seeded
    assert {one.items[0]["a"], one.items[0]["b"]} <= {"x", "y", "z"} and "1 rows with fewer" in one.summary
    ab = [{"prompt": "p", "policy": "x", "reference": "y", "prompt_index": 0, "sample": 0, "eval_dir": "e"},
          {"prompt": "p", "policy": "x", "reference": "x", "prompt_index": 0, "sample": 1, "eval_dir": "e"}]
    got = read_items(write_jsonl(tmp_path / "ab.jsonl", ab))
    assert got.kind == "ab" and [it["serve"] for it in got.items] == [True, False]
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'policy'"):
        read_items(write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "policy": 3, "reference": "y"}]))
    with pytest.raises(DataError, match=r"broken.jsonl:2"):
        read_items(write_jsonl(tmp_path / "broken.jsonl", [PAIRS[0], {"prompt": "p", "chosen": "x"}]))


# --------------------------------------------------------------------------------------------------------- agreement


def test_krippendorff_alpha_matches_the_published_example():
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability": 4 coders, 12 units, nominal alpha 0.743.
    coders = ["1 2 3 3 2 1 4 1 2 . . .", "1 2 3 3 2 2 4 1 2 5 . 3", ". 3 3 3 2 3 4 2 2 5 1 .",
              "1 2 3 3 2 4 4 1 2 5 1 ."]
    units = [[v for v in unit if v != "."] for unit in zip(*(c.split() for c in coders))]
    assert krippendorff_alpha(units) == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha([["a", "a"], ["a", "a"]]) is None  # no variation: undefined
    assert krippendorff_alpha([["a"], ["b"]]) is None  # nothing pairable


def test_cohen_kappa_by_hand():
    # p_o = 3/4; annotator 1 says a twice, annotator 2 once: p_e = (2*1 + 2*3) / 16 = 1/2; kappa = 1/2.
    assert cohen_kappa([("a", "a"), ("a", "b"), ("b", "b"), ("b", "b")]) == pytest.approx(0.5)
    assert cohen_kappa([("a", "a"), ("b", "b")]) == pytest.approx(1.0)
    assert cohen_kappa([("a", "a")]) is None and cohen_kappa([]) is None


# --------------------------------------------------------------------------------------------------------- export


def test_export_majority_ties_skips_and_agreement(tmp_path, store):
    store.set_overlap(3)
    label(store, "alice", prefer("good"), rationale="clearer")
    label(store, "bob", lambda it: "tie" if it["position"] == 2 else "skip" if it["position"] == 3 else
          prefer("bad" if it["position"] == 1 else "good")(it))
    label(store, "carol", lambda it: prefer("bad")(it) if it["position"] in (1, 2) else prefer("good")(it))
    out = tmp_path / "pairs.jsonl"
    summary, lines = export(str(tmp_path / "db.sqlite"), output=str(out), report=str(tmp_path / "r.json"))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # item 1: alice good, bob bad, carol bad -> bad wins 2:1; item 2: good / tie / bad -> no majority;
    # items 3-6: good (item 3 with bob's skip).
    assert len(rows) == 5 and summary["output"]["no_majority"] == 1
    assert rows[0]["chosen"] == "bad answer 0" and rows[0]["chosen_by"] == ["bob", "carol"]
    assert rows[0]["agrees_with_source"] is False and rows[1]["agrees_with_source"] is True
    assert rows[0]["annotations"][0] == {"annotator": "alice", "preferred": "rejected", "rationale": "clearer"}
    assert summary["output"]["ties"] == 1 and summary["output"]["skips"] == 1
    agreed = summary["agreement"]
    assert agreed["annotators"]["bob"]["skip"] == 1 and agreed["annotators"]["bob"]["tie"] == 1
    assert {d["source"].rsplit(":", 1)[1] for d in agreed["disagreements"]} == {"1", "2"}
    assert agreed["cohen_kappa"] is None and agreed["krippendorff_alpha"] is not None  # three annotators: alpha
    assert any("disagreeing items: 2" in line for line in lines)
    # The rows are training data as they are.
    from dpokit.data import load_rows, preference_examples

    examples, report = preference_examples(*load_rows(str(out)))
    assert report.kept == 5 and examples[0].chosen == "bad answer 0"
    assert json.loads((tmp_path / "r.json").read_text())["agreement"]["disagreements"]


def test_export_with_two_annotators_reports_cohen_kappa(tmp_path, store):
    store.set_overlap(2)
    label(store, "alice", prefer("good"))
    label(store, "bob", lambda it: prefer("bad" if it["position"] == 1 else "good")(it))
    summary, lines = export(str(tmp_path / "db.sqlite"), output=str(tmp_path / "p.jsonl"))
    agreed = summary["agreement"]
    assert agreed["cohen_kappa_annotators"] == ["alice", "bob"] and agreed["cohen_kappa"] is not None
    assert any("Cohen's kappa (alice, bob)" in line for line in lines)
    assert summary["output"]["no_majority"] == 1 and summary["output"]["pairs"] == 5


def test_label_studio_round_trip_keeps_items_and_decisions(tmp_path, store):
    store.set_overlap(2)
    label(store, "alice", prefer("good"), rationale="why not")
    label(store, "bob", lambda it: "tie" if it["position"] == 1 else "skip")
    tasks = tmp_path / "ls.json"
    export(str(tmp_path / "db.sqlite"), label_studio=str(tasks))
    data = json.loads(tasks.read_text())
    assert (tmp_path / "ls.label_config.xml").read_text().startswith("<View>")
    first = data[0]["annotations"]
    assert {r["type"] for a in first for r in a["result"]} == {"pairwise", "textarea", "choices"}
    assert rc_import(tmp_path, tasks) == 0
    again = Store(tmp_path / "copy.sqlite", create=False)
    key = lambda d: (d["item"], d["annotator"], d["choice"], d["rationale"])  # noqa: E731
    assert sorted(map(key, again.decisions())) == sorted(map(key, store.decisions()))
    assert rc_import(tmp_path, tasks) == 0 and len(again.decisions()) == len(store.decisions())  # idempotent


def rc_import(tmp_path, tasks):
    return main(["annotate", "import", str(tasks), "--db", str(tmp_path / "copy.sqlite")])


def test_a_task_made_in_label_studio_is_read(tmp_path):
    tasks = [{"id": 7, "data": {"prompt": "p", "text1": "one", "text2": "two"},
              "annotations": [{"completed_by": {"id": 3, "email": "ann@example.org"}, "was_cancelled": False,
                               "result": [{"type": "pairwise", "from_name": "pw", "to_name": "pw",
                                           "value": {"selected": "right"}}]},
                              {"completed_by": 4, "result": []}]}]
    found = read_items(write_jsonl(tmp_path / "t.jsonl", tasks))  # a .json list works the same
    assert found.items[0]["a"] == "one" and found.decisions[0]["annotator"] == "ann@example.org"
    assert found.decisions[0]["choice"] == "b" and "1 annotations without" in found.summary
    bad = [{"data": {"prompt": "p", "text1": "one", "text2": "two"},
            "annotations": [{"result": [{"type": "pairwise", "value": {"selected": "up"}}]}]}]
    with pytest.raises(DataError, match="task 1: pairwise result selects 'up'"):
        labelstudio.read_tasks(bad, "x.json")


# --------------------------------------------------------------------------------------------------------- server


def client(store, *, tokens=False, base="http://127.0.0.1"):
    from starlette.testclient import TestClient

    from dpokit.annotate.server import create_app

    return TestClient(create_app(store, tokens_required=tokens, loopback_only=True, guidelines="be fair"),
                      base_url=base)


def test_bad_requests_get_4xx_and_change_nothing(store):
    c = client(store)
    me = {"X-Annotator": "alice"}
    item = c.get("/api/next", headers=me).json()["item"]
    cases = [
        ({"item": "f" * 32, "choice": "left"}, me, 404),                     # unknown item
        ({"item": item["id"], "choice": "both"}, me, 400),                   # not a choice
        ({"item": item["id"], "choice": "left", "extra": 1}, me, 400),       # unknown field
        ({"item": "../../etc", "choice": "left"}, me, 400),                  # not an item id
        ({"item": item["id"], "choice": "left", "rationale": "x" * 2001}, me, 400),
        ({"item": item["id"], "choice": "left"}, {}, 400),                   # no annotator
        ({"item": item["id"], "choice": "left"}, {"X-Annotator": "<script>"}, 400),
        ({"item": item["id"], "choice": "left"}, {"X-Annotator": "bob"}, 409),  # not bob's item
    ]
    for body, headers, status in cases:
        r = c.post("/api/decision", json=body, headers=headers)
        assert r.status_code == status, (body, headers, r.text)
        assert "error" in r.json()
    big = json.dumps({"item": item["id"], "choice": "left", "rationale": "x" * 20000})
    r = c.post("/api/decision", content=big, headers={**me, "Content-Type": "application/json"})
    assert r.status_code == 413
    r = c.post("/api/decision", content="choice=left", headers={**me, "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415
    assert c.post("/api/decision", content="{not json", headers={**me, "Content-Type": "application/json"}
                  ).status_code == 400
    assert c.get("/api/nothing").status_code == 404 and c.get("/api/decision").status_code == 405
    assert store.decisions() == []  # nothing of the above changed anything
    r = c.post("/api/decision", json={"item": item["id"], "choice": "left", "rationale": "<script>x</script>"},
               headers=me)
    assert r.status_code == 200 and store.decisions()[0]["rationale"] == "<script>x</script>"


def test_a_loopback_server_answers_only_requests_addressed_to_loopback(store):
    assert client(store, base="http://evil.example").get("/api/session").status_code == 421
    assert client(store, base="http://localhost:8000").get("/healthz").status_code == 200


def test_tokens_are_required_beyond_loopback(tmp_path, store, capsys):
    c = client(store, tokens=True)
    assert c.get("/api/next", headers={"X-Annotator": "alice"}).status_code == 401  # a name is not enough
    assert c.get("/api/next", headers={"Authorization": "Bearer nope"}).status_code == 403
    before = store.decisions()
    assert main(["annotate", "tokens", "--db", str(tmp_path / "db.sqlite"), "--annotators", "alice,bob"]) == 0
    tokens = dict(line.split("\t") for line in capsys.readouterr().out.splitlines())
    auth = {"Authorization": f"Bearer {tokens['alice']}"}
    assert c.get("/api/session", headers=auth).json()["annotator"] == "alice"
    item = c.get("/api/next", headers=auth).json()["item"]
    r = c.post("/api/decision", json={"item": item["id"], "choice": "tie"}, headers={"X-Annotator": "alice"})
    assert r.status_code == 401 and store.decisions() == before
    assert c.post("/api/decision", json={"item": item["id"], "choice": "tie"}, headers=auth).status_code == 200
    assert store.decisions()[0]["annotator"] == "alice"


def test_serve_refuses_a_public_address_without_tokens(tmp_path, capsys):
    items = write_jsonl(tmp_path / "items.jsonl", PAIRS)
    rc = main(["annotate", "serve", str(items), "--db", str(tmp_path / "db.sqlite"), "--host", "0.0.0.0"])
    assert rc == 2 and "needs annotator tokens" in capsys.readouterr().err
    rc = main(["annotate", "serve", "--db", str(tmp_path / "empty.sqlite")])
    assert rc == 2 and "holds no items" in capsys.readouterr().err
    rc = main(["annotate", "export", "--db", str(tmp_path / "none.sqlite"), "--output", "x.jsonl"])
    assert rc == 2 and "no such file" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------- A/B


def test_blind_ab_from_eval_samples_gives_a_human_win_rate_in_eval_json_and_the_report(tmp_path):
    from dpokit.demo import build_model, build_tokenizer
    from dpokit.report import write_report

    tok = build_tokenizer()
    for name, seed in (("policy", 1), ("ref", 2)):
        build_model(tok, seed).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "one morning , the baker went to the market ."},
                                                       {"prompt": "at dawn , my uncle visited the river ."}])
    out = tmp_path / "run"  # a run directory: `dpokit report` shows its eval.md beside its curves
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.69}) + "\n")
    rc = main(["eval", "--model", str(tmp_path / "policy"), "--ref", str(tmp_path / "ref"), "--prompts", str(prompts),
               "--judge", "implicit", "--num_samples", "3", "--max_new_tokens", "6", "--output_dir", str(out),
               "--save_samples", str(tmp_path / "samples.jsonl")])
    assert rc == 0
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and {s["sample"] for s in samples} == {0, 1, 2}
    assert all(isinstance(s["policy_score"], float) for s in samples)
    db = tmp_path / "ab.sqlite"
    s = Store(db)
    found = read_items(tmp_path / "samples.jsonl")
    s.add_items(found.kind, found.items)
    policy_texts = {it["a"] for it in s.items()}
    while (item := s.next_item("alice")) is not None:  # alice always prefers the policy's sample
        s.decide("alice", item["id"], "left" if item["left"] in policy_texts else "right")
    summary, lines = export(str(db))
    human = summary["human"]
    assert human["win_rate"] == pytest.approx(1.0 - 0.5 * human["identical"] / 6)
    result = json.loads((out / "eval.json").read_text())
    assert result["human"]["win_rate"] == human["win_rate"] and "win_rate" in result["samples"]
    md = (out / "eval.md").read_text()
    assert "| people, blind A/B (1 annotators) |" in md and "| judge `implicit` |" in md
    page = write_report([str(out)], str(tmp_path / "r.html")).read_text()
    assert "people, blind A/B (1 annotators)" in page and "<td>judge <code>implicit</code></td>" in page


def test_save_samples_needs_prompts(tmp_path, capsys):
    rc = main(["eval", "--model", str(tmp_path), "--ref", str(tmp_path), "--pairs", "p.jsonl",
               "--save_samples", "s.jsonl"])
    assert rc == 2 and "--save_samples saves the samples of --prompts" in capsys.readouterr().err


def test_ab_export_of_conversations_gives_conversational_pairs_and_needs_its_evaluation(tmp_path):
    from dpokit.data import load_rows, preference_examples

    prompt = [{"role": "user", "content": "hello?"}]
    rows = [{"prompt": prompt, "policy": f"hi {i}", "reference": f"go {i}", "prompt_index": 0, "sample": i,
             "eval_dir": str(tmp_path / "missing")} for i in range(3)]
    s = Store(tmp_path / "ab.sqlite")
    found = read_items(write_jsonl(tmp_path / "ab.jsonl", rows))
    s.add_items(found.kind, found.items)
    label(s, "alice", prefer("hi"))
    out = tmp_path / "pairs.jsonl"
    with pytest.raises(ConfigError, match="missing/eval.json: no such file"):
        export(str(tmp_path / "ab.sqlite"), output=str(out))
    assert not out.exists()  # refused before anything was written
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "eval.json").write_text(json.dumps({"model": "m", "reference": "r", "beta": 0.1}))
    summary, _ = export(str(tmp_path / "ab.sqlite"), output=str(out), eval_dir=str(tmp_path / "e"))
    assert summary["human"]["win_rate"] == 1.0 and summary["human"]["win_rate_se"] == 0.0
    examples, report = preference_examples(*load_rows(str(out)))
    assert report.format == "conversational" and examples[0].chosen == [{"role": "assistant", "content": "hi 0"}]
    assert json.loads(out.read_text().splitlines()[0])["chosen_model"] == "policy"
    assert "| people, blind A/B (1 annotators) | 1.0000 ± 0.0000 | 3 |" in (tmp_path / "e" / "eval.md").read_text()
