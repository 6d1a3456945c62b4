"""The model host's numbers, read from its shared status block at scrape time.

The host never imports prometheus-client and never writes a metric file: it already publishes its
gauges and totals in the status block for ``/health``, and a scrape turns them into metrics. This
also keeps them right across a host restart: the totals of the status block live in the main
process, not in the host that may die.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.metrics_core import Metric

from model_host.ipc.status import HostStatus, StatusField
from sanic_serve.metrics import names


class HostCollector:
    def __init__(
        self, status: HostStatus, alive: bool, vllm_names: bool, model_name: Callable[[str], str]
    ) -> None:
        self._status = status
        self._model_name = model_name  # the host lists folders; clients and labels use model ids
        self._alive = alive
        self._p = names.engine_prefix(vllm_names)

    def collect(self) -> Iterator[Metric]:
        s = self._status
        snap = s.snapshot()
        p, own = self._p, names.OWN
        yield GaugeMetricFamily(
            f"{own}host_up",
            "1 while the model host is alive and serving, else 0.",
            int(self._alive and snap.ready),
        )
        yield CounterMetricFamily(
            f"{own}host_restarts", "Model host starts after the first one (crashes).", max(snap.epoch - 1, 0)
        )
        yield GaugeMetricFamily(f"{p}num_requests_running", "Requests in the running batch.", snap.running)
        yield GaugeMetricFamily(
            f"{p}num_requests_waiting", "Requests waiting in the model host's queue.", snap.waiting
        )
        yield CounterMetricFamily(
            f"{p}prompt_tokens",
            "Prompt tokens admitted (prefilled or taken from the cache).",
            snap.prompt_tokens_total,
        )
        yield CounterMetricFamily(
            f"{p}prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            snap.prompt_tokens_total,
        )
        yield CounterMetricFamily(
            f"{p}prefix_cache_hits", "Prompt tokens found in the prefix cache.", snap.cached_tokens_total
        )
        outcomes = CounterMetricFamily(
            f"{own}host_requests", "Requests the model host ended, by outcome.", labels=["outcome"]
        )
        outcomes.add_metric(["finished"], snap.finished_total)
        outcomes.add_metric(["aborted"], snap.aborted_total)
        outcomes.add_metric(["failed"], snap.failed_total)
        yield outcomes
        yield SummaryMetricFamily(
            f"{own}model_load_seconds",
            "Time taken by model loads.",
            count_value=s.get(StatusField.MODEL_LOADS_TOTAL),
            sum_value=s.get(StatusField.MODEL_LOAD_MS_TOTAL) / 1000.0,
        )
        loaded = GaugeMetricFamily(
            f"{own}model_loaded", "1 for each model loaded in the model host.", labels=["model_name"]
        )
        for model in snap.models:
            loaded.add_metric([self._model_name(model)], 1)
        yield loaded
