"""A/B comparisons: two compositions rendered at the same prompts, seeds and settings, blind votes, a tally with a
confidence interval, and "which checkpoint of this run is best?".

A side is a SPEC, a base plus registry adapters (or LoRA files, run folders) with weights:

    toy                                  the base alone
    toy+toy-purple:0.8                   the base with one LoRA at 0.8
    toy+toy-purple:0.8+toy-cyan:0.5      stacked LoRAs, as `sdtune sample --adapter ... --adapter ...`
    runs/db/diffusers+toy-purple         any base `sdtune sample --base` takes
    toy+controlnet=toy-masks:0.9@mask.png  a ControlNet (registry name, folder, run or file) at a scale, steering
                                         by a control image; it combines with LoRAs and repeats (MultiControlNet)

Each comparison lives in the registry workspace (`$SDTUNE_HOME`):

    ab.sqlite                 WAL index: comparisons (specs, settings, scores), pairs (prompt, seed, which side is
                              shown left, images, toy scores), votes (one per pair; voting again replaces it until
                              the comparison is revealed) and vote_history (every vote cast, changed ones too)
    ab/<id>/                  the images and grids of one comparison, renamed into place when complete, and a
                              copy of each control image (`control-<sha256 prefix>.png`: a copy, so the comparison
                              still shows what steered it after the original file changes or goes)
    ab/.staging/<pid>-<uuid>/ a comparison being rendered; nothing reads it

A pair is one (prompt, seed) rendered by both sides. In blind mode each pair's sides are shuffled (the order is
recorded), its images are named `NNN-left.png` / `NNN-right.png`, and which side was left is revealed only once the
pair is voted; per-pair toy scores are hidden until then too, so they cannot give the sides away. Control images
are shown while voting only when both sides steer by the same ones (then they tell nothing about the sides).
A blind comparison is revealed once every pair is voted (the sides' scores and control images show then): from
there its votes are final, since a vote changed after seeing which side is which is no blind vote.

The tally counts votes for A, for B and ties. The share of A and its 95% Wilson score interval are computed over
the decisive votes only (a + b): a tie says neither side won, so, as in the sign test, it is reported but is no
half-win for either side. With no decisive vote the interval is the whole [0, 1].

Rendering goes through `compose.build` and `sampling.generate`, the code path of `sdtune sample`; everything
else here (votes, tallies, history) is torch-free so a studio page can drive it one vote at a time.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sdtune.adapters.atomic import write_bytes_atomic
from sdtune.adapters.errors import SdtuneError
from sdtune.adapters.registry import open_db, sdtune_home

if TYPE_CHECKING:
    from sdtune.adapters.compose import PipelineSpec

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


class ABError(SdtuneError, ValueError):
    """A comparison that cannot be made or a vote that cannot be taken; the message is one line."""


# -- specs, settings, scorers ---------------------------------------------------------------------------------------


CONTROL_PART = "controlnet="


@dataclass(frozen=True)
class ControlUse:
    """One ControlNet of a side: `ref` a registry name or a path, its scale, and the image it steers by."""

    ref: str
    scale: float
    image: str


@dataclass
class Side:
    """One side of a comparison: the base with its adapters (a `compose.PipelineSpec`) and its ControlNets."""

    pipeline: PipelineSpec
    controls: list[ControlUse] = field(default_factory=list)


def parse_spec(text: str, flag: str = "--a") -> Side:
    """`BASE[+ADAPTER[:WEIGHT]]...[+controlnet=REF[:SCALE]@IMAGE]...` -> a `Side` (see the module docstring)."""
    from sdtune.adapters.compose import PipelineSpec

    parts = [p.strip() for p in (text or "").split("+")]
    if not all(parts):
        raise ABError(f"{flag} {text!r}: an empty part; write BASE+ADAPTER[:WEIGHT]+..., e.g. toy+toy-purple:0.8")
    if parts[0].startswith(CONTROL_PART):
        raise ABError(f"{flag} {text!r}: a spec starts with its base, e.g. toy+{parts[0]}")
    adapters, controls = [], []
    for part in parts[1:]:
        if not part.startswith(CONTROL_PART):
            adapters.append(_adapter_use(part, flag))
            continue
        ref_scale, at, image = part[len(CONTROL_PART) :].partition("@")  # an image path may hold an @ too
        if not (at and ref_scale and image):
            raise ABError(
                f"{flag} {part!r}: write {CONTROL_PART}NAME_OR_PATH[:SCALE]@CONTROL_IMAGE, "
                f"e.g. {CONTROL_PART}toy-masks:0.9@circle-mask.png"
            )
        if not Path(image).expanduser().is_file():
            raise ABError(f"{flag} {part!r}: control image {image} not found")
        named = _adapter_use(ref_scale, flag)  # NAME_OR_PATH[:NUMBER], as an adapter's weight is read
        controls.append(ControlUse(named.ref, named.weight, str(Path(image).expanduser())))
    return Side(PipelineSpec(base=parts[0], adapters=adapters), controls)


def _adapter_use(text: str, flag: str):
    """`NAME_OR_PATH[:NUMBER]` as an AdapterUse; a weight that is no finite number is the flag's error."""
    from sdtune.adapters.compose import AdapterUse

    try:
        return AdapterUse.parse(text)
    except ValueError as exc:
        raise ABError(f"{flag} {exc}") from None


