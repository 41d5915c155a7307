"""The leased placement's pure rules (broker.cluster.rules): no sockets, no sleeps."""

from __future__ import annotations

from broker.cluster import rules
from broker.cluster.rules import Liveness, LiveReports, RoundSchedule, survey

TTL = 10.0


def test_every_lease_is_fresh_only_while_the_heartbeat_is() -> None:
    live = Liveness(TTL)
    assert not live.fresh(0.0)  # never confirmed: no lease may be used
    live.renewed(100.0)
    assert live.fresh(100.0 + TTL * rules.FENCE_AFTER - 0.01)
    assert not live.fresh(100.0 + TTL * rules.FENCE_AFTER)


def test_a_stale_heartbeat_fences_once_well_before_anyone_may_take_over() -> None:
    live = Liveness(TTL)
    live.renewed(0.0)
    assert not live.must_fence(TTL * rules.FENCE_AFTER - 0.01)
    assert live.must_fence(TTL * rules.FENCE_AFTER)
    assert not live.must_fence(TTL * rules.FENCE_AFTER + 1)  # once; nothing left to fence
    assert not live.fresh(TTL * rules.FENCE_AFTER + 1)
    assert rules.FENCE_AFTER < 1  # a takeover needs the claim gone: a full TTL


def test_a_late_reply_to_an_older_heartbeat_never_moves_freshness_back() -> None:
    live = Liveness(TTL)
    live.renewed(10.0)
    live.renewed(8.0)
    assert live.fresh(10.0 + TTL * rules.FENCE_AFTER - 0.01)


def test_a_lost_claim_makes_nothing_fresh_until_joined_again() -> None:
    live = Liveness(TTL)
    live.renewed(0.0)
    live.lost()
    assert not live.fresh(0.1)
    assert not live.must_fence(0.1)  # the coordinator already gave everything up


def test_survey_takes_over_only_leases_whose_owner_claim_is_gone() -> None:
    found = survey(
        {"free": None, "dead": b"b2:7", "held": b"b1:8", "mine": "b0:9"},
        me="b0", claimed={"b1"}, live={"b0", "b1"})
    assert found.free == ["free"]
    assert found.orphaned == {"dead": "b2:7", "mine": "b0:9"}  # a past life of b0's id
    assert not found.settled


def test_survey_is_settled_only_when_every_holder_is_claimed_and_a_member() -> None:
    assert survey({"a": b"b1:1"}, me="b0", claimed={"b1"}, live={"b0", "b1"}).settled
    joining = survey({"a": b"b1:1"}, me="b0", claimed={"b1"}, live={"b0"})
    assert joining.orphaned == {} and joining.free == [] and not joining.settled


def test_holder_of_reads_instance_ids_containing_colons() -> None:
    assert rules.holder_of(b"host:1:42") == "host:1"
    assert rules.holder_of(None) is None


def test_claim_order_mixes_free_and_orphaned_in_rendezvous_order() -> None:
    found = survey({f"s{i}": (None if i % 2 else f"b9:{i}") for i in range(20)},
                   me="b0", claimed=set(), live={"b0"})
    order = rules.claim_order("b0", found)
    assert sorted(order) == sorted(f"s{i}" for i in range(20))
    assert order == sorted(order, key=lambda s: rules.rank("b0", s))
    assert rules.claim_order("b1", found) != order  # instances start in different places


def test_fair_share_and_shedding() -> None:
    assert rules.fair_share(1000, 3) == 334
    assert rules.fair_share(5, 0) == 5
    owned = ["a", "b", "c"]
    assert rules.shed_victim("b0", owned) == max(owned, key=lambda s: rules.rank("b0", s))


def test_an_idle_round_reads_nothing_until_something_changes() -> None:
    plan = RoundSchedule(rescan_every_s=30, reload_every_s=300)
    assert plan.reload_due("1", 0.0) and plan.scan_due(0.0)  # the first round reads all
    plan.members(["b0", "b1"])
    plan.loaded("1", 0.0)
    plan.scanned(0.0, settled=True)
    assert not plan.reload_due("1", 10.0) and not plan.scan_due(10.0)
    plan.members(["b1", "b0"])  # same members, other order
    assert not plan.scan_due(10.0)


