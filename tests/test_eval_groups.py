"""Duplicate groups: the anti-chaining guard on a hand-made chain a-b-c, and contact sheets."""

from __future__ import annotations

import json

from PIL import Image

from imgdedup.evaluation import groups as g


def _v(image_id, verdict="unique", duplicate_of=None, matches=()):
    return {"image_id": image_id, "verdict": verdict, "duplicate_of": duplicate_of,
            "matches": [{"image_id": i, "signal": "phash", "distance": d} for i, d in matches]}


def chain():
    # b is a crop of a; c is a crop of b that no longer looks like a (matches only b)
    return [_v("a"), _v("b", "near_duplicate", "a", [("a", 4)]), _v("c", "near_duplicate", "b", [("b", 5)])]


def test_chain_is_cut_where_plain_connected_components_would_merge():
    out = g.build_groups(chain(), min_share=0.6)
    assert [grp.members for grp in out.duplicate_groups()] == [["a", "b"]]
    assert {grp.canonical: grp.members for grp in out.groups}["c"] == ["c"]
    assert out.refused == [{"image_id": "c", "group": "a", "support": 1, "share": 0.5}]


def test_duplicate_of_naming_the_original_does_not_bypass_the_guard():
    # the worker names the canonical original of what c matched (a), but c only matched b
    verdicts = chain()[:2] + [_v("c", "near_duplicate", "a", [("b", 5)])]
    assert g.build_groups(verdicts, min_share=0.6).duplicate_groups()[0].members == ["a", "b"]
    # without a match list, duplicate_of is the only evidence and counts as a match
    verdicts = chain()[:2] + [_v("c", "exact_duplicate", "a")]
    assert g.build_groups(verdicts).duplicate_groups()[0].members == ["a", "b", "c"]


def test_share_is_of_the_matches_a_verdict_can_list():
    # a group of 5; e matches 2 members that are not the original: 2/5 < 0.6, but verdicts list
    # at most 3 matches here, so the share is 2/3
    verdicts = [_v("a")] + [_v(x, "near_duplicate", "a", [("a", 1)]) for x in "bcd"]
    verdicts += [_v("f", "near_duplicate", "a", [("a", 1)]), _v("e", "near_duplicate", "a", [("b", 3), ("c", 4)])]
    assert "e" not in g.build_groups(verdicts, 0.6, max_matches=10).duplicate_groups()[0].members
    assert "e" in g.build_groups(verdicts, 0.6, max_matches=3).duplicate_groups()[0].members


def test_share_and_canonical_match_let_images_join():
    # with a lower share c's single link to half of {a, b} is enough
    assert g.build_groups(chain(), min_share=0.5).duplicate_groups()[0].members == ["a", "b", "c"]
    # d matches the canonical original directly: it joins whatever the share
    verdicts = chain() + [_v("d", "near_duplicate", "a", [("a", 7)])]
    assert g.build_groups(verdicts, min_share=1.0).duplicate_groups()[0].members == ["a", "b", "d"]


def test_unknown_originals_deletes_replays_and_dead_letters():
    verdicts = [
        _v("x", "exact_duplicate", "old", [("old", 0)]),  # "old" was decided before this file began
        {"event_id": "e9", "error": {"code": "decode_failed", "message": "bad"}},
        _v("y", "near_duplicate", "x", [("x", 2), ("old", 3)]),
        _v("x", "unique"),  # a replay of x: the first verdict stands
        {"image_id": "y", "verdict": "deleted"},
    ]
    out = g.build_groups(verdicts)
    assert [(grp.canonical, grp.members) for grp in out.duplicate_groups()] == [("old", ["old", "x"])]
    assert out.to_json()["sizes"] == {"2": 1}


def test_read_jsonl_skips_blank_lines_and_names_bad_ones():
    assert list(g.read_jsonl(['{"a": 1}', "", '{"b": 2}\n'])) == [{"a": 1}, {"b": 2}]
    try:
        list(g.read_jsonl(['{"a": 1}', "{oops"]))
    except ValueError as exc:
        assert "line 2" in str(exc)
    else:
        raise AssertionError("a bad line must raise")


def test_contact_sheet_shows_every_member(tmp_path):
    for name, colour in [("a", "red"), ("b", "blue")]:
        Image.new("RGB", (300, 200), colour).save(tmp_path / f"{name}.jpg")
    group = g.build_groups(chain()).duplicate_groups()[0]
    paths = g.resolve_images(["a", "b", "zz"], images_dir=tmp_path)
    assert set(paths) == {"a", "b"}
    sheet = Image.open(g.contact_sheet(group, paths, tmp_path / "sheet.png", thumb=100))
    assert sheet.size == (2 * 108 + 8, 100 + 30 + 16)
    # the first tile is red, the second blue (thumbnails are 100x67, centred vertically)
    assert sheet.getpixel((8 + 50, 8 + 50))[0] > 200 and sheet.getpixel((116 + 50, 8 + 50))[2] > 200
    assert json.loads(json.dumps(g.build_groups(chain()).to_json()))["groups"][0]["size"] == 2