def short_spec(text: str) -> str:
    """A SPEC for titles: each control image by its file name (`...@/long/path/mask.png` -> `...@mask.png`)."""
    parts = text.split("+")
    return "+".join(
        f"{p.partition('@')[0]}@{Path(p.partition('@')[2]).name}" if p.startswith(CONTROL_PART) and "@" in p else p
        for p in parts
    )


@dataclass
class Settings:
    """What every image of a comparison shares, besides the model: same prompts, seeds and sampler on each side."""

    prompts: list[str]
    seeds: list[int]
    steps: int = 25
    guidance: float | None = None  # None: the base's recommended scale (3 toy, 7.5 SD v1-5)
    scheduler: str = "default"
    width: int | None = None
    height: int | None = None
    negative_prompt: str = ""

    def __post_init__(self):
        if not self.prompts:
            raise ABError("--prompt: give at least one prompt")
        if not self.seeds:
            raise ABError("--seed: give at least one seed")
        if self.steps < 1:
            raise ABError(f"--steps: must be at least 1, got {self.steps}")

    def sample_settings(self, guidance: float) -> list:
        from sdtune.adapters.sampling import grid_settings

        common = dict(steps=self.steps, guidance=guidance, scheduler=self.scheduler, width=self.width)
        return grid_settings(
            self.prompts, self.seeds, height=self.height, negative_prompt=self.negative_prompt, **common
        )


@dataclass(frozen=True)
class Scorer:
    """The toy-world scorer with a target: `toy` reads colour and shape words from each prompt; `toy:COLOR` fixes
    the colour (shape from the prompt); `toy:COLOR:SHAPE` fixes both. An image scores 1 when the scorer finds the
    target colour and shape, else 0; a side's score is the mean over its images."""

    text: str
    color: str | None = None
    shape: str | None = None

    @classmethod
    def parse(cls, text: str) -> Scorer:
        from sdtune.adapters import toyworld

        kind, *target = text.split(":")
        if kind != "toy" or len(target) > 2:
            raise ABError(f"--score {text!r}: use toy, toy:COLOR or toy:COLOR:SHAPE (e.g. toy:purple)")
        color, shape = (target + [None, None])[:2]
        if color and color not in toyworld.COLORS:
            raise ABError(f"--score {text!r}: unknown colour {color!r}; one of {', '.join(toyworld.COLORS)}")
        if shape and shape not in toyworld.SHAPES:
            raise ABError(f"--score {text!r}: unknown shape {shape!r}; one of {', '.join(toyworld.SHAPES)}")
        return cls(text, color or None, shape or None)

    def target(self, prompt: str) -> tuple[str | None, str | None]:
        from sdtune.adapters import toyworld

        words = prompt.lower().replace(",", " ").split()
        color = self.color or next((w for w in words if w in toyworld.COLORS), None)
        shape = self.shape or next((w for w in words if w in toyworld.SHAPES), None)
        if color is None and shape is None:
            raise ABError(f"--score {self.text}: prompt {prompt!r} names no toy colour or shape; give toy:COLOR")
        return color, shape

    def score(self, image, prompt: str) -> float:
        from sdtune.adapters import toyworld

        color, shape = self.target(prompt)
        return toyworld.score_images([image], [(color, shape)]).both


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


