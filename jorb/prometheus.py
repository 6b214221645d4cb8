"""A Prometheus exporter: a status listener that serves a run's numbers at ``/metrics``.

::

    exporter = jorb.prometheus.Exporter(port=9108)      # pip install 'jorb[prometheus]'
    jorb.Processor(app, states, listeners=[exporter]).exec(run)

It reads only the processor's :class:`~jorb.Status` snapshots (a few times a second), so it
costs the engine nothing per job. Each scrape answers with the latest snapshot:

=====================================  =======  ==================================================
metric                                 type     what
=====================================  =======  ==================================================
``jorb_jobs{state}``                   gauge    jobs in the state now
``jorb_jobs_waiting{state}``           gauge    jobs ready to start
``jorb_jobs_delayed{state}``           gauge    jobs held back by a delay or a retry's backoff
``jorb_jobs_awaiting{state}``          gauge    jobs waiting for their children (fan-in)
``jorb_execs_running{state}``          gauge    execs in flight
``jorb_concurrency{state}``            gauge    the state's concurrency limit
``jorb_rate{state}``                   gauge    the state's current adaptive rate, starts/s
``jorb_paused{state}``                 gauge    1 while new starts in the state are paused
``jorb_execs_done_total{state}``       counter  execs that moved a job on
``jorb_exec_errors_total{state}``      counter  failed attempts (rate limits, timeouts included)
``jorb_jobs_gave_up_total{state}``     counter  jobs routed away after their retries
``jorb_run_jobs``                      gauge    all jobs in the run
``jorb_run_finished_jobs``             gauge    jobs in terminal states
``jorb_run_complete``                  gauge    1 once every job is in a terminal state
``jorb_transitions_total``             counter  execs settled, successes and failures
``jorb_elapsed_seconds``               gauge    seconds since the exec started
=====================================  =======  ==================================================

The counters start from 0 with each exec of the script (Prometheus' ``rate()`` and
``increase()`` expect that of a counter when a process restarts). Terminal states have only
``jorb_jobs``. ``Exporter(run="migrate")`` adds a ``run`` label to every metric, for several
runs scraped into one Prometheus.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from .errors import JorbError
from .status import Status

__all__ = ["Exporter"]

try:
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as e:  # pragma: no cover - the optional extra is missing
    raise JorbError(
        f"jorb.prometheus needs prometheus_client ({e}); pip install 'jorb[prometheus]'"
    ) from None

_LANE_GAUGES = (
    ("jobs_waiting", "Jobs ready to start.", "waiting"),
    ("jobs_delayed", "Jobs held back by a delay or a retry's backoff.", "delayed"),
    ("jobs_awaiting", "Jobs waiting for their children to finish.", "awaiting"),
    ("execs_running", "Execs in flight.", "running"),
    ("concurrency", "The state's concurrency limit.", "concurrency"),
)
_LANE_COUNTERS = (
    ("execs_done", "Execs that moved a job on, since the exec started.", "done"),
    ("exec_errors", "Failed attempts, since the exec started.", "errors"),
    ("jobs_gave_up", "Jobs routed away after using up their retries.", "failed"),
)


class Exporter(Collector):
    """Serves the latest :class:`~jorb.Status` as Prometheus metrics (a ``StatusListener``).

    ``port`` (0: any free one, then read :attr:`port`) on ``address`` starts an HTTP server in
    a daemon thread at the exec's start; ``port=None`` serves nothing, for an application that
    exposes ``registry`` itself (pass ``prometheus_client.REGISTRY`` to join its default one).
    """

    def __init__(
        self,
        port: int | None = 9108,
        *,
        address: str = "127.0.0.1",
        registry: CollectorRegistry | None = None,
        run: str | None = None,
    ) -> None:
        self.port = port
        self.address = address
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.run_label = run
        self._status: Status | None = None
        self._lock = threading.Lock()
        self._server: Any = None
        self.registry.register(self)

    def __repr__(self) -> str:
        where = f"http://{self.address}:{self.port}/metrics" if self._server else "not serving"
        return f"<Exporter {where}>"

    # -- the listener ---------------------------------------------------------------------

    def start(self, status: Status) -> None:
        self.update(status)
        if self.port is not None and self._server is None:
            self._server, _ = start_http_server(self.port, self.address, registry=self.registry)
            self.port = self._server.server_port

    def update(self, status: Status) -> None:
        with self._lock:
            self._status = status

    def note(self, message: str) -> None:
        pass

    def stop(self, status: Status) -> None:
        """Keeps serving the last numbers (a last scrape sees the end); :meth:`close` stops."""
        self.update(status)

    def close(self) -> None:
        """Stop the HTTP server, if this exporter started one."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- the collector ---------------------------------------------------------------------

    def describe(self) -> list[Metric]:
        return []  # (the metrics depend on the run's states: known at the first scrape)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            status = self._status
        if status is None:
            return
        extra = [] if self.run_label is None else ["run"]
        values = [] if self.run_label is None else [self.run_label]
        labels = [*extra, "state"]

        def family(kind: Any, name: str, text: str, per_state: bool = True) -> Any:
            return kind(f"jorb_{name}", text, labels=labels if per_state else extra)

        jobs = family(GaugeMetricFamily, "jobs", "Jobs in the state now.")
        gauges = [(family(GaugeMetricFamily, n, t), f) for n, t, f in _LANE_GAUGES]
        counters = [(family(CounterMetricFamily, n, t), f) for n, t, f in _LANE_COUNTERS]
        paused = family(GaugeMetricFamily, "paused", "1 while new starts are paused.")
        rate = family(GaugeMetricFamily, "rate", "The state's current rate, starts/s.")
        for row in status.states:
            key = [*values, row.name]
            jobs.add_metric(key, row.jobs)
            if row.terminal:
                continue
            for metric, field in [*gauges, *counters]:
                metric.add_metric(key, getattr(row, field))
            paused.add_metric(key, 1 if row.paused else 0)
            if row.rate is not None:
                rate.add_metric(key, row.rate)
        yield jobs
        yield from (metric for metric, _ in gauges)
        yield from (metric for metric, _ in counters)
        yield paused
        yield rate
        for kind, name, text, value in (
            (GaugeMetricFamily, "run_jobs", "All jobs in the run.", status.jobs),
            (GaugeMetricFamily, "run_finished_jobs", "Jobs in terminal states.", status.finished),
            (GaugeMetricFamily, "run_complete", "1 once every job is terminal.", status.complete),
            (CounterMetricFamily, "transitions", "Execs settled.", status.transitions),
            (GaugeMetricFamily, "elapsed_seconds", "Seconds since the exec began.", status.elapsed),
        ):
            metric = family(kind, name, text, per_state=False)
            metric.add_metric(values, float(value))
            yield metric
