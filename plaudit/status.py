"""``plaudit status``: one screen for a running system.

What it shows, and where each part comes from:

- each service's health (``grpc.health.v1``), the live model (reward: ``GetModel``; generation:
  its ``/metrics`` model info), queue depth and request rate (two ``/metrics`` scrapes
  ``--sample-s`` apart, taken before this command makes any call of its own);
- feedback counts and agreement (``GetStats``) and the pairs waiting for the next retraining
  (``ExportPreferences`` after the newest data cursor of any reward version, promoted or
  refused, out of ``--retrain-min-pairs``);
- the last reward and policy trainings with their gate numbers (the registry's manifests);
- the labelling page's address (and whether it answers).

The defaults are the ports ``plaudit up`` uses, so a bare ``plaudit status`` on the same machine
describes what ``plaudit up`` started. Nothing here raises for a service that is down: the
report says so. :func:`collect` builds the JSON form (``--json``); :func:`status_tables` renders
it for people.
"""

from __future__ import annotations

import logging
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from pydantic import Field
from rich.table import Table

from plaudit.services.common.registry import DEFAULT_MODEL_NAME, ModelManifest, ModelRegistry
from plaudit.services.common.security.client import ClientCredentials, ClientSecuritySettings
from plaudit.tables import (
    DASH,
    agreement_text,
    fraction,
    gate_summary,
    held_out,
    new_table,
    number,
)
from plaudit.up import UpSettings
from plaudit.v1 import feedback_pb2, feedback_pb2_grpc, reward_pb2, reward_pb2_grpc

log = logging.getLogger(__name__)

RPC_TIMEOUT_S = 3.0
SERVICES = ("feedback", "reward", "generation")


def _up_default(name: str) -> Any:
    return UpSettings.model_fields[name].default


class StatusSettings(ClientSecuritySettings):
    """Where the running system is; the defaults are what ``plaudit up`` starts."""

    addr: str = Field("127.0.0.1", description="host the services run on")
    home: Path = Field(_up_default("home"), description="plaudit up's folder (its registry)")
    registry: str = Field("", description="model registry (default: <home>/registry)")
    reward_port: int = Field(_up_default("reward_port"), ge=1, le=65535)
    reward_metrics_port: int = Field(_up_default("reward_metrics_port"), ge=0, le=65535)
    feedback_port: int = Field(_up_default("feedback_port"), ge=1, le=65535)
    feedback_metrics_port: int = Field(_up_default("feedback_metrics_port"), ge=0, le=65535)
    feedback_http_port: int = Field(
        _up_default("feedback_http_port"), ge=0, le=65535, description="labelling page port"
    )
    generation_port: int = Field(_up_default("generation_port"), ge=1, le=65535)
    generation_metrics_port: int = Field(_up_default("generation_metrics_port"), ge=0, le=65535)
    retrain_min_pairs: int = Field(
        _up_default("retrain_min_pairs"), ge=1, description="new pairs that trigger a retraining"
    )
    sample_s: float = Field(1.0, ge=0, description="request rates are measured over this long")

    @classmethod
    def for_up(cls, up: UpSettings) -> StatusSettings:
        """What ``plaudit up`` started with ``up``: its ports, home and credentials."""
        values = {
            name: getattr(up, name) for name in set(cls.model_fields) & set(type(up).model_fields)
        }
        return cls(addr="127.0.0.1", sample_s=0.0, **values)

    def address(self, service: str) -> str:
        return f"{self.addr}:{getattr(self, f'{service}_port')}"

    def metrics_url(self, service: str) -> str | None:
        port = getattr(self, f"{service}_metrics_port")
        return f"http://{self.addr}:{port}/metrics" if port else None

    @property
    def registry_root(self) -> str:
        return self.registry or str(self.home / "registry")


# -- metrics ------------------------------------------------------------------------------------
def scrape(url: str | None) -> dict[str, list[tuple[dict[str, str], float]]] | None:
    """A /metrics page as sample name -> [(labels, value)]; None when it does not answer."""
    if url is None:
        return None
    try:
        with urllib.request.urlopen(url, timeout=RPC_TIMEOUT_S) as resp:
            text = resp.read().decode()
    except (OSError, urllib.error.URLError):
        return None
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return samples