# -- rendering ------------------------------------------------------------------------------------------------------


class Renderer:
    """Renders sides through `compose.build` + `sampling.generate` (`sdtune sample`'s path). Sides on the same base
    reuse its loaded pipeline: switching adapters is `Composer.set`, no reload; ControlNets are loaded once per base
    and set, over the same components (the LoRAs set on the base stay in effect)."""

    def __init__(self, device: str | None = None, dtype: str | None = None, registry=None):
        self.device, self.dtype, self.registry = device, dtype, registry
        self._composers: dict[str, object] = {}
        self._controlled: dict[tuple, object] = {}

    def check(self, side: Side) -> None:
        """Every adapter and ControlNet of `side` resolves, and its base is not a LoRA (`toy-purple` alone means
        `toy+toy-purple`)."""
        from sdtune.adapters.compose import resolve_adapter, resolve_controlnet
        from sdtune.adapters.registry import Registry

        spec = side.pipeline
        for use in spec.adapters:
            resolve_adapter(use.ref, self.registry)
        for control in side.controls:
            resolve_controlnet(control.ref, self.registry)
        registry = self.registry or Registry()
        if "/" not in spec.base and spec.base != "toy" and spec.base in registry:
            if not {"diffusers", "single_file"} & set(registry.manifest(spec.base).files):
                raise ABError(f"spec {spec.base!r}: a LoRA is no base; write BASE+{spec.base}, e.g. toy+{spec.base}")

    def composer(self, spec):
        from sdtune.adapters import compose

        key = spec.base
        if key not in self._composers:
            full = compose.PipelineSpec(base=spec.base, device=self.device, dtype=self.dtype)
            self._composers[key] = compose.build(full, self.registry)
        return self._composers[key].set(spec.adapters)

    def controlled(self, side: Side, composer):
        """The ControlNet pipeline of `side` over `composer`'s components (its adapters already set)."""
        from sdtune.adapters.compose import resolve_controlnet
        from sdtune.adapters.sampling import ControlSpec, load_controlnets

        paths = tuple(resolve_controlnet(c.ref, self.registry) for c in side.controls)
        key = (side.pipeline.base, paths)
        if key not in self._controlled:  # the scales go with each sample, so one load serves every scale
            self._controlled[key] = load_controlnets(composer.pipe, [ControlSpec(path) for path in paths])
        return self._controlled[key]

    def render(self, side: Side, settings: Settings) -> list:
        """`Sample`s of prompts x seeds (row-major), each with its A1111 parameters."""
        from dataclasses import replace

        from sdtune.adapters import sampling
        from sdtune.adapters.base import recommended_guidance, resolve_base
        from sdtune.adapters.compose import resolve_base_ref

        composer = self.composer(side.pipeline)
        pipe = self.controlled(side, composer) if side.controls else composer.pipe
        base = resolve_base_ref(side.pipeline.base, self.registry)
        guidance = settings.guidance if settings.guidance is not None else recommended_guidance(base)
        lora = composer.lora_label()
        extra = {"Lora": lora} if lora else None
        each = settings.sample_settings(guidance)
        if side.controls:
            images = tuple(c.image for c in side.controls)
            scales = tuple(c.scale for c in side.controls)
            each = [replace(s, control_images=images, control_scales=scales) for s in each]
        return sampling.generate(pipe, each, model_name=resolve_base(base).name, extra_parameters=extra)


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
        self.home = Path(home).expanduser() if home is not None else sdtune_home()
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

    def tally(self, cid: str) -> dict:
        with self._db() as db:
            self._row(db, cid)
            counts = dict(db.execute("SELECT side, COUNT(*) FROM votes WHERE comparison_id = ? GROUP BY side", (cid,)))
            pairs = db.execute("SELECT COUNT(*) FROM pairs WHERE comparison_id = ?", (cid,)).fetchone()[0]
        tally = tally_votes(counts.get("a", 0), counts.get("b", 0), counts.get("tie", 0))
        return {"id": cid, **tally, "pairs": pairs, "remaining": pairs - tally["n"]}

    def get(self, cid: str) -> dict:
        """The comparison as plain data; in blind mode a pair's sides and scores show only once it is voted, and
        `revealed` (every pair voted: the votes are final) says the whole comparison is. Each pair's `votes` lists
        every vote cast on it, in order; `vote` is the one that counts."""
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
        all_voted = len(votes) == len(pair_rows)
        result = json.loads(row[7])
        if blind and not all_voted:
            result = {k: v for k, v in result.items() if k != "scores"}  # side means would give the sides away
            controls = result.get("control_images")
            if controls and controls["a"] != controls["b"]:  # which side steers by which image would too
                result.pop("control_images")
        if "control_images" in result:
            result["control_images"] = {s: [str(folder / n) for n in names]
                                        for s, names in result["control_images"].items()}  # fmt: skip
        pairs = []
        for p in (PairRow(*r) for r in pair_rows):
            shown = not blind or p.pair in votes
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
                "revealed": not blind or all_voted, **result, "pairs": pairs, "tally": self.tally(cid)}  # fmt: skip

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


