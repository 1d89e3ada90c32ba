"""The listener's own checks, without a daemon: the peer's uid, and which connections
may join a group commit."""

from __future__ import annotations

import os
import socket

from semantica.server import peer_uid


def test_peer_uid_of_a_unix_socket_is_the_connecting_process_uid():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        assert peer_uid(ours) == os.getuid()


def test_only_a_busy_or_just_answered_connection_is_company_for_a_commit():
    """A group commit waits loop turns for other clients only when one could join:
    an idle connection left open by a tool cannot, and must not slow a lone client."""
    import time
    from types import SimpleNamespace

    from semantica.server import COMPANY_SCAN_MAX, COMPANY_WINDOW_S, Server

    now = time.monotonic()
    me = SimpleNamespace(idle_since=None)  # the caller: its request is under way

    def company(*others):
        return Server._has_company(SimpleNamespace(conns=[me, *others]))

    idle = SimpleNamespace(idle_since=now - 10)
    assert not Server._has_company(SimpleNamespace(conns=[me]))
    assert not company(idle)
    assert company(idle, SimpleNamespace(idle_since=None))  # a request under way
    assert company(SimpleNamespace(idle_since=now - COMPANY_WINDOW_S / 4))  # just answered
    many_idle = [SimpleNamespace(idle_since=now - 10) for _ in range(COMPANY_SCAN_MAX)]
    assert company(*many_idle)  # past the scan limit, company is assumed
