"""Keeps a process's RevocationState current: the file, and Redis when set.

The file (``paseto.revocationPath``) is polled with ``os.stat`` every
``POLL_INTERVAL`` seconds and re-read when its inode, size or modification
time changes (paseto-tool replaces it atomically, so a changed file always
has a new inode), and on every SIGHUP (``reconfigure``). A file that cannot
be read or parsed keeps the last good list and is logged once until it
changes; at start-up it is an error. Each worker process runs its own feed.

With ``redis.url``, the process's ``shared_state.SharedState`` (owned by the
service) delivers the Redis entries: the full list on every (re)connect,
single entries as they are published.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from runner_gateway.revocation import RevocationError, RevocationState, read_file
from runner_gateway.settings import Settings, SettingsError

__all__ = ["POLL_INTERVAL", "RevocationFeed"]

POLL_INTERVAL = 0.25  # a change is in force within this (plus a read) of the rename

_log = Logger()


def _settings_error(path: str, exc: RevocationError) -> SettingsError:
    return SettingsError(path, "paseto.revocationPath", str(exc).removeprefix(f"{path}: "))


def _signature(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)


class RevocationFeed:
    """The file watcher and the Redis subscription of one process."""

    def __init__(
        self, state: RevocationState, settings: Settings, reactor: Any, shared: Any = None
    ) -> None:
        self.state = state
        self.reactor = reactor
        self.path = ""
        self._signature: tuple[int, int, int, int] | None = None
        self._failing = False
        self._started = False  # between start() and stop(): poll while there is a path
        self._poll = LoopingCall(self.poll)
        self._poll.clock = reactor
        if shared is not None:
            from runner_gateway.shared_state import SharedRevocations

            SharedRevocations(shared, state, reactor.seconds)
        self.configure(settings, strict=True)

    def configure(self, settings: Settings, strict: bool = False) -> None:
        """Take a (re)loaded settings' path and read the file now."""
        path = settings.paseto.revocation_path
        if path != self.path:
            self.path = path
            self._signature = None
            if not path:
                self.state.set_file([], self.reactor.seconds())
        if path:
            self.poll(force=True, strict=strict)
        self._schedule()

    def start(self) -> None:
        self._started = True
        self._schedule()

    def stop(self) -> None:
        self._started = False
        self._schedule()

    def _schedule(self) -> None:
        # No path, no timer: a poll that only finds no path still wakes the
        # reactor four times a second in every worker.
        wanted = self._started and bool(self.path)
        if wanted and not self._poll.running:
            self._poll.start(POLL_INTERVAL, now=False)
        elif not wanted and self._poll.running:
            self._poll.stop()

    def problems(self) -> dict[str, str]:
        """What /readyz shows as detail (not a reason to be unready)."""
        found = {}
        if self._failing:
            found["revocations"] = "the revocation file could not be read; using the last list"
        return found

    def poll(self, force: bool = False, strict: bool = False) -> None:
        path = self.path
        if not path:
            return
        signature = _signature(path)
        if signature == self._signature and not force:
            return
        try:
            entries = read_file(path)
        except RevocationError as exc:
            if strict:
                raise _settings_error(path, exc) from None
            if not self._failing or force:
                _log.error("revocation list not reloaded, keeping the last one: {error}", error=exc)
            self._failing = True
            self._signature = signature
            return
        self._signature = signature
        self._failing = False
        if self.state.set_file(entries, self.reactor.seconds()):
            _log.info(
                "revocation list loaded: {n} entr{ies} in force",
                n=len(self.state),
                ies="y" if len(self.state) == 1 else "ies",
            )