# -- making comparisons ---------------------------------------------------------------------------------------------


def compare(
    a: str,
    b: str,
    settings: Settings,
    *,
    blind: bool = False,
    score: str | None = None,
    store: ABStore | None = None,
    renderer: Renderer | None = None,
    rng: random.Random | None = None,
) -> str:
    """Renders both specs at the same prompts, seeds and settings, writes the pair images and a side-by-side grid,
    and stores the comparison. Returns its id.

    Raises:
        ABError: a bad spec, scorer or setting; compose.ComposeError / BaseLoadError: a side cannot be built.
    """
    from sdtune.adapters import contact_sheet
    from sdtune.adapters.sampling import save_png, save_png_atomic

    side_a, side_b = parse_spec(a, "--a"), parse_spec(b, "--b")
    renderer = renderer or Renderer()
    for side in (side_a, side_b):  # a wrong name fails before either side renders
        renderer.check(side)
    scorer = Scorer.parse(score) if score else None
    if scorer:
        for prompt in settings.prompts:
            scorer.target(prompt)  # a prompt the scorer cannot read fails before any rendering
    store = store or ABStore()
    samples_a, samples_b = renderer.render(side_a, settings), renderer.render(side_b, settings)
    shuffle = rng or random.SystemRandom()  # blind order: unpredictable, recorded per pair

    def fill(folder: Path) -> NewComparison:
        controls = {"a": [_keep_control_image(c.image, folder) for c in side_a.controls],
                    "b": [_keep_control_image(c.image, folder) for c in side_b.controls]}  # fmt: skip
        pairs = []
        for i, (sa, sb) in enumerate(zip(samples_a, samples_b)):
            left = shuffle.choice("ab") if blind else "a"
            shown = (sa, sb) if left == "a" else (sb, sa)
            names = (f"{i:03d}-left.png", f"{i:03d}-right.png") if blind else (f"{i:03d}-a.png", f"{i:03d}-b.png")
            for sample, name in zip(shown, names):  # blind: no PNG parameters either, they name the LoRAs
                save_png_atomic(sample.image, folder / name) if blind else save_png(sample, folder / name)
            scores = [scorer.score(s.image, s.settings.prompt) if scorer else None for s in (sa, sb)]
            pairs.append(PairRow(i, sa.settings.prompt, sa.settings.seed, left, *names, *scores))
        result = {"grid": "grid.png"}
        if controls["a"] or controls["b"]:
            result["control_images"] = controls
        control_rows = _control_rows(controls, folder)
        if blind:  # numbered pairs, sides unnamed: a grid to vote from
            rows = [[(sa, sb)[p.left_side == "b"].image, (sb, sa)[p.left_side == "b"].image]
                    for p, sa, sb in zip(pairs, samples_a, samples_b)]  # fmt: skip
            labels = [f"pair {p.pair}: {p.prompt}, seed {p.seed}" for p in pairs]
            if controls["a"] == controls["b"]:  # the same control images on both sides give nothing away
                rows, labels = [[ca, cb] for _, ca, cb in control_rows] + rows, [r[0] for r in control_rows] + labels
            contact_sheet.save_grid(contact_sheet.make_grid(rows, labels, ["left", "right"]), folder / "grid.png")
        else:
            title = f"A: {short_spec(a)}  |  B: {short_spec(b)}"
            grid = contact_sheet.ab_grid(samples_a, samples_b, settings.prompts, settings.seeds, title,
                                         labels=("A", "B"), lead_rows=control_rows)  # fmt: skip
            contact_sheet.save_grid(grid, folder / "grid.png")
        if scorer:
            result["scores"] = {s: sum(getattr(p, f"score_{s}") for p in pairs) / len(pairs) for s in "ab"}
        return NewComparison("ab", {"a": a, "b": b}, asdict(settings), blind, score, result, pairs)

    return store.add(fill)


