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

from model_host.ipc.status import HostStatus, StatusField, StatusSnapshot
from sanic_serve.metrics import names


def host_restarts(snapshot: StatusSnapshot) -> int:
    """Model host starts after the first one: the status block's epoch (every host start adds one)
    is the one count of restarts, kept in the main process across host deaths."""
    return max(snapshot.epoch - 1, 0)


class HostCollector:
    def __init__(
        self,
        status: HostStatus,
        alive: bool,
        vllm_names: bool,
        model_name: Callable[[str], str],
        served_model: str | None = None,
    ) -> None:
        self._status = status
        self._model_name = model_name  # the host lists folders; clients and labels use model ids
        self._served_model = served_model
        self._alive = alive
        self._p = names.engine_prefix(vllm_names)

    def _engine_model(self, snap: StatusSnapshot) -> str:
        """The ``model_name`` of the engine-wide numbers. vLLM labels every metric with it and its
        dashboards filter on it; the host counts for all its models together, so the label is the
        served default model (else the one loaded, else ``unknown``)."""
        if self._served_model:
            return self._served_model
        return self._model_name(snap.models[0]) if len(snap.models) == 1 else "unknown"

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
            f"{own}host_restarts", "Model host starts after the first one (crashes).", host_restarts(snap)
        )
        # Every vLLM-named metric carries model_name, as vLLM's own do.
        engine_model = [self._engine_model(snap)]
        gauges = (
            ("num_requests_running", "Requests in the running batch.", snap.running),
            ("num_requests_waiting", "Requests waiting in the model host's queue.", snap.waiting),
        )
        for name, help_text, value in gauges:
            gauge = GaugeMetricFamily(f"{p}{name}", help_text, labels=["model_name"])
            gauge.add_metric(engine_model, value)
            yield gauge
        prompt, cached = snap.prompt_tokens_total, snap.cached_tokens_total
        counters = (
            ("prompt_tokens", "Prompt tokens admitted (prefilled or taken from the cache).", prompt),
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", prompt),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", cached),
        )
        for name, help_text, value in counters:
            counter = CounterMetricFamily(f"{p}{name}", help_text, labels=["model_name"])
            counter.add_metric(engine_model, value)
            yield counter
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
