"""How a replica agrees its share of the cap with the others, and splits it between classes of work."""

from __future__ import annotations

import pytest

from services.common.shipping import PEER_TTL_S, Heartbeat
from services.shipper.pacing import FORGET_AFTER_S, JOIN_DELAY_S, SELF_TTL_S, WARM_UP_S, CapShare, split


def beat(replica: str, busy: bool) -> Heartbeat:
    return Heartbeat(replica=replica, state="running", busy=busy, cap_bytes_per_s=5e6, share_bytes_per_s=0,
                     egress_bytes_per_s=0, fresh_egress_bytes_per_s=0, sent_bytes_total=0,
                     shipped_objects_total=0, in_flight=0, concurrency=1, link_limited=False)


def warm(replica: str = "a", at: float = 0.0) -> CapShare:
    """A replica that has listened for a round and had a heartbeat confirmed at ``at``."""
    share = CapShare(replica)
    share.listening(at - WARM_UP_S)
    share.confirmed(at, busy=False)
    return share


def test_alone_a_replica_sends_its_whole_cap_at_once() -> None:
    share = warm()
    share.announce(0.0, holding=True, waiting=0)
    assert share.split(5e6, 0.0) == 5e6
    assert share.may_send.is_set()


def test_with_a_busy_peer_a_replica_sends_only_once_its_confirmed_announcement_can_have_been_heard() -> None:
    share = warm()
    share.hear(beat("b", busy=True), 0.0)
    share.announce(0.1, holding=True, waiting=0)
    share.split(5e6, 0.1)
    assert not share.may_send.is_set()
    share.split(5e6, 0.1 + JOIN_DELAY_S)
    assert not share.may_send.is_set(), "its busy heartbeat has not been confirmed yet"
    share.confirmed(0.5, busy=True)
    share.split(5e6, 0.5)
    assert not share.may_send.is_set()
    assert share.opens_in(0.5) == pytest.approx(JOIN_DELAY_S)
    assert share.split(5e6, 0.5 + JOIN_DELAY_S) == 2.5e6
    assert share.may_send.is_set()


def test_joining_beside_idle_peers_starts_at_once_at_a_part_they_could_all_take() -> None:
    share = warm()
    share.hear(beat("b", busy=False), 0.0)
    share.hear(beat("c", busy=False), 0.0)
    share.announce(0.1, holding=True, waiting=0)
    assert share.split(6e6, 0.1) == 2e6, "b and c might be joining at this very instant"
    assert share.may_send.is_set()
    share.confirmed(0.2, busy=True)
    assert share.split(6e6, 0.2 + JOIN_DELAY_S) == 6e6  # joined, and still nobody else busy


def test_a_replica_that_just_started_listening_first_hears_a_round_of_heartbeats() -> None:
    share = CapShare("a")
    share.listening(100.0)
    share.confirmed(100.1, busy=False)
    share.announce(100.2, holding=True, waiting=3)
    share.split(5e6, 100.2)
    assert not share.may_send.is_set(), "a busy peer may not have been heard yet"
    assert share.opens_in(100.2) == pytest.approx(WARM_UP_S - 0.2)
    assert share.hear(beat("b", busy=True), 100.0 + 1.0)  # its periodic heartbeat arrives
    share.confirmed(100.0 + 1.1, busy=True)
    assert share.split(5e6, 100.0 + WARM_UP_S) == 2.5e6
    assert share.may_send.is_set()


def test_not_listening_at_all_never_sends() -> None:
    share = CapShare("a")
    for t in (0.0, 10.0, 100.0):
        share.confirmed(t, busy=True)
        share.announce(t, holding=True, waiting=1)
        share.split(5e6, t)
    assert not share.may_send.is_set()