def _keep_control_image(path: str, folder: Path) -> str:
    """Copies a control image into the comparison as `control-<sha256 prefix><suffix>` (one copy per content);
    returns its name there."""
    import hashlib

    data = Path(path).read_bytes()
    name = f"control-{hashlib.sha256(data).hexdigest()[:12]}{Path(path).suffix.lower() or '.png'}"
    if not (folder / name).exists():
        write_bytes_atomic(folder / name, data)
    return name


def _control_rows(controls: dict, folder: Path) -> list[tuple]:
    """(label, image of A or None, image of B or None) per ControlNet position, for the grids."""
    from PIL import Image

    def opened(names: list[str], k: int):
        return Image.open(folder / names[k]).convert("RGB") if k < len(names) else None

    count = max(len(controls["a"]), len(controls["b"]))
    return [(f"control image {k}", opened(controls["a"], k), opened(controls["b"], k)) for k in range(count)]


# -- which checkpoint is best? --------------------------------------------------------------------------------------


def _candidate_label(run_dir: Path, path: Path) -> str:
    return "final" if path == run_dir else path.name


def compare_checkpoints(
    run_dir: str | Path,
    settings: Settings,
    *,
    score: str,
    base: str | None = None,
    store: ABStore | None = None,
    renderer: Renderer | None = None,
) -> str:
    """Renders every saved checkpoint of a LoRA run (and its final LoRA) at the same prompts and seeds, scores
    each, and stores the comparison with the best one named (ties: the earliest, the least drift from the base).
    `base` defaults to the one in the run's adapter.json. Returns the comparison id."""
    from sdtune.adapters import contact_sheet
    from sdtune.adapters.compose import AdapterUse, PipelineSpec
    from sdtune.adapters.run_folder import PEFT_FILE, checkpoint_step, lora_checkpoints

    run_dir = Path(run_dir).resolve()
    candidates = lora_checkpoints(run_dir)
    if not candidates:
        raise ABError(f"--checkpoints {run_dir}: no checkpoints/checkpoint-N/{PEFT_FILE} and no final LoRA in it")
    base = base or run_base(run_dir)
    scorer = Scorer.parse(score)
    for prompt in settings.prompts:
        scorer.target(prompt)
    store, renderer = store or ABStore(), renderer or Renderer()
    rendered, found = [], []
    for path in candidates:
        samples = renderer.render(Side(PipelineSpec(base, [AdapterUse(str(path / PEFT_FILE))])), settings)
        points = [scorer.score(s.image, s.settings.prompt) for s in samples]
        step = run_steps(run_dir) if path == run_dir else checkpoint_step(path)
        label = _candidate_label(run_dir, path)
        found.append({"label": label, "step": step, "path": str(path), "score": sum(points) / len(points)})
        rendered.append(samples)
    best = max(found, key=lambda c: c["score"])  # max keeps the first of equals: the earliest checkpoint

    def fill(folder: Path) -> NewComparison:
        rows = [[s.image for s in samples] for samples in rendered]
        labels = [f"{c['label']} (step {c['step']}): score {c['score']:.2f}" for c in found]
        columns = [f"{p[:18]}, seed {s}" for p in settings.prompts for s in settings.seeds]
        title = f"{run_dir.name}: best {best['label']} ({scorer.text})"
        contact_sheet.save_grid(contact_sheet.make_grid(rows, labels, columns, title), folder / "grid.png")
        result = {"grid": "grid.png", "candidates": found, "best": best["label"], "registered": None}
        sides = {"run_dir": str(run_dir), "base": base, "labels": [c["label"] for c in found]}
        return NewComparison("checkpoints", sides, asdict(settings), False, score, result)

    return store.add(fill)


