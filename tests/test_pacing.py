"""How a replica agrees its share of the cap with the others, and splits it between classes of work."""

from __future__ import annotations

import pytest

from services.common.shipping import Heartbeat
from services.shipper.pacing import JOIN_DELAY_S, WARM_UP_S, CapShare, split


def beat(replica: str, busy: bool) -> Heartbeat:
    return Heartbeat(replica=replica, state="running", busy=busy, cap_bytes_per_s=5e6, share_bytes_per_s=0,
                     egress_bytes_per_s=0, fresh_egress_bytes_per_s=0, sent_bytes_total=0,
                     shipped_objects_total=0, in_flight=0, concurrency=1, link_limited=False)


def test_a_replica_sends_only_after_the_others_can_have_heard_it() -> None:
    share = CapShare("a")
    share.listening(0.0)
    share.announce(10.0, holding=True, waiting=0)
    assert not share.may_send.is_set()
    share.announce(10.0 + JOIN_DELAY_S, holding=True, waiting=0)
    assert share.may_send.is_set()


def test_a_replica_that_just_started_listening_first_hears_a_round_of_heartbeats() -> None:
    share = CapShare("a")
    share.listening(100.0)
    share.announce(100.0, holding=True, waiting=3)
    share.announce(100.0 + JOIN_DELAY_S, holding=True, waiting=3)
    assert not share.may_send.is_set(), "a busy peer may not have been heard yet"
    assert share.opens_in(100.0 + JOIN_DELAY_S) == pytest.approx(WARM_UP_S - JOIN_DELAY_S)
    assert share.hear(beat("b", busy=True), 100.0 + 1.0)  # its periodic heartbeat arrives
    share.announce(100.0 + WARM_UP_S, holding=True, waiting=3)
    assert share.may_send.is_set()
    assert share.split(5e6, 100.0 + WARM_UP_S) == 2.5e6


def test_not_listening_at_all_never_sends() -> None:
    share = CapShare("a")
    for t in (0.0, 10.0, 100.0):
        share.announce(t, holding=True, waiting=1)
    assert not share.may_send.is_set()


def test_the_cap_is_split_among_busy_replicas_heard_lately() -> None:
    share = CapShare("a")
    share.hear(beat("b", busy=True), 0.0)
    share.hear(beat("c", busy=False), 0.0)
    assert share.split(6e6, 1.0) == 3e6
    assert share.split(6e6, 10.0) == 6e6  # b not heard for a while: gone


def test_classes_split_the_share_only_while_both_have_work() -> None:
    both = split(4e6, 0.25, fresh_busy=True, backlog_busy=True)
    assert (both.fresh, both.backlog) == (1e6, 3e6)
    alone = split(4e6, 0.25, fresh_busy=True, backlog_busy=False)
    assert (alone.fresh, alone.backlog) == (4e6, 4e6)
    oldest_first = split(4e6, 0.0, fresh_busy=True, backlog_busy=True)
    assert (oldest_first.fresh, oldest_first.backlog) == (None, 4e6)
    assert split(0, 0.5, fresh_busy=True, backlog_busy=True) == split(0, 0.5, fresh_busy=False, backlog_busy=False)
