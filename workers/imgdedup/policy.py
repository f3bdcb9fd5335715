"""The verdict policy: from the evidence found in the indexes to unique / exact / near duplicate.

Pure functions, no I/O, so the rule that decides every verdict is readable and tested on its own.
The total order is the per-namespace sequence number given when an image is committed: an image can
only be a duplicate of an image committed *before* it, so of two near-duplicates processed at the
same moment exactly one is unique (see store.py for why the commit comes after the writes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Signals that can make a near duplicate on their own (clip only when configured).
NEAR_SIGNALS = ("phash", "sscd")


@dataclass
class Evidence:
    """One signal linking the image to an earlier one."""

    image_id: str
    signal: str  # sha256 | phash | sscd | clip
    distance: int | None = None  # Hamming distance, for phash
    similarity: float | None = None  # cosine similarity, for vectors


@dataclass
class Candidate:
    """Everything known about one other image that some index returned."""

    image_id: str
    seq: int | None  # None: not committed (still being written, or deleted meanwhile)
    canonical: str | None  # its canonical original, if it has decided already
    evidence: list[Evidence] = field(default_factory=list)


@dataclass(frozen=True)
class Decision:
    verdict: str
    duplicate_of: str | None
    matches: list[dict]


def _strength(candidate: Candidate, duplicate_signals: tuple[str, ...]) -> tuple:
    """Sort key, strongest first: exact bytes, then more agreeing signals, closer pHash, higher similarity,
    then the earliest image (lowest sequence) so ties resolve the same way on every replay."""
    signals = {e.signal for e in candidate.evidence}
    phash = min((e.distance for e in candidate.evidence if e.signal == "phash"), default=65)
    similarity = max((e.similarity for e in candidate.evidence if e.similarity is not None and
                      e.signal in duplicate_signals), default=-1.0)
    return ("sha256" not in signals, -len(signals & set(duplicate_signals)), phash, -similarity, candidate.seq)


def _match_entries(candidate: Candidate) -> list[dict]:
    order = {"sha256": 0, "phash": 1, "sscd": 2, "clip": 3}
    entries = []
    for e in sorted(candidate.evidence, key=lambda e: order.get(e.signal, 9)):
        entry: dict = {"image_id": e.image_id, "signal": e.signal}
        if e.distance is not None:
            entry["distance"] = int(e.distance)
        if e.similarity is not None:
            entry["similarity"] = round(float(e.similarity), 6)
        entry["canonical"] = candidate.canonical or candidate.image_id
        entries.append(entry)
    return entries


def decide(own_seq: int, candidates: list[Candidate], *, clip_is_duplicate_signal: bool = False,
           max_matches: int = 10) -> Decision:
    """The verdict for an image committed as `own_seq`, given every candidate the indexes returned.

    Only committed candidates with a lower sequence count. Evidence from signals that cannot make a
    duplicate (clip by default) is still listed, after the deciding matches, so a moderator sees it.
    """
    duplicate_signals = NEAR_SIGNALS + (("clip",) if clip_is_duplicate_signal else ())
    can_decide = {"sha256", *duplicate_signals}
    deciding: list[Candidate] = []
    informative: list[Candidate] = []
    for c in candidates:
        if c.seq is not None and c.seq < own_seq and c.evidence:
            (deciding if any(e.signal in can_decide for e in c.evidence) else informative).append(c)
    deciding.sort(key=lambda c: _strength(c, duplicate_signals))
    informative.sort(key=lambda c: _strength(c, duplicate_signals))
    matches: list[dict] = []
    for c in deciding + informative:  # a catalog of copies gives dozens of candidates; list only max_matches
        if len(matches) >= max_matches:
            break
        matches += _match_entries(c)
    del matches[max_matches:]
    if not deciding:
        return Decision("unique", None, matches)
    best = deciding[0]
    verdict = "exact_duplicate" if any(e.signal == "sha256" for e in best.evidence) else "near_duplicate"
    return Decision(verdict, best.canonical or best.image_id, matches)