def _total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    return sum(value for labels, value in samples.get(name, []) if "Health" not in str(labels))


def _requests(samples: dict[str, list[tuple[dict[str, str], float]]]) -> float:
    """gRPC and HTTP requests served so far (health checks left out)."""
    return _total(samples, "plaudit_grpc_requests_total") + _total(
        samples, "plaudit_feedback_http_requests_total"
    )


def metrics_report(settings: StatusSettings) -> dict[str, dict[str, Any]]:
    """Per service: queue depth, requests per second over ``sample_s``, the live model info."""
    urls = {s: settings.metrics_url(s) for s in SERVICES}
    with ThreadPoolExecutor(len(SERVICES)) as pool:
        first = dict(zip(urls, pool.map(scrape, urls.values()), strict=True))
        started = time.monotonic()
        if settings.sample_s:
            time.sleep(settings.sample_s)
        second = dict(zip(urls, pool.map(scrape, urls.values()), strict=True))
        elapsed = time.monotonic() - started
    out: dict[str, dict[str, Any]] = {}
    for service in SERVICES:
        before, after = first[service], second[service]
        if after is None:
            out[service] = {"metrics": "not reachable" if urls[service] else "off"}
            continue
        report: dict[str, Any] = {"metrics": urls[service], "requests": _requests(after)}
        if before is not None and elapsed > 0 and settings.sample_s:
            report["requests_per_s"] = max(_requests(after) - _requests(before), 0) / elapsed
        depth = after.get(f"plaudit_{service}_queue_depth")
        if depth:
            report["queue_depth"] = int(depth[0][1])
        info = after.get(f"plaudit_{service}_model_info")
        if info:
            report["model_version"] = info[0][0].get("version")
        out[service] = report
    return out


# -- gRPC ---------------------------------------------------------------------------------------
def _rpc_error(exc: grpc.RpcError) -> str:
    code = exc.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return "not running"
    return f"{code.name}: {exc.details()}"


def health(address: str, credentials: ClientCredentials) -> str:
    """SERVING, NOT_SERVING (up, no model yet) or why it could not be asked."""
    with credentials.channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S
            )
        except grpc.RpcError as exc:
            return _rpc_error(exc)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def reward_model(address: str, credentials: ClientCredentials) -> dict[str, Any]:
    """The reward service's live model (``GetModel``), or the error."""
    with credentials.channel(address) as channel:
        try:
            reply = reward_pb2_grpc.RewardServiceStub(channel).GetModel(
                reward_pb2.GetModelRequest(), timeout=RPC_TIMEOUT_S
            )
        except grpc.RpcError as exc:
            return {"error": _rpc_error(exc)}
    return {
        "model_version": reply.version,
        "precision": reply.precision,
        "last_swap_error": reply.last_swap_error,
        "calibration_temperature": reply.calibration_temperature,
        "heldout_accuracy": reply.heldout_accuracy if reply.heldout_pairs else None,
        "heldout_ece": reply.heldout_ece if reply.heldout_pairs else None,
        "heldout_pairs": reply.heldout_pairs,
        "data_cursor": reply.data_cursor or None,
    }


def feedback_report(
    address: str, credentials: ClientCredentials, cursor: str | None
) -> dict[str, Any]:
    """``GetStats`` in the JSON form of ``feedback stats``, and the pairs after ``cursor``."""
    with credentials.channel(address) as channel:
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
        try:
            stats = stub.GetStats(feedback_pb2.GetStatsRequest(), timeout=RPC_TIMEOUT_S)
            waiting = 0
            request = feedback_pb2.ExportPreferencesRequest(cursor=cursor or "", page_size=1000)
            for page in stub.ExportPreferences(request, timeout=60):
                waiting += len(page.pairs)
        except grpc.RpcError as exc:
            return {"error": _rpc_error(exc)}
    return {
        "records": stats.records,
        "records_by_kind": dict(stats.records_by_kind),
        "annotators": [
            {
                "annotator_id": a.annotator_id,
                "records": a.records,
                "compared_votes": a.compared_votes,
                "outlier": a.outlier,
            }
            for a in stats.annotators
        ],
        "judgements": stats.judgements,
        "pairs_derived": stats.pairs_derived,
        "overlapping_items": stats.overlapping_items,
        "raw_agreement": stats.raw_agreement if stats.HasField("raw_agreement") else None,
        "kappa": stats.kappa if stats.HasField("kappa") else None,
        "kappa_method": stats.kappa_method,
        "contradictions": stats.contradictions,
        "ties": stats.ties,
        "pairs_waiting": waiting,
        "after_cursor": cursor,
    }


