"""The A/B store and its statistics: comparisons, blind votes and tallies with a Wilson interval, kept in the
registry workspace (`$SDTUNE_HOME/ab.sqlite` and `ab/<id>/`).

Torch-free, so a studio page can drive it one vote at a time.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdtune.adapters.ab.spec import ABError
from sdtune.adapters.workspace import open_db, sdtune_home

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval
CHOICES = ("left", "right", "tie")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS comparisons (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,          -- ab or checkpoints
    created_at TEXT NOT NULL,
    sides TEXT NOT NULL,         -- JSON: {"a": spec, "b": spec} or the checkpoint candidates
    settings TEXT NOT NULL,      -- JSON: prompts, seeds, steps, guidance, scheduler, width, height
    blind INTEGER NOT NULL,
    score TEXT,                  -- the scorer, e.g. toy:purple; NULL: none
    result TEXT NOT NULL         -- JSON: grids, per-side scores, the best checkpoint...
);
CREATE TABLE IF NOT EXISTS pairs (
    comparison_id TEXT NOT NULL,
    pair INTEGER NOT NULL,
    prompt TEXT NOT NULL,
    seed INTEGER NOT NULL,
    left_side TEXT NOT NULL,     -- a or b: which side's image is shown on the left
    image_left TEXT NOT NULL,
    image_right TEXT NOT NULL,
    score_a REAL,
    score_b REAL,
    PRIMARY KEY (comparison_id, pair)
);
CREATE TABLE IF NOT EXISTS votes (
    comparison_id TEXT NOT NULL,
    pair INTEGER NOT NULL,
    choice TEXT NOT NULL,        -- left, right or tie, as the voter saw it
    side TEXT NOT NULL,          -- a, b or tie
    voted_at TEXT NOT NULL,
    PRIMARY KEY (comparison_id, pair)
);
CREATE TABLE IF NOT EXISTS vote_history (   -- append-only: a changed vote keeps its earlier one here
    comparison_id TEXT NOT NULL,
    pair INTEGER NOT NULL,
    choice TEXT NOT NULL,
    side TEXT NOT NULL,
    voted_at TEXT NOT NULL
);
"""


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion: every p for which |successes/n - p| is within z standard
    errors sqrt(p(1-p)/n). Unlike the normal approximation it stays inside [0, 1] and is sane at 0/n and n/n."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def tally_votes(a: int, b: int, tie: int) -> dict:
    """Counts and the share of A with its 95% Wilson interval over the decisive votes (ties left out, as above)."""
    decisive = a + b
    low, high = wilson_interval(a, decisive)
    if decisive and low > 0.5:
        verdict = "A preferred"
    elif decisive and high < 0.5:
        verdict = "B preferred"
    else:
        verdict = "no clear preference"
    share = a / decisive if decisive else None
    return {"a": a, "b": b, "tie": tie, "n": a + b + tie, "decisive": decisive, "share_a": share,
            "ci_low": low, "ci_high": high, "verdict": verdict}  # fmt: skip


def _all_voted(db, cid: str) -> bool:
    voted = db.execute("SELECT COUNT(*) FROM votes WHERE comparison_id = ?", (cid,)).fetchone()[0]
    return voted == db.execute("SELECT COUNT(*) FROM pairs WHERE comparison_id = ?", (cid,)).fetchone()[0]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _new_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


# -- the store ------------------------------------------------------------------------------------------------------


@dataclass
class PairRow:
    pair: int
    prompt: str
    seed: int
    left_side: str
    image_left: str
    image_right: str
    score_a: float | None = None
    score_b: float | None = None


@dataclass
class NewComparison:
    """What a renderer put into the staging folder, for `ABStore.add` to index."""

    kind: str
    sides: dict
    settings: dict
    blind: bool
    score: str | None
    result: dict = field(default_factory=dict)
    pairs: list[PairRow] = field(default_factory=list)


