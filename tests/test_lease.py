"""capray.lease: one owner per output, on a local disk and on S3 (moto); no Ray."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest

from capray import lease, storage


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    return f"{request.getfixturevalue('s3_bucket')}/out"


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _plant(output: str, **fields) -> None:
    """A lease as another run left it."""
    record = {"run_id": "20260101T000000-abcdef", "token": "theirs", "what": "caption run", "host": "elsewhere",
              "pid": 1, "started": time.time(), "heartbeat": time.time(), "timeout_s": 600.0, **fields}
    storage.write_json(lease.lease_uri(output), record)


def test_a_second_run_is_refused_in_one_line_while_the_first_holds_the_lease(output):
    with lease.acquire(output, run_id="first", timeout_s=60, what="caption run"):
        with pytest.raises(lease.OutputBusy) as refused:
            lease.acquire(output, run_id="second", timeout_s=60)
        assert "in use by caption run first" in str(refused.value) and "\n" not in str(refused.value)
        assert storage.read_json(lease.lease_uri(output))["run_id"] == "first"
    assert not storage.exists(lease.lease_uri(output))  # released
    with lease.acquire(output, run_id="third", timeout_s=60) as third:  # and free again
        assert third.previous is None


def test_a_lease_without_heartbeat_for_its_timeout_is_taken_over(output):
    _plant(output, heartbeat=time.time() - 120, timeout_s=60.0)

    with lease.acquire(output, run_id="mine", timeout_s=60) as held:
        assert held.previous["run_id"] == "20260101T000000-abcdef"
        assert storage.read_json(lease.lease_uri(output))["token"] == held.token


def test_a_lease_with_a_recent_heartbeat_from_another_host_is_respected(output):
    _plant(output, heartbeat=time.time() - 30, timeout_s=60.0)

    with pytest.raises(lease.OutputBusy, match="host elsewhere"):
        lease.acquire(output, run_id="mine", timeout_s=60)


def test_a_lease_whose_process_on_this_host_is_gone_is_taken_over_at_once(output):
    _plant(output, host=socket.gethostname(), pid=_dead_pid())

    with lease.acquire(output, run_id="mine", timeout_s=60) as held:
        assert held.previous["token"] == "theirs"


def test_of_two_takers_of_one_stale_lease_only_the_first_swap_wins(output):
    """Both read the stale lease; the second replaces what it read, which is no longer there."""
    _plant(output, heartbeat=0.0)
    uri = lease.lease_uri(output)
    _, seen = storage.read_versioned(uri)  # what the slower taker read

    with lease.acquire(output, run_id="fast", timeout_s=60) as fast:
        assert storage.replace_if(uri, b'{"run_id": "slow"}', seen) is None
        assert storage.read_json(uri)["token"] == fast.token


def test_many_runs_racing_for_a_stale_local_lease_give_one_owner(tmp_path):
    output = str(tmp_path / "out")
    _plant(output, heartbeat=0.0)
    won, refused = [], []
    barrier = threading.Barrier(8)

    def take(i: int) -> None:
        barrier.wait()
        try:
            won.append(lease.acquire(output, run_id=f"run-{i}", timeout_s=60))
        except lease.OutputBusy:
            refused.append(i)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7
    assert storage.read_json(lease.lease_uri(output))["token"] == won[0].token


def test_heartbeats_refresh_the_lease_and_a_robbed_run_finds_out(output):
    held = lease.acquire(output, run_id="mine", timeout_s=60)
    first = storage.read_json(held.uri)["heartbeat"]
    time.sleep(0.01)
    held.beat()
    assert storage.read_json(held.uri)["heartbeat"] > first
    lease.check_owner(held.uri, held.token)  # a write task's fence passes

    _plant(output, token="robber")  # taken over while this run was paused

    with pytest.raises(lease.LeaseLost):
        held.beat()
    with pytest.raises(lease.LeaseLost):
        held.check()
    with pytest.raises(lease.LeaseLost):
        lease.check_owner(held.uri, held.token)
    held.release()
    assert storage.read_json(held.uri)["token"] == "robber"  # not ours: left alone


def test_the_background_heartbeat_keeps_the_lease_fresh(output):
    with lease.acquire(output, run_id="mine", timeout_s=2.0) as held:  # a beat every 0.2 s
        first = storage.read_json(held.uri)["heartbeat"]
        deadline = time.monotonic() + 10  # a loaded machine may delay a beat; none may stop them
        while storage.read_json(held.uri)["heartbeat"] < first + 1.0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert storage.read_json(held.uri)["heartbeat"] >= first + 1.0  # beaten on, not once
        assert not lease.stale_reason(storage.read_json(held.uri))
    assert not storage.exists(held.uri)


def test_a_file_that_is_not_a_lease_is_a_one_line_error(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / lease.LEASE_FILE).write_text("garbage")
    with pytest.raises(storage.StorageError, match="not a capray lease"):
        lease.acquire(str(output), run_id="mine")
    assert (output / lease.LEASE_FILE).read_text() == "garbage"
