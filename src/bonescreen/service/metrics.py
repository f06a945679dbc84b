"""``/metrics``: Prometheus exposition through prometheus_client.

A custom collector reads the queue and result numbers from the database at
scrape time (they are facts of the shared store, the same from every
process) and this process's counters (images screened, C-STORE received and
refused, uploads, forwarding attempts) from its parts. One registry per
service, not the library's global one, so several services in one process
(tests) never mix their numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

if TYPE_CHECKING:  # pragma: no cover
    from bonescreen.service.runtime import Service

__all__ = ["CONTENT_TYPE_LATEST", "ServiceCollector", "render_metrics"]


def _gauge(name: str, doc: str, label: str, values: dict[str, int]) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=[label])
    for k, v in sorted(values.items()):
        g.add_metric([str(k) if k not in (None, "None") else "none"], float(v))
    return g


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=float(value))


class ServiceCollector(Collector):
    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Iterator[Any]:
        svc = self.service
        c = svc.store.counts()
        yield GaugeMetricFamily("bonescreen_up", "1 while this process serves", value=1.0)
        yield _gauge("bonescreen_jobs", "received images by queue status", "status", c["jobs"])
        yield _gauge("bonescreen_results", "results by category (none: skipped)", "category", c["results"])
        yield _gauge("bonescreen_results_flagged", "results by flag", "flagged", c["flagged"])
        yield _gauge("bonescreen_results_skipped", "images the gate skipped, by reason", "reason", c["skipped"])
        yield _gauge("bonescreen_review", "results by review status", "status", c["review"])
        yield _gauge("bonescreen_forward", "results by forwarding status (dead_letter: gave up)", "status",
                     c["forward"])
        live = [i for i in svc.store.instances() if i["heartbeat_age_s"] < 3 * svc.heartbeat_s + 5]
        yield GaugeMetricFamily("bonescreen_instances", "serve processes with a fresh heartbeat",
                                value=float(len(live)))
        w = svc.worker.stats if svc.worker is not None else None
        if w is not None:
            yield _counter("bonescreen_worker_images", "images screened by this process", w.images)
            yield _counter("bonescreen_worker_seconds", "seconds this process spent screening", w.seconds)
        if svc.scp is not None:
            yield _counter("bonescreen_dicom_received", "C-STORE objects accepted by this process",
                           svc.scp.received)
            yield _counter("bonescreen_dicom_refused", "C-STORE objects refused by this process", svc.scp.refused)
        yield _counter("bonescreen_http_uploads", "HTTP uploads accepted by this process", svc.http_uploads)
        yield _counter("bonescreen_http_refused", "HTTP uploads refused by this process", svc.http_refused)
        fw = svc.forwarder
        attempts = CounterMetricFamily("bonescreen_forward_attempts", "forwarding attempts by this process",
                                       labels=["outcome"])
        attempts.add_metric(["sent"], float(fw.sent))
        attempts.add_metric(["failed"], float(fw.failed))
        attempts.add_metric(["dead_letter"], float(fw.dead))
        yield attempts


def render_metrics(service: Service) -> bytes:
    reg = getattr(service, "_metrics_registry", None)
    if reg is None:
        reg = CollectorRegistry(auto_describe=False)
        reg.register(ServiceCollector(service))
        service._metrics_registry = reg  # type: ignore[attr-defined]
    return bytes(generate_latest(reg))
