"""Keep a batch's postbacks claimed until their answers are saved."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from types import TracebackType

from postback_worker.settings import Settings
from postback_worker.store.repo import Store

log = logging.getLogger(__name__)

MIN_LEASE = 3  # seconds: renewals come every third of a lease


class LeaseKeeper:
    """Renews the leases of a batch's postbacks not yet saved every third of a lease.

    Renewal is driven by elapsed time on a thread of its own (a slow partner may send no
    answer for a long while), and also on the caller's clock as answers come in (`tick`).
    `lock` serialises the batch's writes: hold it while saving answers, so a renewal and a
    save of the same rows never run at once.
    """

    def __init__(self, store: Store, token: str, ids: Iterable[str], lease_seconds: float,
                 clock: Callable[[], datetime]) -> None:
        self.store = store
        self.token = token
        self.lease = float(lease_seconds)
        self.clock = clock
        self.lock = threading.Lock()
        self._ids = set(ids)
        self._last = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LeaseKeeper:
        if self._ids:
            self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def saved(self, postback_ids: Iterable[str]) -> None:
        """These postbacks' answers are saved (call it holding `lock`)."""
        self._ids.difference_update(postback_ids)

    def tick(self) -> None:
        """Renew if a third of a lease has passed on the clock since the last renewal."""
        if (self.clock() - self._last).total_seconds() > self.lease / 3:
            self.renew()

    def renew(self) -> None:
        with self.lock:
            now = self.clock()
            self._last = now
            if not self._ids:
                return
            kept = self.store.extend_leases(sorted(self._ids), self.token,
                                            now + timedelta(seconds=self.lease))
            if kept < len(self._ids):
                log.warning("%d postback lease(s) were lost before renewal",
                            len(self._ids) - kept)

    def _run(self) -> None:
        while not self._stop.wait(self.lease / 3):
            try:
                self.renew()
            except Exception:  # a database hiccup: the next renewal may work
                log.exception("could not renew postback leases")


def lease_problem(settings: Settings, partner_timeouts: Mapping[str, float]) -> str | None:
    """Why these settings cannot keep postbacks claimed safely, or None.

    A lease must be at least twice the longest request timeout (the default and every
    partner's), so a claim outlives the slowest request even when a renewal comes late.
    """
    delivery = settings.delivery
    longest, whose = delivery.default_timeout, "POSTBACK_DEFAULT_TIMEOUT"
    for partner_id, timeout in sorted(partner_timeouts.items()):
        if timeout > longest:
            longest, whose = timeout, f"the timeout of partner {partner_id}"
    if delivery.lease_seconds >= 2 * longest and delivery.lease_seconds >= MIN_LEASE:
        return None
    need = max(MIN_LEASE, math.ceil(2 * longest))
    return (f"POSTBACK_LEASE_SECONDS={delivery.lease_seconds} is too short: a lease must be at "
            f"least {MIN_LEASE} s and at least twice the longest request timeout ({longest:g} s, "
            f"{whose}), so a claim outlives the slowest request even when a renewal is late. "
            f"Set POSTBACK_LEASE_SECONDS to {need} or more, or lower that timeout.")