# -- registry -----------------------------------------------------------------------------------
def _training(manifest: ModelManifest | None, promoted: str | None) -> dict[str, Any] | None:
    if manifest is None:
        return None
    score, n = held_out(manifest)
    decision, why = gate_summary(manifest, name_live=False)
    return {
        "version": manifest.version,
        "created_at": manifest.created_at.isoformat(),
        "held_out": score,
        "held_out_n": n,
        "gate": decision,
        "gate_reason": why,
        "live": manifest.version == promoted,
    }


def _model_report(registry: ModelRegistry) -> dict[str, Any]:
    """One model's promoted version, versions, data cursor and last training (the newest gated
    version)."""
    manifests = registry.list_versions()
    promoted = registry.promoted()
    trained = [m for m in manifests if m.promotion]
    cursors = [int(c) for m in manifests if (c := m.data_cursor or "").isdigit()]
    return {
        "promoted": promoted,
        "versions": len(manifests),
        "data_cursor": str(max(cursors)) if cursors else None,
        "last_training": _training(trained[-1] if trained else None, promoted),
    }


def registry_report(root: str) -> dict[str, Any]:
    """Per kind, the default model (:func:`_model_report`); under ``named``, each named model
    with a promoted version, as ``kind/name``."""
    out: dict[str, Any] = {"root": root, "named": {}}
    for kind in ("reward", "policy"):
        try:
            registry = ModelRegistry(root, kind)
            out[kind] = _model_report(registry)
            for name in registry.model_names():
                if name != DEFAULT_MODEL_NAME:
                    out["named"][f"{kind}/{name}"] = _model_report(registry.named(name))
        except Exception as exc:  # a remote registry without credentials, a torn file...
            out[kind] = {"error": str(exc)}
    return out


# -- the whole report ---------------------------------------------------------------------------
def labelling_page(settings: StatusSettings) -> dict[str, Any]:
    if not settings.feedback_http_port:
        return {"url": None, "reachable": False}
    url = f"http://{settings.addr}:{settings.feedback_http_port}/"
    try:
        with urllib.request.urlopen(url, timeout=RPC_TIMEOUT_S):
            reachable = True
    except urllib.error.HTTPError:
        reachable = True  # it answered
    except OSError:
        reachable = False
    return {"url": url, "reachable": reachable}


def collect(settings: StatusSettings) -> dict[str, Any]:
    """The JSON form of the status screen. Metrics are scraped first, so the rates do not count
    this command's own calls."""
    metrics = metrics_report(settings)
    credentials = settings.credentials
    registry = registry_report(settings.registry_root)
    services: dict[str, Any] = {}
    for service in SERVICES:
        entry: dict[str, Any] = {
            "address": settings.address(service),
            "health": health(settings.address(service), credentials),
            **metrics[service],
        }
        if service == "reward" and entry["health"] != "not running":
            entry.update(reward_model(settings.address(service), credentials))
        services[service] = entry
    # pairs after the newest data any reward version was trained on, promoted or refused: what
    # the scheduler of `plaudit up` counts before it retrains again
    cursor = (registry.get("reward") or {}).get("data_cursor")
    feedback: dict[str, Any] = {"error": "not running"}
    if services["feedback"]["health"] != "not running":
        feedback = feedback_report(settings.address("feedback"), credentials, cursor)
    feedback["retrain_min_pairs"] = settings.retrain_min_pairs
    return {
        "services": services,
        "feedback": feedback,
        "registry": registry,
        "labelling_page": labelling_page(settings),
    }