def test_a_dead_member_or_a_new_session_makes_the_next_round_look() -> None:
    plan = RoundSchedule(rescan_every_s=30, reload_every_s=300)
    plan.members(["b0", "b1"])
    plan.loaded("1", 0.0)
    plan.scanned(0.0, settled=True)
    plan.members(["b0"])
    assert plan.scan_due(1.0)
    plan.scanned(1.0, settled=True)
    assert plan.reload_due("2", 2.0)
    plan.loaded("2", 2.0)
    assert plan.scan_due(2.0)


def test_an_unsettled_survey_is_repeated_and_a_lost_announcement_caught_up() -> None:
    plan = RoundSchedule(rescan_every_s=30, reload_every_s=300)
    plan.loaded(None, 0.0)
    plan.scanned(0.0, settled=False)  # e.g. a dead owner's claim not expired yet
    assert plan.scan_due(0.1)
    plan.scanned(0.1, settled=True)
    assert not plan.scan_due(30.0) and plan.scan_due(30.1)
    assert not plan.reload_due(None, 299.0) and plan.reload_due(None, 300.0)
    plan.changed()
    assert plan.scan_due(30.2)


def test_live_state_is_written_on_change_not_every_round() -> None:
    reports = LiveReports(ttl_s=3600, activity_every_s=10)
    assert reports.due("s", "OPEN", 0.0, 0.0)
    reports.reported("s", "OPEN", 0.0, 0.0)
    assert not reports.due("s", "OPEN", 0.0, 100.0)
    assert reports.due("s", "RECONNECTING", 0.0, 1.0)
    assert not reports.due("s", "OPEN", 5.0, 9.0)  # activity alone: at most every 10 s
    assert reports.due("s", "OPEN", 5.0, 10.0)
    assert reports.due("s", "OPEN", 0.0, 1800.0)  # refreshed at half its TTL
    reports.forget("s")
    assert reports.due("s", "OPEN", 0.0, 1.0)


def test_the_claim_loop_wakes_when_another_instance_claim_lapses() -> None:
    beats = {"b0": 100.0, "b1": 95.5, "b2": 99.0}
    assert rules.next_round_in(2.0, beats, me="b0", ttl_s=5.0, now=100.0) == 0.55
    assert rules.next_round_in(2.0, {"b0": 100.0}, me="b0", ttl_s=5.0, now=100.0) == 2.0
    gone = {"b1": 90.0}  # already lapsed (pruned at the next round): the period
    assert rules.next_round_in(2.0, gone, me="b0", ttl_s=5.0, now=100.0) == 2.0


def test_a_release_elsewhere_makes_the_next_round_look_even_if_unannounced() -> None:
    plan = RoundSchedule(rescan_every_s=300, reload_every_s=300)
    plan.releases("4")
    plan.loaded("1", 0.0)
    plan.scanned(0.0, settled=True)
    plan.releases("4")
    assert not plan.scan_due(1.0)
    plan.releases("5")
    assert plan.scan_due(1.0)


def test_full_reads_are_paced_by_their_own_cost_while_things_keep_changing() -> None:
    plan = RoundSchedule(rescan_every_s=300, reload_every_s=300, full_read_every=5)
    plan.loaded("1", 0.0, took_s=2.0)
    plan.scanned(0.0, settled=False, took_s=1.0)
    # Every round sees a new version (sessions being created): not before 5 x 2 s.
    assert not plan.reload_due("2", 9.9) and plan.reload_due("2", 10.0)
    assert not plan.scan_due(4.9) and plan.scan_due(5.0)
    plan.loaded("2", 10.0, took_s=0.0)  # cheap reads are not held back
    assert plan.reload_due("3", 10.0)


