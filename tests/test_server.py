"""The listener's own checks, without a daemon: the peer's uid."""

from __future__ import annotations

import os
import socket

from semantica.server import peer_uid


def test_peer_uid_of_a_unix_socket_is_the_connecting_process_uid():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        assert peer_uid(ours) == os.getuid()
