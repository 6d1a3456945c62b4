"""How many CPU threads the model host computes on (``--torch-threads 0``, the default).

On a CPU the host's compute threads share the cores with the HTTP workers and with the clients
reading their streams. torch runs every operator on all of its threads, which meet at a barrier at
the end of it: whenever a worker is scheduled on one core, the host's threads on the others wait
for their partner. For a model whose forward is mostly Python and dispatch (a small one) the extra
threads buy nothing, and what they cost is the HTTP side's: such a model computes on one thread.

Each causal LM loaded on the CPU is timed at load: a decode step's shape (32 rows, one token each),
torch's default thread count against one thread, alternately (a trial: the ratio of the medians of
5 forwards each). One thread is chosen when the default is less than ``MIN_SPEEDUP`` times faster
in the median of ``_TRIALS`` trials: a busy moment on a shared machine can make one trial read the
0.25M-parameter model at 1.4x instead of its 0.85-1.1x.

A model of more than ``_TIMED_UP_TO_PARAMS`` parameters, or whose forward takes longer than
``_TIMED_UNDER_S`` on one thread, is not timed further and keeps the default: its forward is
arithmetic, which threads speed up where the cores are free. The 25M-parameter benchmark model
(35 ms) read 1.3-1.5x on a quiet 2-core machine but 1.0-1.3x while another tenant used a core, and
one thread cost it 5-25 % through HTTP: a verdict that flips with the moment of loading is worse
than none. The host computes on the most threads any loaded model wants (a model without a
preference wants the default). ``--torch-threads N`` fixes the count instead.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterable
from typing import Any

import torch

log = logging.getLogger(__name__)

MIN_SPEEDUP = 1.15  # measured: 0.85-1.1x for a 0.25M-parameter model, whose one thread wins
_TIMED_UP_TO_PARAMS = 100_000_000
_TIMED_UNDER_S = 0.01
_ROWS = 32
_ROUNDS = 5
_TRIALS = 5


class ThreadPolicy:
    """The host's thread count: fixed, or the most that the loaded models want."""

    def __init__(self, fixed_threads: int) -> None:
        self.auto = fixed_threads <= 0
        self.default_threads = fixed_threads if fixed_threads > 0 else torch.get_num_threads()

    def choose(self, model: Any, device: torch.device, name: str) -> int:
        """The threads ``model`` (a transformers causal LM) runs best on beside the HTTP side."""
        if not self.auto or device.type != "cpu" or self.default_threads <= 1:
            return self.default_threads
        try:
            speedup = _speedup(model, device, self.default_threads)
        except Exception:  # a model whose forward wants more than ids: no preference
            log.debug("could not time the forward on one thread", exc_info=True)
            return self.default_threads
        if speedup is None or speedup >= MIN_SPEEDUP:
            return self.default_threads
        log.info(
            "%s: a forward on %d threads is %.2fx one thread's, so it computes on one thread and "
            "leaves the other cores to the HTTP side (--torch-threads sets the count)",
            name,
            self.default_threads,
            speedup,
        )
        return 1

    def apply(self, wanted: Iterable[int]) -> int:
        """Compute on the most threads any loaded model wants (the default when none is loaded)."""
        threads = max(wanted, default=self.default_threads)
        if self.auto and threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        return threads


@torch.inference_mode()
def _speedup(model: Any, device: torch.device, threads: int) -> float | None:
    """How many times faster a decode-shaped forward is on ``threads`` than on one (the median of
    ``_TRIALS`` trials); None when the model is too big or its forward too slow to be worth timing
    (its threads pay)."""
    if sum(p.numel() for p in model.parameters()) > _TIMED_UP_TO_PARAMS:
        return None
    ids = torch.ones((_ROWS, 1), dtype=torch.long, device=device)

    def timed(n: int) -> float:
        torch.set_num_threads(n)
        started = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        return time.perf_counter() - started

    before = torch.get_num_threads()
    try:
        timed(threads)  # the first calls warm up
        if timed(1) > _TIMED_UNDER_S:
            return None
        trials = []
        for _ in range(_TRIALS):
            many, one = [], []
            for _ in range(_ROUNDS):  # alternately, so that a burst of load on the machine hits both
                many.append(timed(threads))
                one.append(timed(1))
            trials.append(statistics.median(one) / statistics.median(many))
    finally:
        torch.set_num_threads(before)
    return statistics.median(trials)
