"""Process-group setup, so that one ``train()`` call works in-process and under a launcher alike.

A launcher (deepspeed, torchrun, Ray Train) sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT.
Called from plain Python (a test, a mixing sweep worker, ``maskmix train`` on a laptop) none is
set, and we become rank 0 of a world of 1 on a free local port.
"""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SYNTHESIZED_WORLD = "MASKMIX_SYNTHESIZED_WORLD"
"""``<pid>:<port>`` of the process that made up a world of one (no launcher described one)."""

_WORLD_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def set_single_process_env() -> None:
    """Fill in a world of one unless a launcher already described the world.

    The variables stay in ``os.environ`` (DeepSpeed reads them there), so every child process
    inherits them; the marker tells a child that the world is its parent's invention, not a
    launcher's. A child must not join its parent's made-up world: the parent may still hold
    MASTER_PORT (its TCP store), and the child would fail with EADDRINUSE. So a child that finds the
    marker makes up a world of its own, on a fresh port.
    """
    made_by, _, port = os.environ.get(SYNTHESIZED_WORLD, "").partition(":")
    # Only the very world a parent made up is dropped: a launcher's (Ray Train's, under a parent
    # that once trained in-process) names its own port and is kept.
    if made_by and made_by != str(os.getpid()) and os.environ.get("MASTER_PORT") == port:
        for name in _WORLD_VARS:
            os.environ.pop(name, None)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ[SYNTHESIZED_WORLD] = f"{os.getpid()}:{os.environ['MASTER_PORT']}"


def use_environment_ninja() -> None:
    """Put this Python environment's ``bin`` first on PATH when it holds ninja.

    DeepSpeed JIT-builds its ops with whatever ``ninja`` PATH finds. A process started as
    ``.venv/bin/maskmix`` sees the system ninja (1.11 here), a Ray job or an activated venv sees the
    venv's (the `ninja` wheel, 1.13); the two hash build commands differently in ``.ninja_log``, so
    each took the other's build as stale and recompiled the shared op cache (~45 s of CPU, under
    load minutes, with every other rank waiting on the build lock). One ninja for every process.
    """
    bin_dir = os.path.dirname(os.path.abspath(sys.executable))
    if not os.path.exists(os.path.join(bin_dir, "ninja")):
        return
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + (os.pathsep + path if path else "")


def ensure_distributed() -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed if needed; return (rank, world_size).

    gloo on CPU (DeepSpeed's CPU accelerator would pick oneCCL, which is rarely installed),
    the accelerator's own backend (NCCL) on GPUs.
    """
    use_environment_ninja()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if not dist.is_initialized():
        set_single_process_env()
        backend = "gloo" if not torch.cuda.is_available() else get_accelerator().communication_backend_name()
        deepspeed.init_distributed(dist_backend=backend)
    return dist.get_rank(), dist.get_world_size()


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (just [obj] in a world of one)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown_distributed() -> None:
    """Tear the process group down before the interpreter exits.

    A gloo group left alive at exit can abort the process ("terminate called without an active
    exception": its worker threads are destroyed while still joinable), which a launcher then
    reports as a crashed rank even though training finished.
    """
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()
