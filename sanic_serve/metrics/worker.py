"""Metrics a worker observes: HTTP requests and, per generation, latencies and token counts.

They are prometheus-client metrics; in a server they run in multiprocess mode (see ``multiproc``),
so what each worker observes lands in files that any worker's scrape sums. A generation is tracked
where its frames are read (``sanic_serve.generation``): every generating endpoint, present or
future, reports without code of its own.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram
from sanic import Request

from sanic_serve.access_log import RequestRecord, current_request, route_label
from sanic_serve.metrics import names

# Sanic accepts any method token a client sends; a label per token would grow the series (and the
# multiprocess files) without bound. Anything else is counted as OTHER.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
OTHER_METHOD = "OTHER"


def method_label(method: str) -> str:
    return method if method in HTTP_METHODS else OTHER_METHOD


class WorkerMetrics:
    def __init__(self, vllm_names: bool) -> None:
        p = names.engine_prefix(vllm_names)
        own = names.OWN
        # Each metric goes to no registry: the scrape reads the multiprocess files, never these
        # objects, and a second instance (tests) must not clash with the first.
        self.http_requests = Counter(
            f"{own}http_requests",
            "HTTP requests answered, by route pattern, method (OTHER: not a standard one) and status code.",
            ["route", "method", "status"],
            registry=None,
        )
        self.http_duration = Histogram(
            f"{own}http_request_duration_seconds",
            "Time from a request's head to its last byte (a stream's included).",
            ["route", "method"],
            buckets=names.HTTP_DURATION_BUCKETS_S,
            registry=None,
        )
        self.http_in_flight = Gauge(
            f"{own}http_requests_in_flight",
            "HTTP requests being handled, every worker together.",
            multiprocess_mode="livesum",
            registry=None,
        )
        self.ttft = Histogram(
            f"{p}time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token.",
            ["model_name"],
            buckets=names.TTFT_BUCKETS_S,
            registry=None,
        )
        self.itl = Histogram(
            f"{p}inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request.",
            ["model_name"],
            buckets=names.ITL_BUCKETS_S,
            registry=None,
        )
        self.e2e = Histogram(
            f"{p}e2e_request_latency_seconds",
            "Time from a request's arrival to its last generated token.",
            ["model_name"],
            buckets=names.REQUEST_LATENCY_BUCKETS_S,
            registry=None,
        )
        self.queue_time = Histogram(
            f"{p}request_queue_time_seconds",
            "Time a request waited in the model host's queue before its prefill began.",
            ["model_name"],
            buckets=names.REQUEST_LATENCY_BUCKETS_S,
            registry=None,
        )
        self.prompt_tokens = Histogram(
            f"{p}request_prompt_tokens",
            "Prompt tokens per request.",
            ["model_name"],
            buckets=names.TOKEN_COUNT_BUCKETS,
            registry=None,
        )
        self.generation_tokens = Histogram(
            f"{p}request_generation_tokens",
            "Generated tokens per request.",
            ["model_name"],
            buckets=names.TOKEN_COUNT_BUCKETS,
            registry=None,
        )
        self.generation_tokens_total = Counter(
            f"{p}generation_tokens", "Generated tokens.", ["model_name"], registry=None
        )
        self.request_success = Counter(
            f"{p}request_success",
            "Generations that finished, by reason (stop, length, abort: client gone or stop string).",
            ["model_name", "finished_reason"],
            registry=None,
        )

    # -- HTTP --------------------------------------------------------------------------------------
    def request_began(self, request: Request) -> None:
        self.http_in_flight.inc()

    def request_ended(self, request: Request, record: RequestRecord, status: int | None) -> None:
        self.http_in_flight.dec()
        route, method = route_label(request), method_label(record.method)
        # No status: the client went away before an answer began (nginx would log 499).
        self.http_requests.labels(route, method, str(status or 499)).inc()
        self.http_duration.labels(route, method).observe(record.elapsed_s())


_metrics: WorkerMetrics | None = None


def install(metrics: WorkerMetrics | None) -> None:
    """Make ``metrics`` this process's (a worker's, at start); None turns tracking off."""
    global _metrics
    _metrics = metrics


class GenerationTracker:
    """One generation's timings, observed as its frames are read. Timestamps are taken when the
    worker reads a batch of frames: tokens that arrived together share their interval."""

    def __init__(self, model_name: str, prompt_tokens: int) -> None:
        self.model_name = model_name
        self.prompt_tokens = prompt_tokens
        self.tokens = 0
        record = current_request.get()
        self._record = record
        # vLLM measures from the request's arrival at its server; so does this, when it can.
        self.started_s = record.started_s if record is not None else time.perf_counter()
        self._last_s: float | None = None
        self._done = False
        if record is not None:
            record.prompt_tokens = max(record.prompt_tokens, prompt_tokens)  # n choices: one prompt

    def tokens_arrived(self, count: int, queue_s: float | None = None) -> None:
        if count <= 0:
            return
        now = time.perf_counter()
        metrics = _metrics
        if metrics is not None:
            if self._last_s is None:
                metrics.ttft.labels(self.model_name).observe(now - self.started_s)
                if queue_s is not None:
                    metrics.queue_time.labels(self.model_name).observe(queue_s)
                # Tokens read together with the first: their own intervals are unknown (the
                # reader fell behind), and zeros would flatter the histogram.
                count_itl = 0
                per_token_s = 0.0
            else:
                count_itl = count
                per_token_s = (now - self._last_s) / count
            itl = metrics.itl.labels(self.model_name)
            for _ in range(count_itl):
                itl.observe(per_token_s)
        self._last_s = now
        self.tokens += count
        if self._record is not None:
            self._record.completion_tokens += count

    def failed(self) -> None:
        """The host failed it: not a success, and its latency would mislead."""
        self._done = True

    def finished(self, reason: str) -> None:
        """``stop``, ``length`` or ``abort``; the first call counts, later ones do nothing."""
        if self._done:
            return
        self._done = True
        metrics = _metrics
        if metrics is None:
            return
        name = self.model_name
        metrics.e2e.labels(name).observe(time.perf_counter() - self.started_s)
        metrics.prompt_tokens.labels(name).observe(self.prompt_tokens)
        metrics.generation_tokens.labels(name).observe(self.tokens)
        metrics.generation_tokens_total.labels(name).inc(self.tokens)
        metrics.request_success.labels(name, reason).inc()
