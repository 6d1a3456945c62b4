"""Linear weights packed ahead of time for the decode step's matrix products (float32 on a CPU).

A decode step multiplies a few rows (one per running request) by every weight matrix of the model.
A plain ``nn.Linear`` calls MKL's ``sgemm``, which re-packs the weight into its kernel's layout on
every call: for 8-64 rows that copy costs about as much as the product itself. MKL can pack a weight
once for a given row count (``cblas_sgemm_pack``, reached through ``torch.ops.mkl``) and then
multiply any input of exactly that many rows by the packed copy. Measured on a 2-core x86 machine
(25M-parameter Qwen2 benchmark model, two threads): a 512x1408 product of 32 rows in 114 us
against 222 us; the host's engine driven in process at c=32, 1.08-1.10x throughput (1,628-1,666
against 1,513-1,523 tok/s), at c=8 1.04-1.08x; through HTTP (``hfserve bench``, servers
alternated) 1.05-1.10x at c=32, within noise at c=8. Greedy tokens were identical. More in
``docs/design.md`` (packed linear weights).

The packed copy serves one row count, so the host keeps one copy per weight, for the row count its
decode steps run at (``GemmPacks.observe``): every ``WINDOW_STEPS`` decode steps it takes a high
percentile of their rows, and a step with fewer rows, down to half of that, is padded up to it with
zero rows (a padded packed product still costs less than the plain one). Steps with other row counts
(a prefill, a lone request) take the plain path. Repacking (27 ms for that model) is allowed only
while the time spent on it stays under ``REPACK_SHARE`` of the time since loading, so a load that
swings cannot make the host repack over and over.

The copy costs as much memory again as the Linear weights; it is made only when that fits in a
quarter of the memory available at load, and ``--no-pack-weights`` turns it off.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

MIN_ROWS = 8  # below this many rows the plain product is as fast as the packed one (measured)
# A smaller weight keeps the plain product: the packed call's overhead outweighs the copy it saves
# (measured at 32 rows: 64x256 in 9.8 us plain against 11.6 packed; 512x256 in 58.7 against 45.6).
MIN_WEIGHT_ELEMENTS = 512 * 256
WINDOW_STEPS = 64  # decode steps between two decisions on the packed row count
PERCENTILE = 0.75  # of the window's rows: the batch's usual size, not a passing spike
ROUND_ROWS = 4  # the packed row count is a multiple of this, so a batch +-1 row does not repack
REPACK_SHARE = 0.01  # most of the host's time, since load, spent packing
MEMORY_SHARE = 0.25  # most of the available memory the packed copy may take


class GemmPacks:
    """The packed weights of one model's ``nn.Linear`` layers, all for one row count."""

    def __init__(self, linears: list[nn.Linear]) -> None:
        self.rows = 0  # the row count the weights are packed for; 0: none yet
        self.products = 0  # products computed with a packed weight, since load
        self.disabled = False  # a packed product differed from the plain one: plain for good
        self._linears = linears
        self._seen: list[int] = []
        self._created_s = time.monotonic()
        self._packing_s = 0.0
        for linear in linears:
            linear.__class__ = PackedLinear
            linear.packs = self  # type: ignore[assignment]
            linear.packed = None  # type: ignore[assignment]

    def observe(self, rows: int) -> None:
        """A decode step of ``rows`` rows ran; every ``WINDOW_STEPS`` of them, pack for the rows
        they usually had (between steps, never during a forward)."""
        self._seen.append(rows)
        if len(self._seen) < WINDOW_STEPS:
            return
        seen, self._seen = sorted(self._seen), []
        usual = seen[int(len(seen) * PERCENTILE)]
        target = -(-usual // ROUND_ROWS) * ROUND_ROWS if usual >= MIN_ROWS else 0
        if target and target != self.rows and self._may_repack():
            self.pack(target)

    def _may_repack(self) -> bool:
        alive_s = time.monotonic() - self._created_s
        return self.rows == 0 or self._packing_s <= REPACK_SHARE * alive_s

    @torch.inference_mode()
    def pack(self, rows: int) -> None:
        """Pack every weight for ``rows`` rows. The packing is a private torch operator: one
        weight of each shape is checked against the plain product, and any difference turns
        packing off for good (the plain path is always right)."""
        if self.disabled:
            return
        started = time.monotonic()
        for linear in self._linears:
            linear.packed = None  # type: ignore[assignment]  # free the old copy before the new one
            linear.packed = torch.ops.mkl._mkl_reorder_linear_weight(linear.weight, rows)  # type: ignore[assignment]
        self.rows = rows
        shapes = {
            (linear.in_features, linear.out_features, linear.bias is None): linear for linear in self._linears
        }
        if not all(_matches(linear, rows) for linear in shapes.values()):
            log.warning("packed products for %d rows differ from plain ones: linear weights stay plain", rows)
            self.unpack()
            self.disabled = True
            return
        took_s = time.monotonic() - started
        self._packing_s += took_s
        log.info("linear weights packed for %d rows in %.3f s", rows, took_s)

    def unpack(self) -> None:
        for linear in self._linears:
            linear.packed = None  # type: ignore[assignment]
        self.rows = 0


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` (its class swapped in place: parameters, ties and hooks unchanged) that
    multiplies by its packed weight when the input's rows fit the packed row count."""

    packs: GemmPacks
    packed: torch.Tensor | None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows_packed = self.packs.rows
        width = input.shape[-1]
        rows = input.numel() // width if width else 0
        if self.packed is None or not rows_packed // 2 < rows <= rows_packed:
            return super().forward(input)
        flat = input.reshape(rows, width)
        if rows < rows_packed:  # padded with zero rows up to the packed count, cut off after
            padded = flat.new_zeros((rows_packed, width))
            padded[:rows] = flat
            flat = padded
        out = torch.ops.mkl._mkl_linear(flat, self.packed, self.weight, self.bias, rows_packed)
        self.packs.products += 1
        return out[:rows].reshape(*input.shape[:-1], out.shape[-1])


def available_bytes() -> int | None:
    """Memory the kernel says is available (Linux ``MemAvailable``); None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def pack_linears(model: Any, name: str) -> GemmPacks | None:
    """Pack ``model``'s Linear layers of at least ``MIN_WEIGHT_ELEMENTS`` (a float32 model on the
    CPU, MKL in this torch) if the copy fits in memory and the packed product matches the plain
    one; None otherwise."""
    if not torch.backends.mkl.is_available():
        return None
    linears = [m for m in model.modules() if type(m) is nn.Linear and m.weight.numel() >= MIN_WEIGHT_ELEMENTS]
    if not linears or any(m.weight.dtype != torch.float32 or m.weight.device.type != "cpu" for m in linears):
        return None
    size = sum(m.weight.numel() * 4 for m in linears)
    free = available_bytes()
    if free is not None and size > MEMORY_SHARE * free:
        log.info(
            "%s: linear weights not packed (%d MB would exceed a quarter of the %d MB available)",
            name,
            size >> 20,
            free >> 20,
        )
        return None
    if not _matches(linears[0]):
        return None
    log.info("%s: decode steps multiply by packed linear weights (+%d MB)", name, size >> 20)
    return GemmPacks(linears)


@torch.inference_mode()
def _matches(linear: nn.Linear, rows: int = MIN_ROWS) -> bool:
    """The product of a random input of ``rows`` rows equals the plain one (within float32
    rounding), through ``linear.packed`` when it is packed, else through a copy packed here."""
    x = torch.randn(rows, linear.in_features)
    try:
        packed = getattr(linear, "packed", None)
        if packed is None:
            packed = torch.ops.mkl._mkl_reorder_linear_weight(linear.weight, rows)
        out = torch.ops.mkl._mkl_linear(x, packed, linear.weight, linear.bias, rows)
    except (RuntimeError, AttributeError):  # this torch has no MKL packing
        log.debug("MKL packed products unavailable", exc_info=True)
        return False
    expected = nn.functional.linear(x, linear.weight, linear.bias)
    scale = float(expected.abs().max()) or 1.0
    return bool(float((out - expected).abs().max()) <= 1e-4 * scale)