def _health_text(health_: str) -> str:
    colour = {"SERVING": "green", "NOT_SERVING": "yellow"}.get(health_, "red")
    return f"[{colour}]{health_.lower().replace('_', ' ')}[/]"


def status_tables(report: dict[str, Any]) -> list[Table | str]:
    """The status screen for people: services, feedback, trainings, the labelling page."""
    services = new_table(
        "service", "address", "health", "live model", "queue", "req/s", title="services"
    )
    for name, s in report["services"].items():
        version = s.get("model_version") or (DASH if name != "feedback" else "")
        if s.get("last_swap_error"):
            version += f" [red](swap failed: {s['last_swap_error']})[/]"
        rate = s.get("requests_per_s")
        services.add_row(
            name,
            s["address"],
            _health_text(s["health"]),
            version,
            number(s["queue_depth"]) if "queue_depth" in s else "",
            DASH if rate is None else f"{rate:.1f}",
        )
    out: list[Table | str] = [services]

    fb = report["feedback"]
    feedback = new_table("", "", title="feedback")
    feedback.show_header = False
    if "error" in fb:
        feedback.add_row("[bold]feedback service[/]", f"[red]{fb['error']}[/]")
    else:
        kinds = ", ".join(f"{k} {number(v)}" for k, v in sorted(fb["records_by_kind"].items()))
        raw, kappa = agreement_text(fb)
        rows = [
            ("records", f"{number(fb['records'])}" + (f" ({kinds})" if kinds else "")),
            ("annotators", number(len(fb["annotators"]))),
            ("pairs derived", number(fb["pairs_derived"])),
            (
                "waiting for retraining",
                f"{number(fb['pairs_waiting'])} new pairs; "
                + (
                    f"retraining starts at {number(fb['retrain_min_pairs'])}"
                    if fb["pairs_waiting"] < fb["retrain_min_pairs"]
                    else "a retraining is due (or running)"
                ),
            ),
            ("raw agreement", raw),
            ("kappa", kappa),
        ]
        for key, text in rows:
            feedback.add_row(f"[bold]{key}[/]", text)
    out.append(feedback)

    trainings = new_table(
        "kind", "promoted", "last training", "held-out (n)", "gate", "why", title="trainings"
    )
    registry = report["registry"]
    models = {k: registry.get(k) or {} for k in ("reward", "policy")} | (
        registry.get("named") or {}
    )
    for kind, entry in models.items():  # the default models, then each named one (kind/name)
        if "error" in entry:
            trainings.add_row(kind, f"[red]{entry['error']}[/]", "", "", "", "")
            continue
        last = entry.get("last_training")
        promoted = entry.get("promoted") or DASH
        if last is None:
            trainings.add_row(kind, promoted, "none yet", "", "", "")
            continue
        n = last["held_out_n"]
        trainings.add_row(
            kind,
            promoted,
            last["version"],
            f"{fraction(last['held_out'])} ({n if n is not None else '?'})",
            last["gate"],
            last["gate_reason"],
        )
    out.append(trainings)
    page = report["labelling_page"]
    if page["url"] is None:
        out.append("labelling page: on a free port (see the feedback service's log)")
    else:
        state = "" if page["reachable"] else " [red](not answering)[/]"
        out.append(f"labelling page: {page['url']}{state}")
    return out


def print_status(up: UpSettings) -> None:
    """``plaudit up``'s summary: the status screen of what it started, on stdout (a failure to
    build it is logged, never raised: the loop goes on)."""
    from plaudit.tables import render

    try:
        render(sys.stdout, *status_tables(collect(StatusSettings.for_up(up))))
        sys.stdout.flush()
    except Exception:
        log.warning("could not show the status", exc_info=True)


def is_down(report: dict[str, Any]) -> bool:
    """True when the reward or feedback service does not answer (generation is optional)."""
    return any(report["services"][s]["health"] == "not running" for s in ("feedback", "reward"))