class ABStore:
    """Comparisons and votes in the registry workspace `home` (default `$SDTUNE_HOME`); safe across processes."""

    def __init__(self, home: str | Path | None = None):
        self.home = sdtune_home(home)
        self.root = self.home / "ab"
        self.db_path = self.home / "ab.sqlite"

    def _db(self, write: bool = False):
        self.root.mkdir(parents=True, exist_ok=True)
        return open_db(self.db_path, _SCHEMA, write)

    def add(self, fill) -> str:
        """`fill(staging_folder) -> NewComparison` writes the images; the rows are inserted and the folder renamed to
        `ab/<id>` in one transaction, so the index never lists a comparison without its images. Returns the id."""
        staging = self.root / ".staging" / f"{os.getpid()}-{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        try:
            new = fill(staging)
            with self._db(write=True) as db:
                cid = _new_id()
                while (self.root / cid).exists():
                    cid = _new_id()
                db.execute(
                    "INSERT INTO comparisons VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (cid, new.kind, _now(), json.dumps(new.sides), json.dumps(new.settings), int(new.blind),
                     new.score, json.dumps(new.result)),
                )  # fmt: skip
                db.executemany(
                    "INSERT INTO pairs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(cid, *asdict(p).values()) for p in new.pairs],
                )
                os.rename(staging, self.root / cid)  # last: if anything above fails, the transaction rolls back
            return cid
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def update_result(self, cid: str, **changes) -> None:
        with self._db(write=True) as db:
            result = {**json.loads(self._row(db, cid)[7]), **changes}
            db.execute("UPDATE comparisons SET result = ? WHERE id = ?", (json.dumps(result), cid))

    def _row(self, db, cid: str):
        row = db.execute("SELECT * FROM comparisons WHERE id = ?", (cid,)).fetchone()
        if row is None:
            raise ABError(f"no comparison {cid!r} in {self.home} (see `sdtune ab list`)")
        return row

    def vote(self, cid: str, pair: int, choice: str) -> dict:
        """Records (or replaces) the vote on one pair: left / right / tie as shown, or a / b when not blind. Every
        vote is kept in vote_history too. A revealed blind comparison refuses: its votes are final."""
        choice = choice.strip().lower()
        with self._db(write=True) as db:
            blind = bool(self._row(db, cid)[5])
            allowed = CHOICES if blind else (*CHOICES, "a", "b")
            if choice not in allowed:
                raise ABError(f"vote {choice!r}: choose {', '.join(allowed)}")
            if blind and _all_voted(db, cid):  # checked inside the write transaction: no vote slips in after it
                raise ABError(f"comparison {cid} is revealed (every pair voted, the sides shown): its votes are final")
            found = db.execute(
                "SELECT left_side FROM pairs WHERE comparison_id = ? AND pair = ?", (cid, pair)
            ).fetchone()
            if found is None:
                count = db.execute("SELECT COUNT(*) FROM pairs WHERE comparison_id = ?", (cid,)).fetchone()[0]
                raise ABError(f"comparison {cid}: no pair {pair} (pairs are 0..{count - 1})")
            left = found[0]
            side = {"left": left, "right": "b" if left == "a" else "a"}.get(choice, choice)
            row = (cid, pair, choice, side, _now())
            db.execute("INSERT OR REPLACE INTO votes VALUES (?, ?, ?, ?, ?)", row)
            db.execute("INSERT INTO vote_history VALUES (?, ?, ?, ?, ?)", row)
        return self.tally(cid)

    def tally(self, cid: str, *, unseal: bool = False) -> dict:
        """The votes counted. A blind comparison still being voted is `sealed`: only how many pairs are voted and how
        many are left, since a running A/B split would tell the voter which side each vote just went to (and the
        next votes would not be blind). `unseal=True` is for code that needs the sides, never for display."""
        with self._db() as db:
            blind = bool(self._row(db, cid)[5])
            counts = dict(db.execute("SELECT side, COUNT(*) FROM votes WHERE comparison_id = ? GROUP BY side", (cid,)))
            pairs = db.execute("SELECT COUNT(*) FROM pairs WHERE comparison_id = ?", (cid,)).fetchone()[0]
        tally = tally_votes(counts.get("a", 0), counts.get("b", 0), counts.get("tie", 0))
        remaining = pairs - tally["n"]
        if blind and remaining and not unseal:
            return {"id": cid, "sealed": True, "n": tally["n"], "pairs": pairs, "remaining": remaining}
        return {"id": cid, "sealed": False, **tally, "pairs": pairs, "remaining": remaining}

    def get(self, cid: str, *, unseal: bool = False) -> dict:
        """The comparison as plain data; in blind mode the sides, the scores and the tally show only once every pair
        is voted (`revealed`: the votes are then final): shown pair by pair, each reveal would tell the voter what
        the other side looks like, and a vote could still be changed after seeing it. Each pair's `votes` lists
        every vote cast on it, in order; `vote` is the one that counts. `unseal=True` gives the sides of a
        comparison still being voted, for code that trains or ranks on its votes, never for display."""
        with self._db() as db:
            row = self._row(db, cid)
            pair_rows = db.execute(
                "SELECT pair, prompt, seed, left_side, image_left, image_right, score_a, score_b FROM pairs "
                "WHERE comparison_id = ? ORDER BY pair",
                (cid,),
            ).fetchall()
            votes = dict(db.execute("SELECT pair, choice FROM votes WHERE comparison_id = ?", (cid,)))
            history = db.execute(
                "SELECT pair, choice FROM vote_history WHERE comparison_id = ? ORDER BY rowid", (cid,)
            ).fetchall()
        folder = self.root / cid
        blind = bool(row[5])
        sealed = blind and len(votes) < len(pair_rows) and not unseal
        result = json.loads(row[7])
        if sealed:
            result = {k: v for k, v in result.items() if k != "scores"}  # side means would give the sides away
            controls = result.get("control_images")
            if controls and controls["a"] != controls["b"]:  # which side steers by which image would too
                result.pop("control_images")
        if "control_images" in result:
            result["control_images"] = {s: [str(folder / n) for n in names]
                                        for s, names in result["control_images"].items()}  # fmt: skip
        pairs = []
        for p in (PairRow(*r) for r in pair_rows):
            shown = not sealed
            right = "b" if p.left_side == "a" else "a"
            scores = {"a": p.score_a, "b": p.score_b}
            pairs.append({
                "pair": p.pair, "prompt": p.prompt, "seed": p.seed,
                "left": str(folder / p.image_left), "right": str(folder / p.image_right), "vote": votes.get(p.pair),
                "left_is": p.left_side if shown else None, "right_is": right if shown else None,
                "score_left": scores[p.left_side] if shown else None, "score_right": scores[right] if shown else None,
                "votes": [choice for number, choice in history if number == p.pair],
            })  # fmt: skip
        sides = json.loads(row[3])
        return {"id": cid, "kind": row[1], "created_at": row[2], **sides, "sides": sides,
                "settings": json.loads(row[4]), "blind": blind, "score": row[6], "folder": str(folder),
                "revealed": not blind or len(votes) == len(pair_rows), **result, "pairs": pairs,
                "tally": self.tally(cid, unseal=unseal)}  # fmt: skip

    def history(self, limit: int = 50) -> list[dict]:
        """Comparisons, newest first, with their tallies."""
        with self._db() as db:
            rows = db.execute(
                "SELECT id, kind, created_at, sides, blind, score FROM comparisons ORDER BY created_at DESC, id DESC "
                "LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            {"id": cid, "kind": kind, "created_at": at, "sides": json.loads(sides), "blind": bool(blind),
             "score": score, "tally": self.tally(cid)}
            for cid, kind, at, sides, blind, score in rows
        ]  # fmt: skip
