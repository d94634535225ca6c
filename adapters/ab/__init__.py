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

Modules: `spec.py` (a side's SPEC, the shared `Settings`, the toy `Scorer`), `store.py` (the SQLite store, votes and
tallies; torch-free like `spec.py`, so a studio page can drive it one vote at a time) and `render.py` (`Renderer`,
through `compose.build` and `sampling.generate`, the code path of `sdtune sample`; `compare`, `compare_checkpoints`,
`register_best`). Import every name from here: `from sdtune.adapters import ab; ab.compare(...)`.
"""

from sdtune.adapters.ab.render import Renderer, compare, compare_checkpoints, register_best, run_base, run_steps
from sdtune.adapters.ab.spec import CONTROL_PART, ABError, ControlUse, Scorer, Settings, Side, parse_spec, short_spec
from sdtune.adapters.ab.store import CHOICES, Z_95, ABStore, NewComparison, PairRow, tally_votes, wilson_interval

__all__ = [
    "CHOICES",
    "CONTROL_PART",
    "Z_95",
    "ABError",
    "ABStore",
    "ControlUse",
    "NewComparison",
    "PairRow",
    "Renderer",
    "Scorer",
    "Settings",
    "Side",
    "compare",
    "compare_checkpoints",
    "parse_spec",
    "register_best",
    "run_base",
    "run_steps",
    "short_spec",
    "tally_votes",
    "wilson_interval",
]