def test_an_unchanged_version_is_not_reread_however_cheap_the_read() -> None:
    plan = RoundSchedule(rescan_every_s=300, reload_every_s=300, full_read_every=5)
    plan.loaded("1", 0.0, took_s=0.0)
    plan.scanned(0.0, settled=True, took_s=0.0)
    assert not plan.reload_due("1", 100.0) and not plan.scan_due(100.0)


def test_an_announced_session_is_tried_first_by_exactly_one_live_instance() -> None:
    live = ["b0", "b1", "b2", "b3"]
    firsts = [rules.first_choice(f"s{i}", live) for i in range(400)]
    assert set(firsts) == set(live)  # spread over all of them
    assert all(max(live, key=lambda i: rules.rank(i, f"s{n}")) == f
               for n, f in enumerate(firsts))
    assert rules.first_choice("s0", []) is None
    # The order of the members does not matter: every instance agrees.
    assert rules.first_choice("s7", list(reversed(live))) == firsts[7]


def test_the_heartbeat_renews_only_while_the_event_loop_makes_progress() -> None:
    progress = rules.Progress(TTL)
    assert not progress.may_renew(0.0)  # never ticked
    progress.tick(100.0)
    assert progress.may_renew(100.0 + TTL * rules.LOOP_STALL_AFTER - 0.01)
    assert not progress.may_renew(100.0 + TTL * rules.LOOP_STALL_AFTER)
    # A wedged loop's last renewal lapses within a TTL after that: well bounded.
    assert rules.LOOP_STALL_AFTER < 1


def test_a_stream_of_announcements_holds_a_version_reload_back_until_quiet() -> None:
    plan = RoundSchedule(rescan_every_s=300, reload_every_s=300, quiet_s=2.0)
    plan.loaded("1", 0.0)
    plan.heard(5.0)  # sessions being created, each announced and read by id
    assert not plan.reload_due("9", 6.0)
    assert plan.reload_due("9", 7.0)  # quiet again: the moves are checked once
    plan.heard(299.0)
    assert plan.reload_due("9", 300.0)  # never quiet: the safety net still reads


def test_an_announced_session_is_its_first_choices_at_once_and_the_others_after_a_grace(
) -> None:
    live = ["b0", "b1", "b2", "b3"]
    sid = "s1"
    first = rules.first_choice(sid, live)
    other = next(i for i in live if i != first)
    mine, theirs = rules.Candidates(str(first), 6.0), rules.Candidates(other, 6.0)
    mine.announced(sid, live, 0.0)
    theirs.announced(sid, live, 0.0)
    assert mine.due(0.0, room=1) == [sid]
    assert theirs.due(5.9, room=1) == [] and theirs.due(6.0, room=1) == [sid]
    assert theirs.due(6.0, room=0) == []  # no room: nothing is read
    theirs.settled([sid])
    assert theirs.due(60.0, room=1) == [] and len(theirs) == 0


def test_free_candidates_are_read_best_ranked_first_and_a_few_times_the_room() -> None:
    picks = rules.Candidates("b0", 6.0)
    ids = [f"s{i}" for i in range(500)]
    picks.found_free(ids, 0.0)
    due = picks.due(0.0, room=50)
    assert len(due) == 50 * rules.CANDIDATES_AT_ONCE
    assert due == sorted(ids, key=lambda s: rules.rank("b0", s))[:len(due)]
    assert len(picks.due(0.0, room=1)) == rules.CLAIM_BATCH
    picks.keep_only(ids[:10])
    assert sorted(picks.due(0.0, room=100)) == sorted(ids[:10])
    # Found free by a survey: due at once, even if announced with a grace before.
    later = rules.Candidates("b0", 6.0)
    sid = next(s for s in ids if rules.first_choice(s, ["b0", "b1"]) == "b1")
    later.announced(sid, ["b0", "b1"], 0.0)
    assert later.due(1.0, room=1) == []
    later.found_free([sid], 1.0)
    assert later.due(1.0, room=1) == [sid]