def test_a_replica_whose_heartbeats_are_not_confirmed_is_cut_off_before_the_others_forget_it() -> None:
    share = warm()
    share.announce(0.0, holding=True, waiting=1)
    share.split(5e6, 0.0)
    assert share.may_send.is_set() and not share.cut_off
    share.split(5e6, SELF_TTL_S + 0.1)  # no confirmation since 0.0
    assert share.cut_off and not share.may_send.is_set()
    assert SELF_TTL_S < PEER_TTL_S
    share.confirmed(SELF_TTL_S + 0.2, busy=True)
    share.split(5e6, SELF_TTL_S + 0.2)
    assert share.may_send.is_set() and not share.cut_off


def test_under_a_resource_alarm_every_replica_keeps_the_shares_agreed_before_it() -> None:
    share = warm()
    share.hear(beat("b", busy=True), 0.0)
    share.announce(0.0, holding=True, waiting=1)
    share.confirmed(0.0, busy=True)
    assert share.split(6e6, JOIN_DELAY_S) == 3e6
    share.set_blocked(True, 0.5)  # nobody's heartbeat gets through from now on
    assert share.split(6e6, 60.0) == 3e6, "b still counts: it is silent for the same reason"
    assert share.may_send.is_set() and not share.cut_off
    share.set_blocked(False, 90.0)
    assert share.split(6e6, 90.0 + PEER_TTL_S - 1) == 3e6  # a round to be heard again
    assert share.split(6e6, 90.0 + PEER_TTL_S + 1) == 6e6  # b never spoke again: gone
    assert share.cut_off  # and neither did this one's heartbeats get confirmed


def test_a_replica_that_turns_busy_during_an_alarm_beside_busy_peers_waits_for_it_to_end() -> None:
    share = warm()
    share.hear(beat("b", busy=True), 0.0)
    share.set_blocked(True, 0.5)
    share.announce(1.0, holding=True, waiting=1)
    share.split(6e6, 1.0)
    assert not share.may_send.is_set(), "b sends at the whole cap and cannot hear this one"


def test_peers_gone_for_long_are_forgotten() -> None:
    share = warm()
    share.hear(beat("b", busy=False), 0.0)
    share.forget_gone(FORGET_AFTER_S - 1)
    assert share.known_peers == 1
    share.forget_gone(FORGET_AFTER_S + 1)
    assert share.known_peers == 0


def test_the_cap_is_split_among_busy_replicas_heard_lately() -> None:
    share = warm()
    share.hear(beat("b", busy=True), 0.0)
    share.hear(beat("c", busy=False), 0.0)
    assert share.split(6e6, 1.0) == 3e6
    assert share.split(6e6, 10.0) == 6e6  # b not heard for a while: gone


def test_the_bands_ceiling_is_split_as_the_cap_is_so_the_parts_never_exceed_it() -> None:
    share = warm()
    share.hear(beat("b", busy=True), 0.0)
    share.hear(beat("c", busy=False), 0.0)
    share.split(6e6, 1.0)
    assert share.part(18e6) == 9e6
    assert share.part(0.0) == 0.0
    share.split(6e6, 10.0)  # b gone: this replica's alone
    assert share.part(18e6) == 18e6
    joining = warm()
    joining.hear(beat("b", busy=False), 0.0)
    joining.announce(0.1, holding=True, waiting=0)
    joining.split(6e6, 0.1)  # b might be joining at this very instant
    assert joining.part(18e6) == 9e6


def test_classes_split_the_share_only_while_both_have_work() -> None:
    both = split(4e6, 0.25, fresh_busy=True, backlog_busy=True)
    # The backlog's limiter runs at the whole share and is charged with fresh photos' bytes too.
    assert (both.fresh, both.backlog) == (1e6, 4e6)
    assert split(4e6, 1.0, fresh_busy=True, backlog_busy=True).backlog is None
    alone = split(4e6, 0.25, fresh_busy=True, backlog_busy=False)
    assert (alone.fresh, alone.backlog) == (4e6, 4e6)
    oldest_first = split(4e6, 0.0, fresh_busy=True, backlog_busy=True)
    assert (oldest_first.fresh, oldest_first.backlog) == (None, 4e6)
    assert split(0, 0.5, fresh_busy=True, backlog_busy=True) == split(0, 0.5, fresh_busy=False, backlog_busy=False)
