"""People in the loop: label pairs in the browser, measure agreement, export training pairs or a human win rate.

    dpokit annotate serve ITEMS --db annotations.sqlite [--guidelines FILE] [--port P] [--overlap N]
    dpokit annotate export --db annotations.sqlite --output pairs.jsonl [--label_studio tasks.json] [--report FILE]
    dpokit annotate import tasks.json --db annotations.sqlite      # a Label Studio export, with its annotations
    dpokit annotate tokens --db annotations.sqlite --annotators alice,bob [--output tokens.tsv]

Modules: `items` (what is compared, read from files), `store` (the SQLite database), `server` (the web app and its
checks), `static/` (the page), `export` (majority verdicts, training rows, the human win rate), `agreement`
(Cohen's kappa, Krippendorff's alpha), `labelstudio` (Label Studio's pairwise tasks, both ways).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from dpokit.errors import ConfigError
from dpokit.options import Parser, integer, number, positive_int, seed

COMMANDS = {
    "serve": "label items in the browser (a local web app over an SQLite database)",
    "export": "training pairs (majority verdicts), agreement, Label Studio tasks, the human win rate of an A/B",
    "import": "add a Label Studio JSON export (tasks and their annotations) to a database",
    "tokens": "make a token per annotator, needed when the server listens beyond this machine (--host)",
}


class _Parser(Parser):
    def error(self, message):
        raise ConfigError(f"{self.prog.split()[-1]}: {message}")  # the CLI prefixes "dpokit annotate: error:"


def _parser(name: str) -> _Parser:
    p = _Parser(prog=f"dpokit annotate {name}", description=COMMANDS[name])
    # Read and updated in place: an input, which no output of the command may be.
    p.add_argument("--db", required=True, reads=True, help="the annotation database (SQLite; made on first use)")
    return p


def _file_digest(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load(store, source: str, seed: int) -> str:
    """Add the items of `source` to `store`; a file already loaded unchanged is not read again (fast restarts)."""
    from dpokit.annotate.items import read_items

    path = Path(source)
    digest = _file_digest(path)
    key = f"loaded:{path.resolve()}:{seed}"
    if digest is not None and store.get_meta(key) == digest:
        return f"{source}: loaded before, unchanged"
    found = read_items(source, seed=seed)
    added, present = store.add_items(found.kind, found.items)
    if digest is not None:
        store.set_meta(key, digest)
    return f"{found.summary}; {added} new items, {present} already in the database"


def _serve(argv) -> int:
    from dpokit.annotate.server import MAX_GUIDELINES, is_loopback, serve
    from dpokit.annotate.store import LEASE_S, Store
    from dpokit.fileio import read_text

    p = _parser("serve")
    p.add_argument("items", nargs="?", metavar="ITEMS", reads=True,
                   help="pairs, scored samples, `dpokit eval --save_samples` samples or a Label Studio export "
                        "(optional once the database holds items)")
    p.add_argument("--guidelines", metavar="FILE", reads=True,
                   help="the labelling guidelines, shown above every item (as text)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; any but loopback requires tokens")
    p.add_argument("--port", type=integer("[0, 65535]"), default=8765, help="port (0: any free one)")
    p.add_argument("--overlap", type=positive_int, default=1,
                   help="annotators who label each item (2+ measures agreement)")
    p.add_argument("--seed", type=seed, default=0, help="draws the two responses of scored samples")
    p.add_argument("--require_tokens", action="store_true", help="require tokens on a loopback address too")
    p.add_argument("--lease_minutes", type=number("(0, 10080]"), default=LEASE_S / 60,
                   help="how long an item shown to an annotator is kept from others")
    args = p.parse_args(argv)
    store = Store(args.db, lease_s=args.lease_minutes * 60)
    tokens = args.require_tokens or not is_loopback(args.host)
    if tokens and not store.has_tokens():
        raise ConfigError(f"listening on {args.host} needs annotator tokens: run `dpokit annotate tokens --db "
                          f"{args.db} --annotators NAME,NAME` first, and give each annotator their link")
    loaded = _load(store, args.items, args.seed) if args.items else None
    if store.kind is None:
        raise ConfigError(f"--db {args.db} holds no items: give an ITEMS file")
    if args.guidelines is not None:
        text = read_text(args.guidelines, "--guidelines")
        if len(text) > MAX_GUIDELINES:
            raise ConfigError(f"--guidelines {args.guidelines}: {len(text)} characters, more than {MAX_GUIDELINES}")
        store.set_meta("guidelines", text)
    store.set_overlap(args.overlap)
    counts = store.count_items()

    def announce(url: str) -> None:
        if loaded:
            print(f"[dpokit] {loaded}", flush=True)
        print(f"[dpokit] {counts['served']} items to label ({counts['complete']} complete, overlap {args.overlap}); "
              f"db {args.db}; {'tokens required' if tokens else 'annotators give their name'}", flush=True)
        print(f"[dpokit] serving at {url}" + (" (each annotator opens it with ?token=THEIR_TOKEN)" if tokens else ""),
              flush=True)

    serve(store, host=args.host, port=args.port, tokens_required=tokens,
          guidelines=store.get_meta("guidelines") or "", announce=announce)
    return 0


def _export(argv) -> int:
    from dpokit.annotate.export import export

    p = _parser("export")
    p.add_argument("--output", writes=True,
                   help="training pairs (.jsonl): majority verdicts, ties and skips left out and counted")
    p.add_argument("--label_studio", metavar="FILE.json", writes=True,
                   help="also the tasks and annotations as a Label Studio JSON export (its labelling config beside it)")
    p.add_argument("--report", metavar="FILE.json", writes=True,
                   help="the whole summary: agreement, every disagreement")
    p.add_argument("--eval_dir", reads=True,
                   help="A/B items: the evaluation to add the human win rate to (default: the one that saved the "
                        "samples)")
    p.add_argument("--show", type=integer("[0, inf)"), default=10, help="disagreeing items to list")
    args = p.parse_args(argv)
    _, lines = export(args.db, output=args.output, label_studio=args.label_studio, report=args.report,
                      eval_dir=args.eval_dir, show=args.show)
    print("\n".join(lines))
    return 0


def _import(argv) -> int:
    from dpokit import data as D
    from dpokit.annotate import labelstudio
    from dpokit.annotate.store import Store
    from dpokit.errors import DataError

    p = _parser("import")
    p.add_argument("file", metavar="FILE", reads=True, help="a Label Studio JSON export of pairwise tasks")
    args = p.parse_args(argv)
    rows, name = D.load_rows(args.file)
    if not labelstudio.is_export(rows):
        raise DataError(f"{name}: not a Label Studio export (a JSON list of tasks with data.text1 and data.text2)")
    found = labelstudio.read_tasks(rows, name)
    store = Store(args.db)
    added, present = store.add_items(found.kind, found.items)
    new = sum(store.import_decision(d["annotator"], d["item"], d["choice"], d["left"], d["rationale"],
                                    d["decided_at"]) for d in found.decisions)
    print(f"{found.summary}; {added} new items ({present} already in {args.db}), {new} new decisions "
          f"({len(found.decisions) - new} already recorded)")
    return 0


def _tokens(argv) -> int:
    import os

    from dpokit.annotate.server import NAME
    from dpokit.annotate.store import Store
    from dpokit.fileio import atomic_path

    p = _parser("tokens")
    p.add_argument("--annotators", required=True, help="comma-separated names; a name that has a token gets a new one")
    p.add_argument("--output", writes=True,
                   help="write NAME<TAB>TOKEN lines here (readable by you only) instead of printing them")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.annotators.split(",") if n.strip()]
    bad = [n for n in names if not NAME.match(n)]
    if not names or bad:
        raise ConfigError(f"--annotators: {bad[0]!r} is not a name (1 to 64 letters, digits, spaces or . @ + - _)"
                          if bad else "--annotators: give at least one name")
    tokens = Store(args.db).add_tokens(names)
    text = "".join(f"{n}\t{t}\n" for n, t in tokens.items())
    if args.output:
        with atomic_path(args.output) as tmp:  # readable by its owner only, from the moment it exists
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
                f.write(text)
        print(f"{args.output}: tokens of {', '.join(tokens)}; each annotator opens http://HOST:PORT/?token=TOKEN")
    else:
        sys.stdout.write(text)
    return 0


HANDLERS = {"serve": _serve, "export": _export, "import": _import, "tokens": _tokens}


def main(argv: list[str]) -> int:
    """Dispatch ``dpokit annotate <command> ...``."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: dpokit annotate {serve,export,import,tokens} ...  (dpokit annotate <command> --help)\n")
        print("\n".join(f"  {name:<7} {doc}" for name, doc in COMMANDS.items()))
        return 0
    if argv[0] not in HANDLERS:
        raise ConfigError(f"unknown command {argv[0]!r}; one of {', '.join(HANDLERS)}")
    return HANDLERS[argv[0]](argv[1:])
