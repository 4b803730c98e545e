"""The world of one that ``training.distributed`` makes up when no launcher described one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from training import distributed

WORLD = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", distributed.SYNTHESIZED_WORLD)
CHILD = ("import json, os; from training.distributed import set_single_process_env; set_single_process_env(); "
         "print(json.dumps({k: os.environ.get(k) for k in ('RANK', 'WORLD_SIZE', 'MASTER_PORT')}))")


@pytest.fixture
def clean_world(monkeypatch):
    for name in WORLD:
        monkeypatch.delenv(name, raising=False)


def child_world(env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD], env={**env, "PYTHONPATH": os.getcwd()},
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_a_child_makes_its_own_world_instead_of_joining_a_port_its_parent_holds(clean_world):
    distributed.set_single_process_env()
    parent_port = os.environ["MASTER_PORT"]
    assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1"
    with socket.socket() as held:  # the parent's TCP store holds its port, as after an in-process train()
        held.bind(("127.0.0.1", int(parent_port)))
        child = child_world(dict(os.environ))
    assert child["RANK"] == "0" and child["WORLD_SIZE"] == "1"
    assert child["MASTER_PORT"] != parent_port
    # and the same process asking again keeps its own world
    distributed.set_single_process_env()
    assert os.environ["MASTER_PORT"] == parent_port


def test_a_launchers_world_is_kept_even_under_a_parent_that_made_one_up(clean_world):
    distributed.set_single_process_env()
    launcher = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29555"}  # Ray Train, torchrun...
    assert child_world(launcher) == {"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29555"}
