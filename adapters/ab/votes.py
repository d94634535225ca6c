"""Stored votes as a training set: each voted pair of a comparison is one (prompt, winner image, loser image) triple.

A pair is a (prompt, seed) both sides rendered; the vote says which side's image won. Ties say neither did and
unvoted pairs (skipped) say nothing, so both are left out, and counted. Several comparisons pool into one set.
What the set is trained against (the reference, `--from SPEC`) must sit on the base the votes were rendered on.

Torch-free: the studio's A/B page counts what a comparison would give before it queues a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sdtune.adapters.ab.spec import ABError, parse_spec
from sdtune.adapters.ab.store import ABStore
from sdtune.adapters.atomic import copy_atomic, write_text_atomic

MIN_PAIRS = 8  # fewer decisive votes than this teach nothing a LoRA could not learn from noise (recipe: min_pairs)


@dataclass(frozen=True)
class Triple:
    """One decisive vote: the prompt and seed, the winning and losing images, where they come from."""

    comparison: str
    pair: int
    prompt: str
    seed: int
    winner: str  # the image file of the side the vote chose
    loser: str
    winner_side: str  # a or b: which spec of the comparison won


@dataclass
class VoteSet:
    """The triples of one or more comparisons and the counts of what was left out, per comparison."""

    triples: list[Triple] = field(default_factory=list)
    counts: dict[str, dict] = field(default_factory=dict)  # id -> {pairs, decisive, a, b, ties, skipped}
    settings: dict[str, dict] = field(default_factory=dict)  # id -> the rendering settings (steps, guidance...)
    sides: dict[str, dict] = field(default_factory=dict)  # id -> {"a": spec, "b": spec}

    def summary(self) -> dict:
        """Pooled counts, and the winner share: of the pairs used, the share won by each comparison's side A."""
        total = {
            k: sum(c[k] for c in self.counts.values()) for k in ("pairs", "decisive", "a", "b", "ties", "skipped")
        }
        share = total["a"] / total["decisive"] if total["decisive"] else None
        return {**total, "winner_share_a": share, "comparisons": self.counts}


def comparison_votes(store: ABStore, cid: str) -> tuple[dict, list[Triple], dict]:
    """(the comparison, its triples, its counts). Raises ABError when a voted pair's images are gone."""
    comparison = store.get(cid, unseal=True)  # the sides of every voted pair, also while the rest is unvoted
    if comparison["kind"] != "ab":
        raise ABError(f"{cid}: a checkpoint comparison has no votes between two sides; give an A/B comparison id")
    triples, counts = [], {"pairs": len(comparison["pairs"]), "decisive": 0, "a": 0, "b": 0, "ties": 0, "skipped": 0}
    for pair in comparison["pairs"]:
        vote = pair["vote"]
        if vote is None or vote == "tie":
            counts["skipped" if vote is None else "ties"] += 1
            continue
        # a vote is cast as shown (left/right) in blind mode, as a side (a/b) otherwise
        side = {"left": pair["left_is"], "right": pair["right_is"]}.get(vote, vote)
        image = {pair["left_is"]: pair["left"], pair["right_is"]: pair["right"]}
        winner, loser = image[side], image["b" if side == "a" else "a"]
        missing = [p for p in (winner, loser) if not Path(p).is_file()]
        if missing:
            raise ABError(
                f"comparison {cid}: the images of voted pair {pair['pair']} are gone ({missing[0]}); its votes "
                "cannot train: leave the comparison out, or render it again (sdtune ab) and vote"
            )
        triples.append(Triple(cid, pair["pair"], pair["prompt"], pair["seed"], winner, loser, side))
        counts["decisive"] += 1
        counts[side] += 1
    return comparison, triples, counts


def collect_votes(ids: list[str], store: ABStore | None = None, min_pairs: int = MIN_PAIRS) -> VoteSet:
    """The pooled triples of the comparisons `ids`. Raises ABError (one line) for an unknown id, a voted pair whose
    images are gone, or fewer than `min_pairs` decisive votes (the message says how many more are needed)."""
    if not ids:
        raise ABError("give at least one A/B comparison id (see `sdtune ab list`)")
    store = store or ABStore()
    votes = VoteSet()
    for cid in dict.fromkeys(ids):  # an id given twice counts once
        comparison, triples, counts = comparison_votes(store, cid)
        votes.triples += triples
        votes.counts[cid], votes.settings[cid] = counts, comparison["settings"]
        votes.sides[cid] = comparison["sides"]
    decisive = len(votes.triples)
    if decisive < min_pairs:
        left_out = sum(c["ties"] + c["skipped"] for c in votes.counts.values())
        raise ABError(
            f"{', '.join(votes.counts)}: {decisive} decisive vote(s) ({left_out} ties or unvoted pairs left out); "
            f"preference tuning needs at least {min_pairs}: vote {min_pairs - decisive} more pair(s), or pool more "
            "comparisons"
        )
    return votes


def spec_base(spec: str, flag: str = "--from") -> str:
    """The base a SPEC (`BASE+ADAPTER:W...`) renders on."""
    return parse_spec(spec, flag).pipeline.base


def check_same_base(votes: VoteSet, reference: str, registry=None) -> None:
    """The reference must sit on the base the votes' images were rendered on, and so must every registered adapter
    it names: a LoRA learns its change relative to one base, and images of another base's model are no preference
    about this one."""
    from sdtune.adapters.registry import Registry

    base = spec_base(reference)
    registry = registry or Registry()
    for use in parse_spec(reference, "--from").pipeline.adapters:
        if use.ref in registry and registry.manifest(use.ref).base.name_or_path != base:
            trained_on = registry.manifest(use.ref).base.name_or_path
            raise ABError(
                f"--from {reference}: adapter {use.ref!r} was trained on {trained_on!r}, not on the base {base!r}; "
                f"write {trained_on}+{use.ref}... or pick an adapter of {base!r}"
            )
    for cid, sides in votes.sides.items():
        rendered = {spec_base(sides[s], f"comparison {cid}") for s in ("a", "b")}
        if base not in rendered:
            raise ABError(
                f"--from {reference}: its base {base!r} is not the base comparison {cid} was rendered on "
                f"({' / '.join(sorted(rendered))}); tune over a spec on {sorted(rendered)[0]}, e.g. the comparison's "
                f"side A: {sides['a']}"
            )


def write_pairs(votes: VoteSet, folder: str | Path) -> tuple[Path, Path]:
    """The triples as two image folders, `winners/` and `losers/`, the same file name for both images of a triple
    (`0000.png`, ...) and the prompt as its caption, so both folders scan into the same order and buckets."""
    folder = Path(folder)
    winners, losers = folder / "winners", folder / "losers"
    for number, triple in enumerate(votes.triples):
        for target, source in ((winners, triple.winner), (losers, triple.loser)):
            target.mkdir(parents=True, exist_ok=True)
            copy_atomic(Path(source), target / f"{number:04d}.png")
            write_text_atomic(target / f"{number:04d}.txt", triple.prompt)
    return winners, losers
