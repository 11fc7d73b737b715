"""The work queue: a key at most once in the queue, one worker per key at a time, the earliest timer wins."""

from __future__ import annotations

import asyncio

from flownexus.runtime.workqueue import WorkQueue


def test_a_key_added_twice_is_queued_once() -> None:
    async def scenario() -> list[object]:
        q = WorkQueue("t")
        q.add("a")
        q.add("a")
        q.add("b")
        return [await q.get(), await q.get(), len(q)]

    assert asyncio.run(scenario()) == ["a", "b", 0]


def test_a_key_being_processed_is_not_handed_out_again_until_done_then_runs_once_more() -> None:
    async def scenario() -> tuple[bool, object]:
        q = WorkQueue("t")
        q.add("a")
        key = await q.get()
        q.add("a")  # changed while a worker holds it
        q.add("a")
        second = asyncio.ensure_future(q.get())
        await asyncio.sleep(0.05)
        handed_out_early = second.done()
        q.done(key)
        return handed_out_early, await asyncio.wait_for(second, 1)

    assert asyncio.run(scenario()) == (False, "a")


def test_the_earliest_timer_of_a_key_wins_and_an_add_cancels_it() -> None:
    async def scenario() -> tuple[object, int, int]:
        q = WorkQueue("t")
        q.add_after("a", 10)
        q.add_after("a", 0.05)  # earlier: replaces
        q.add_after("a", 5)  # later: ignored
        first = await asyncio.wait_for(q.get(), 1)
        q.done(first)
        q.add_after("b", 10)
        q.add("b")  # now: the timer goes
        return first, q.pending_timers(), len(q)

    assert asyncio.run(scenario()) == ("a", 0, 1)
