"""The CUBE client against the CUBE double: token auth, retries, idempotence, locks, API detection."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
import requests

from dicomflow.chris.client import ChrisClient
from dicomflow.chris.errors import ChrisRequestError, ChrisUnavailableError, PathTooLongError
from dicomflow.chris.instance import read_instance_tags
from dicomflow.chris.metadata import registration_fields
from dicomflow.chris.paths import instance_path
from dicomflow.chris.settings import ChrisSettings, Registration
from tests.support.chris_env import AET, chris_config



def client_for(cube, connection, **extra) -> ChrisClient:
    return ChrisClient(ChrisSettings.from_config(chris_config(cube, **extra)), connection)


def stored_fields(sag_anon, root, index: int = 0) -> dict:
    """Store one sag-anon file under the root by hand; its pacsfiles registration body."""
    source = sorted(sag_anon.glob("*.dcm"))[index]
    tags = read_instance_tags(source)
    location = instance_path(tags, AET)
    target = root / location.path
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return {**registration_fields(tags, AET), "path": location.path}


def test_token_from_auth_token_then_token_auth_only(make_cube, connection, sag_anon, files_root):
    cube = make_cube("cube5", basic_cost=0.05)
    bodies = [stored_fields(sag_anon, files_root, i) for i in range(5)]
    with client_for(cube, connection) as client:
        for body in bodies:
            assert client.register_file(body).created
    # A second client (another job, another worker) reuses the token shared through Redis.
    with client_for(cube, connection) as client:
        assert client.register_file(stored_fields(sag_anon, files_root, 5)).created
    kinds = [(r.path, r.auth) for r in cube.requests]
    assert kinds.count(("/api/v1/auth-token/", "none")) == 1
    assert [a for p, a in kinds if p == "/api/v1/pacsfiles/"] == ["token"] * 6
    assert len(cube.state.files) == 6


def test_token_auth_is_much_faster_than_basic(make_cube, connection):
    cube = make_cube("cube5", basic_cost=0.05)
    with client_for(cube, connection) as client:
        client.token()
        start = time.monotonic()
        for _ in range(10):
            assert client.request("GET", "pacsfiles/").status_code == 200
        token_time = time.monotonic() - start
    start = time.monotonic()
    for _ in range(10):
        assert requests.get(cube.url + "pacsfiles/", auth=("chris", cube.users["chris"])).status_code == 200
    basic_time = time.monotonic() - start
    assert basic_time > 0.5 > token_time


def test_wrong_password_and_wrong_user(make_cube, connection, sag_anon, files_root):
    cube = make_cube("cube5")
    with client_for(cube, connection, CHRIS_PASSWORD="nope") as client, pytest.raises(ChrisRequestError) as err:
        client.token()
    assert err.value.status == 400 and "non_field_errors" in err.value.body
    with (client_for(cube, connection, CHRIS_USERNAME="alice", CHRIS_PASSWORD="alice1234") as client,
          pytest.raises(ChrisRequestError) as err):
        client.register_file(stored_fields(sag_anon, files_root))
    assert err.value.status == 403
    assert requests.post(cube.url + "pacsfiles/", json={}).status_code == 401


def test_a_stale_cached_token_is_replaced(make_cube, connection, sag_anon, files_root):
    cube = make_cube("cube5")
    with client_for(cube, connection) as client:
        client.token()
    cube.tokens.clear()  # CUBE lost its tokens (e.g. database restored)
    with client_for(cube, connection) as client:
        assert client.register_file(stored_fields(sag_anon, files_root)).created


def test_503_then_201_registers_once(make_cube, connection, sag_anon, files_root):
    cube = make_cube("cube5")
    body = stored_fields(sag_anon, files_root)
    with client_for(cube, connection) as client:
        client.token()
        cube.fail_next(2, 503)
        assert client.register_file(body).created
    statuses = [r.status for r in cube.registrations()]
    assert statuses == [503, 503, 201]
    assert list(cube.state.files) == [body["path"]]


def test_already_registered_is_success(make_cube, connection, sag_anon, files_root):
    cube = make_cube("cube5")
    body = stored_fields(sag_anon, files_root)
    with client_for(cube, connection) as client:
        assert client.register_file(body).created
        again = client.register_file(body)
    assert again.already and again.status == 400
    assert again.body == {"path": ["File has already been registered."]}


def test_cube_down_is_retried_then_fails_clearly_and_a_rerun_succeeds(make_cube, connection, sag_anon,
                                                                      files_root):
    cube = make_cube("cube5")
    body = stored_fields(sag_anon, files_root)
    with client_for(cube, connection) as client:
        client.token()
    cube.down()
    with client_for(cube, connection, CHRIS_HTTP_RETRIES="4") as client, \
            pytest.raises(ChrisUnavailableError) as err:
        client.register_file(body)
    assert err.value.attempts == 4 and "ConnectionError" in err.value.last
    cube.up()
    with client_for(cube, connection) as client:
        assert client.register_file(body).created


def test_network_error_then_answer_within_the_attempts(make_cube, connection, sag_anon, files_root):
    cube = make_cube("cube5")
    body = stored_fields(sag_anon, files_root)
    with client_for(cube, connection) as client:
        client.token()
    cube.down()
    timer = threading.Timer(0.3, cube.up)
    timer.start()
    with client_for(cube, connection, CHRIS_HTTP_RETRIES="6", CHRIS_RETRY_BASE="0.05",
                    CHRIS_RETRY_CAP="0.2") as client:
        assert client.register_file(body).created
    timer.join()


def test_backoff_is_exponential_and_capped(make_cube, connection):
    cube = make_cube("cube5")
    client = client_for(cube, connection, CHRIS_RETRY_BASE="1", CHRIS_RETRY_CAP="20")
    assert [client.backoff(n) for n in range(1, 7)] == [2, 4, 8, 16, 20, 20]


def test_concurrent_duplicates_make_cube_answer_500(make_cube, sag_anon, files_root):
    """The double reproduces CUBE's race (cube.md section 4) when nothing prevents it."""
    cube = make_cube("cube5", write_cost=0.2)
    body = stored_fields(sag_anon, files_root)
    token = requests.post(cube.url + "auth-token/", json={"username": "chris", "password": "chris1234"}).json()
    headers = {"Authorization": f"Token {token['token']}"}
    answers: list[int] = []
    threads = [threading.Thread(target=lambda: answers.append(
        requests.post(cube.url + "pacsfiles/", json=body, headers=headers).status_code)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(answers).count(201) == 1 and 500 in answers


def test_the_client_never_sends_the_same_registration_twice_at_once(make_cube, connection, sag_anon,
                                                                    files_root):
    cube = make_cube("cube5", write_cost=0.2)
    body = stored_fields(sag_anon, files_root)
    with client_for(cube, connection) as client:
        client.token()
    outcomes = []

    def register() -> None:
        with client_for(cube, connection, CHRIS_HTTP_RETRIES="1") as client:
            outcomes.append(client.register_file(body).created)

    threads = [threading.Thread(target=register) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == [False] * 5 + [True]
    assert 500 not in [r.status for r in cube.registrations()]


def test_field_errors_and_long_paths(make_cube, connection, sag_anon, files_root):
    cube = make_cube("cube5")
    body = stored_fields(sag_anon, files_root)
    with client_for(cube, connection) as client:
        with pytest.raises(ChrisRequestError) as err:
            client.register_file({**body, "StudyDate": "", "PatientSex": None})
        assert err.value.status == 400 and set(err.value.body) == {"StudyDate", "PatientSex"}
        with pytest.raises(ChrisRequestError) as err:
            client.register_file({**body, "path": body["path"] + ".missing"})
        assert "path" in err.value.body
        with pytest.raises(PathTooLongError):
            client.register_file({**body, "path": "SERVICES/PACS/OXITESTORTHANC/" + "x" * 500})
    long_path = "SERVICES/PACS/OXITESTORTHANC/" + "/".join(["y" * 200] * 3)
    (files_root / long_path).parent.mkdir(parents=True, exist_ok=True)
    (files_root / long_path).write_bytes(b"")
    token = requests.post(cube.url + "auth-token/", json={"username": "chris", "password": "chris1234"}).json()
    answer = requests.post(cube.url + "pacsfiles/", json={**body, "path": long_path},
                           headers={"Authorization": f"Token {token['token']}"})
    assert answer.status_code == 500  # what CUBE 5 does, hence the client's own check


@pytest.mark.parametrize("mode, expected", [("cube5", Registration.PACSFILES), ("cube6", Registration.SERIES),
                                            ("cube7", Registration.SERIES)])
def test_registration_api_is_detected(make_cube, connection, mode, expected):
    cube = make_cube(mode)
    with client_for(cube, connection) as client:
        assert client.detect_registration() is expected
        before = len(cube.requests)
        assert client.detect_registration() is expected  # cached in Redis
        assert len(cube.requests) == before
    with client_for(cube, connection, CHRIS_REGISTRATION="pacsfiles") as client:
        assert client.detect_registration() is Registration.PACSFILES