def run_base(run_dir: Path) -> str:
    from sdtune.adapters.manifest import ManifestError, read_manifest

    try:
        return read_manifest(run_dir).base.name_or_path
    except ManifestError:
        raise ABError(f"--checkpoints {run_dir}: no readable adapter.json to name the base; give --base") from None


def run_steps(run_dir: Path) -> int | None:
    from sdtune.adapters.manifest import ManifestError, read_manifest

    try:
        return read_manifest(run_dir).training.get("steps")
    except ManifestError:
        return None


def register_best(comparison: dict, name: str, registry=None):
    """Registers the best checkpoint of a `compare_checkpoints` result under `name`, with the run's manifest and
    its provenance: which checkpoint of which run, picked by which comparison and score. Returns the entry."""
    from sdtune.adapters.manifest import ManifestError, read_manifest
    from sdtune.adapters.registry import Registry, copy_into

    registry = registry or Registry()
    run_dir = Path(comparison["run_dir"])
    best = next(c for c in comparison["candidates"] if c["label"] == comparison["best"])
    try:
        manifest = read_manifest(run_dir)
    except ManifestError as exc:
        raise ABError(f"--register: the run has no readable adapter.json to register from ({exc})") from None
    source = Path(best["path"])
    files = {fmt: file for fmt, file in manifest.files.items() if (source / file).is_file()}
    grid = Path(comparison["folder"]) / comparison["grid"]

    def fill(staging: Path):
        for file in files.values():
            copy_into(source / file, staging / file)
        copy_into(grid, staging / "ab_checkpoints.png")
        manifest.files, manifest.samples = files, {"ab_checkpoints": "ab_checkpoints.png"}
        if source != run_dir:  # the final run's check and loss do not describe an earlier checkpoint
            manifest.export_check = None
            manifest.training = {**manifest.training, "steps": best["step"], "final_loss": None,
                                 "run_steps": manifest.training.get("steps")}  # fmt: skip
        picked = {"comparison": comparison["id"], "score": comparison["score"], "candidates": comparison["candidates"]}
        manifest.scores = {**(manifest.scores or {}), "ab_checkpoints": picked}
        manifest.origin = {"kind": "trained", "run_dir": str(run_dir), "checkpoint": best["label"],
                           "step": best["step"], "selected_by": comparison["id"]}  # fmt: skip
        return manifest

    entry = registry.add(name, fill)
    store = ABStore(registry.home)
    store.update_result(comparison["id"], registered=entry.name)
    return entry
