"""Offsets are released only when everything before them in the partition is acknowledged."""

from imgdedup.offsets import OffsetTracker


def test_out_of_order_acks_commit_only_the_contiguous_prefix():
    t = OffsetTracker()
    for off in (10, 11, 12, 13):
        t.consumed("in", 0, off)
    assert t.acknowledged("in", 0, 12) is None
    assert t.acknowledged("in", 0, 10) == 11
    assert t.acknowledged("in", 0, 11) == 13  # 10, 11, 12 done -> commit 13
    assert t.in_flight == 1
    assert t.acknowledged("in", 0, 13) == 14 and t.in_flight == 0


def test_partitions_are_independent():
    t = OffsetTracker()
    t.consumed("in", 0, 5)
    t.consumed("in", 1, 7)
    assert t.acknowledged("in", 1, 7) == 8
    assert t.commit_offset("in", 0) is None


def test_rewind_drops_later_state_and_ignores_stale_acks():
    t = OffsetTracker()
    for off in (1, 2, 3):
        t.consumed("in", 0, off)
    assert t.acknowledged("in", 0, 1) == 2
    t.consumed("in", 0, 2)  # seek back to 2 after a failure: 2 and 3 will be redone
    assert t.in_flight == 1
    assert t.acknowledged("in", 0, 3) is None  # ack of the old 3 before 2 is redone
    assert t.acknowledged("in", 0, 0) is None  # older than anything pending
    assert t.acknowledged("in", 0, 2) == 3


def test_forget_on_revoke():
    t = OffsetTracker()
    t.consumed("in", 0, 1)
    t.forget("in", 0)
    assert t.acknowledged("in", 0, 1) is None and t.in_flight == 0
