"""dicomflow/httpsession.py: keep-alive to a server that leaves Nagle on, without the delayed-ACK stall.

The server is the CUBE double served as CUBE 5's runserver serves (`nagle=True`: wsgiref,
keep-alive, an answer in three sends), where a plain keep-alive client waits ~40 ms per answer.
"""

from __future__ import annotations

import socket
import time

import pytest
import requests

from dicomflow import httpsession
from dicomflow.chris.client import ChrisClient
from dicomflow.chris.settings import ChrisSettings
from tests.support.chris_env import chris_config

pytestmark = pytest.mark.skipif(httpsession.QUICKACK is None, reason="TCP_QUICKACK is Linux's")


def test_the_flag_is_set_on_the_socket_right_before_the_answer_is_read():
    class Reader:
        def getresponse(self):  # what urllib3's connection would do next: read the answer
            return self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK)

    class Connection(httpsession._AckAtOnce, Reader):
        pass

    server = socket.create_server(("127.0.0.1", 0))
    with server, socket.create_connection(server.getsockname()) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
        connection = Connection()
        connection.sock = sock
        assert connection.getresponse() == 1


def _post_times(session, cube, token: str, count: int) -> float:
    headers = {"Authorization": f"Token {token}"}
    start = time.perf_counter()
    for i in range(count):
        answer = session.post(cube.url + "pacsfiles/", json={"path": f"SERVICES/PACS/X/{i}"}, headers=headers)
        assert answer.status_code == 400       # a field error: answered, nothing registered
    return time.perf_counter() - start


def test_one_kept_connection_without_the_stall_a_plain_session_has(make_cube, connection):
    cube = make_cube("cube5", basic_cost=0, nagle=True)
    token = requests.post(cube.url + "auth-token/", json={"username": "chris", "password": "chris1234"}).json()["token"]
    with httpsession.session() as ours, requests.Session() as plain:
        ours_time = _post_times(ours, cube, token, 10)
        plain_time = _post_times(plain, cube, token, 10)
        ports = [r.port for r in cube.requests if r.path.endswith("/pacsfiles/")]
        assert len(ports) == 20 and all(ports)
        assert len(set(ports[:10])) == 1           # ours: kept alive, one connection for all ten
    # The plain session waits for a delayed ACK (a kernel timer of ~40 ms) on every answer but
    # the first; ours does not. Side by side, with a wide margin for a loaded machine.
    assert plain_time > 0.3 and plain_time > 4 * ours_time, (plain_time, ours_time)


def test_the_cube_client_talks_through_such_a_session(make_cube, connection):
    cube = make_cube("cube5", nagle=True)
    with ChrisClient(ChrisSettings.from_config(chris_config(cube)), connection) as client:
        assert isinstance(client._session.adapters["http://"], httpsession.QuickAckAdapter)
        assert isinstance(client._session.adapters["https://"], httpsession.QuickAckAdapter)
        for _ in range(3):
            assert client.request("GET", "pacsfiles/").status_code == 200
