"""The verdict rule on hand-made evidence."""

from imgdedup.policy import Candidate, Evidence, decide


def cand(image_id, seq, *evidence, canonical=None):
    return Candidate(image_id, seq, canonical, list(evidence))


def test_no_candidates_is_unique():
    d = decide(5, [])
    assert (d.verdict, d.duplicate_of, d.matches) == ("unique", None, [])


def test_only_earlier_committed_candidates_count():
    later = cand("b", 9, Evidence("b", "phash", distance=1))
    uncommitted = cand("c", None, Evidence("c", "sha256"))
    assert decide(5, [later, uncommitted]).verdict == "unique"
    assert decide(10, [later]).verdict == "near_duplicate"


def test_exact_beats_near_and_points_to_canonical():
    near = cand("a", 1, Evidence("a", "phash", distance=0))
    exact = cand("b", 2, Evidence("b", "sha256"), canonical="z")
    d = decide(7, [near, exact])
    assert (d.verdict, d.duplicate_of) == ("exact_duplicate", "z")
    assert [m["signal"] for m in d.matches] == ["sha256", "phash"]
    assert d.matches[0]["canonical"] == "z" and d.matches[1]["canonical"] == "a"


def test_best_near_match_is_the_closest_then_earliest():
    far = cand("far", 1, Evidence("far", "phash", distance=6))
    close_late = cand("close-late", 3, Evidence("close-late", "phash", distance=2))
    close_early = cand("close-early", 2, Evidence("close-early", "phash", distance=2))
    d = decide(9, [far, close_late, close_early])
    assert d.duplicate_of == "close-early"
    assert [m["image_id"] for m in d.matches] == ["close-early", "close-late", "far"]


def test_two_signals_beat_one():
    one = cand("one", 1, Evidence("one", "phash", distance=0))
    two = cand("two", 2, Evidence("two", "phash", distance=3), Evidence("two", "sscd", similarity=0.9))
    assert decide(5, [one, two]).duplicate_of == "two"


def test_clip_is_evidence_not_a_verdict_unless_enabled():
    semantic = cand("cat", 1, Evidence("cat", "clip", similarity=0.97))
    d = decide(2, [semantic])
    assert d.verdict == "unique" and d.matches[0]["signal"] == "clip"
    assert decide(2, [semantic], clip_is_duplicate_signal=True).verdict == "near_duplicate"


def test_matches_are_capped():
    many = [cand(f"i{k}", k, Evidence(f"i{k}", "phash", distance=k % 5)) for k in range(1, 30)]
    assert len(decide(100, many, max_matches=7).matches) == 7


def test_capped_matches_are_the_strongest_deciding_evidence_then_the_informative():
    two = cand("two", 1, Evidence("two", "phash", distance=3), Evidence("two", "sscd", similarity=0.9))
    near = cand("near", 2, Evidence("near", "phash", distance=1))
    semantic = cand("cat", 3, Evidence("cat", "clip", similarity=0.97))

    def listed(cap):
        return [(m["image_id"], m["signal"]) for m in decide(9, [semantic, near, two], max_matches=cap).matches]

    assert listed(10) == [("two", "phash"), ("two", "sscd"), ("near", "phash"), ("cat", "clip")]
    assert listed(3) == listed(10)[:3]
    assert listed(1) == [("two", "phash")]  # the cap can cut a candidate's own evidence
