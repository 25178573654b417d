"""The change feed: who follows which name, and how many streams are open."""

from __future__ import annotations

import sys
import threading

from broker.core.changes import ChangeFeed


def test_open_subscriptions_are_counted_once_whatever_they_follow_and_leave_with_close() -> None:
    feed = ChangeFeed()
    both = feed.subscribe(["a", "b"])
    only_a = feed.subscribe(["a"])
    assert len(feed) == 2
    assert feed.watched() == frozenset({"a", "b"})

    both.close()
    assert len(feed) == 1
    assert feed.watched() == frozenset({"a"})
    only_a.close()
    assert len(feed) == 0
    assert feed.watched() == frozenset()


def test_the_count_can_be_read_from_another_thread_while_streams_come_and_go() -> None:
    """The metrics scrape reads len(feed) on its own thread while the event loop subscribes."""
    feed = ChangeFeed()
    stop = threading.Event()
    errors: list[BaseException] = []

    def scrape() -> None:
        while not stop.is_set():
            try:
                len(feed)
            except BaseException as exc:
                errors.append(exc)
                return

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns as often as they can: the race shows
    reader = threading.Thread(target=scrape)
    reader.start()
    try:
        for round_ in range(2000):
            subscriptions = [feed.subscribe([f"s{round_}-{i}", "shared"]) for i in range(5)]
            for subscription in subscriptions:
                subscription.close()
    finally:
        stop.set()
        reader.join()
        sys.setswitchinterval(interval)
    assert errors == []
    assert len(feed) == 0
