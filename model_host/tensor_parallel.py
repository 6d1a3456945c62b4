"""Tensor parallelism (``hfserve start --tp N``): the model host runs as N ranks of one
``torch.distributed`` group, each holding a shard of every layer (transformers' ``tp_plan="auto"``).

Rank 0 is the model host the server knows: it reads the workers' pipes, publishes frames and
status. Ranks 1..N-1 are followers it starts itself (``python -m model_host.tensor_parallel``): each
runs its own engine, a replica of rank 0's, and discards its frames. A sharded forward is a
collective, so every rank must run the same forward passes with the same inputs in the same order:
rank 0 broadcasts what it received on each pass of its loop (``Replicas.share``), and each follower
applies exactly those messages to its engine and steps when it has work, as rank 0 does. The engine
is deterministic given its inputs (the same queue, the same prefills and joins, sampling from a
generator seeded alike on every rank, logits identical on every rank after the all-reduce), so the
replicas never diverge. Nothing that depends on time may change the engine's state: unloading idle
models by a clock (``--idle-unload-s``) is refused with ``--tp``.

On GPUs each rank takes ``cuda:<rank>`` and the shards talk over NCCL; with ``--device cpu`` over
gloo (slow, but the same path, which is how it is tested on machines without GPUs). The control
messages go over a gloo group of their own either way. A follower that dies leaves rank 0 waiting
in a collective: its heartbeat stops and the supervisor restarts the host, followers included.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from typing import Any

import torch
import torch.distributed as dist

from model_host.engine import Engine
from model_host.ipc.codec import decode_message, encode
from model_host.ipc.messages import AbortRequest, AddRequest, HostMessage, UnloadModels, WorkerReset
from model_host.ipc.settings import HostSettings

log = logging.getLogger("hfserve.host.tp")

_SEED = 0  # every rank's default generator starts alike, so unseeded sampling agrees
_STOP = "stop"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def _join_group(settings: HostSettings) -> Any:
    """Join the process group from the environment; returns the gloo group for control messages."""
    on_gpu = settings.device != "cpu"
    if on_gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend="nccl" if on_gpu else "gloo", init_method="env://")
    torch.manual_seed(_SEED)
    return dist.new_group(backend="gloo")


class Replicas:
    """Rank 0's side: the followers it started and the group that keeps them in step."""

    def __init__(self, settings: HostSettings) -> None:
        world = settings.tp_size
        port = _free_port()
        os.environ.update(_rank_env(0, world, port))
        payload = json.dumps(dataclasses.asdict(settings))
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", "model_host.tensor_parallel", payload],
                env={**os.environ, **_rank_env(rank, world, port)},
            )
            for rank in range(1, world)
        ]
        self.group = _join_group(settings)
        log.info("tensor parallelism: rank 0 of %d, followers %s", world, [p.pid for p in self.procs])

    def share_epoch(self, epoch: int) -> None:
        dist.broadcast_object_list([epoch], src=0, group=self.group)

    def share(self, messages: list[HostMessage]) -> None:
        """What rank 0 received on this pass, for the followers to apply in the same order."""
        dist.broadcast_object_list([[encode(m) for m in messages]], src=0, group=self.group)

    def stop(self) -> None:
        try:
            dist.broadcast_object_list([_STOP], src=0, group=self.group)
        finally:
            for proc in self.procs:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            dist.destroy_process_group()


def apply(engine: Engine, msg: HostMessage, epoch: int, preload: tuple[str, ...]) -> None:
    """What rank 0's ``ModelHost._handle`` does to the engine's state, without the replies."""
    if isinstance(msg, AddRequest):
        if msg.epoch == epoch:
            engine.add(msg)
    elif isinstance(msg, AbortRequest):
        engine.abort((msg.worker_index, msg.request_id))
    elif isinstance(msg, WorkerReset):
        engine.abort_worker(msg.worker_index)
    elif isinstance(msg, UnloadModels):
        engine.unload_idle_models(keep=preload)


def _die_with_parent() -> None:
    """A follower must not outlive rank 0 (Linux: SIGKILL when the parent goes)."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def follower_main(settings: HostSettings) -> None:
    from model_host.process import placement
    from model_host.registry import ModelRegistry

    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 says when to stop
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s [model-host rank {os.environ['RANK']}] %(levelname)s %(name)s: %(message)s",
    )
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    group = _join_group(settings)
    from model_host.prefix_cache import PrefixCache

    # The same prefix cache as rank 0's: what it finds decides what is prefilled.
    cache = PrefixCache(settings.prefix_cache_mb * 1024 * 1024) if settings.prefix_cache_mb else None
    registry = ModelRegistry(
        settings.device, settings.dtype, settings.trust_remote_code, cache, placement(settings)
    )
    engine = Engine(registry, settings, settings.prefill_budget(registry.device.type))
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0, group=group)
    epoch = int(box[0])
    for path in settings.preload:
        registry.get(path)
    while True:
        dist.broadcast_object_list(box, src=0, group=group)
        if box[0] == _STOP:
            break
        for raw in box[0]:
            apply(engine, decode_message(raw), epoch, settings.preload)
        if engine.has_work():
            try:
                engine.step()
            except Exception:  # as rank 0 does: the same failure, the same way out
                log.exception("engine step failed; failing every request in flight")
                engine.fail_all("internal error in the generation step")
    dist.destroy_process_group()


if __name__ == "__main__":
    fields = json.loads(sys.argv[1])
    fields["preload"] = tuple(fields["preload"])
    follower_main(HostSettings(**fields))
