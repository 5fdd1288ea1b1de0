"""The in-process idempotency store on fake time: lock, replay, conflict, expiry and its byte bound."""

from __future__ import annotations

from proxy.clock import FakeClock
from proxy.store.records import LocalRecords, StoredResponse

FP_A, FP_B = "a" * 64, "b" * 64
OK = StoredResponse(201, [("x-charge", "c1")], b"charged")


async def test_first_begin_locks_then_the_owner_stores_and_later_begins_replay() -> None:
    records = LocalRecords(FakeClock())
    assert (await records.begin("k", FP_A, "t1", 5.0, 1.0)).state == "acquired"
    in_progress = await records.begin("k", FP_A, "t2", 5.0, 1.0)
    assert in_progress.state == "in_progress" and in_progress.lock_left_s == 5.0
    assert await records.complete("k", FP_A, "t1", OK, 60.0, 1.0)
    replay = await records.begin("k", FP_A, "t3", 5.0, 1.0)
    assert replay.state == "replay" and replay.response == OK


async def test_another_fingerprint_is_a_conflict_whether_locked_or_stored() -> None:
    records = LocalRecords(FakeClock())
    await records.begin("k", FP_A, "t1", 5.0, 1.0)
    assert (await records.begin("k", FP_B, "t2", 5.0, 1.0)).state == "conflict"
    await records.complete("k", FP_A, "t1", OK, 60.0, 1.0)
    assert (await records.begin("k", FP_B, "t2", 5.0, 1.0)).state == "conflict"


async def test_an_expired_lock_frees_the_key_and_its_old_owner_cannot_fill_it() -> None:
    clock = FakeClock()
    records = LocalRecords(clock)
    await records.begin("k", FP_A, "crashed", 5.0, 1.0)
    clock.advance(5.01)
    assert (await records.begin("k", FP_A, "t2", 5.0, 1.0)).state == "acquired"
    assert not await records.complete("k", FP_A, "crashed", OK, 60.0, 1.0)
    assert await records.complete("k", FP_A, "t2", OK, 60.0, 1.0)


async def test_stored_responses_expire_after_ttl() -> None:
    clock = FakeClock()
    records = LocalRecords(clock)
    await records.begin("k", FP_A, "t", 5.0, 1.0)
    await records.complete("k", FP_A, "t", OK, 60.0, 1.0)
    clock.advance(60.01)
    assert (await records.begin("k", FP_A, "t2", 5.0, 1.0)).state == "acquired"


async def test_release_drops_only_the_owners_lock() -> None:
    records = LocalRecords(FakeClock())
    await records.begin("k", FP_A, "t1", 5.0, 1.0)
    await records.release("k", FP_A, "someone-else", 1.0)
    assert (await records.begin("k", FP_A, "t2", 5.0, 1.0)).state == "in_progress"
    await records.release("k", FP_A, "t1", 1.0)
    assert (await records.begin("k", FP_A, "t2", 5.0, 1.0)).state == "acquired"


async def test_oldest_responses_are_dropped_past_max_bytes() -> None:
    records = LocalRecords(FakeClock(), max_bytes=3 * OK.size())
    for i in range(5):
        await records.begin(f"k{i}", FP_A, "t", 5.0, 1.0)
        await records.complete(f"k{i}", FP_A, "t", OK, 60.0, 1.0)
    assert len(records) == 3
    assert (await records.begin("k0", FP_A, "t", 5.0, 1.0)).state == "acquired"
    assert (await records.begin("k4", FP_A, "t", 5.0, 1.0)).state == "replay"
