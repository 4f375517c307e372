"""What ``plaudit registry`` and ``plaudit feedback stats`` show a person: tables built with
``rich`` (colour only on a terminal), numbers rounded for reading; the ``--json`` forms for
scripts live beside them.

Every table is rendered from plain data (a manifest, the JSON form of feedback statistics), so
``plaudit status`` shows the same rows from what the services answer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

from rich import box
from rich.console import Console, RenderableType
from rich.table import Table

from plaudit.services.common.registry import ModelManifest

NON_TERMINAL_WIDTH = 240
"""Columns when the output is not a terminal (a pipe, a file, a test): wide enough not to wrap."""

DASH = "-"


def console(out: TextIO) -> Console:
    """A console on ``out``: the terminal's width and colour there, plain and wide elsewhere."""
    if out.isatty():
        return Console(file=out, highlight=False)
    return Console(
        file=out, width=NON_TERMINAL_WIDTH, no_color=True, highlight=False, color_system=None
    )


def render(out: TextIO, *items: RenderableType) -> None:
    """Print tables (or text) to ``out``, without the trailing spaces rich pads lines with."""
    con = console(out)
    with con.capture() as captured:
        for item in items:
            con.print(item)
    out.write("\n".join(line.rstrip() for line in captured.get().splitlines()) + "\n")


def number(value: float | int | None, digits: int = 3) -> str:
    """A number for people: integers as such, fractions to ``digits`` places (0.631), larger
    values with fewer; ``-`` for missing or non-finite."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return DASH
    if isinstance(value, int) or (float(value).is_integer() and abs(value) < 1e15):
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.{digits}f}"


def fraction(value: float | None) -> str:
    """A share or score (accuracy, agreement, kappa, p): three decimals, ``-`` when missing."""
    if value is None or not math.isfinite(value):
        return DASH
    return f"{value:.3f}"


def new_table(*columns: str, title: str | None = None) -> Table:
    table = Table(*columns, title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    return table


# -- registry -----------------------------------------------------------------------------------
def held_out(manifest: ModelManifest) -> tuple[float | None, int | None]:
    """The version's held-out score and its n: the gate's measurement of the served graph when
    there is one, else the trainer's (reward: preference accuracy; policy: win rate)."""
    gate = manifest.promotion or {}
    metrics = manifest.metrics
    if manifest.kind == "policy":
        win = gate.get("win_rate", metrics.get("eval/win_rate"))
        n = gate.get("eval_prompts") or metrics.get("eval/prompts")
        return win, None if n is None else int(n)
    if gate.get("candidate_accuracy") is not None:
        return float(gate["candidate_accuracy"]), int(gate.get("eval_pairs") or 0) or None
    acc = metrics.get("eval/accuracy")
    n = metrics.get("eval/pairs")
    return acc, None if n is None else int(n)


def gate_summary(manifest: ModelManifest, *, name_live: bool = True) -> tuple[str, str]:
    """(decision, why) of the version's promotion gate, in a few words each; ``name_live``
    names the version it was compared with when that is not the version's parent."""
    gate = manifest.promotion
    if not gate:
        return DASH, "no gate (exported or promoted by hand)"
    if manifest.kind == "policy":
        win, threshold = gate.get("win_rate"), gate.get("min_win_rate")
        decision = "passed" if gate.get("passed") else "refused"
        if "lc_win_rate" in gate:  # the gate with length control and a KL bound (issue 15)
            kl = gate.get("kl")
            why = (
                f"win {fraction(win)}, length-controlled {fraction(gate.get('lc_win_rate'))}, "
                f"KL {DASH if kl is None else format(kl, '.2f')} vs {gate.get('baseline')}"
            )
            if not gate.get("passed"):
                why = str(gate.get("reason", "")).rpartition("refused, ")[2] or why
        elif win is None:
            why = f"win rate not measured against {gate.get('baseline')}"
        else:
            sign = ">" if gate.get("passed") else "<="
            why = f"win rate {fraction(win)} {sign} {threshold:g} vs {gate.get('baseline')}"
        if gate.get("passed") and not gate.get("requested"):
            why += " (promotion not asked for)"
        return decision, why
    promoted = bool(gate.get("promoted"))
    decision = "passed" if promoted else "refused"
    candidate, current = gate.get("candidate_accuracy"), gate.get("current_accuracy")
    live = gate.get("current_version")
    tolerance = float(gate.get("tolerance") or 0)
    if live is None:
        parts = [f"{fraction(candidate)}, nothing was live"]
    elif current is None:
        parts = [f"live {live} could not be scored"]
    else:
        beats = gate.get("beats_live")  # None in records from before the significance floor
        signs = {None: ">=" if promoted else "<", True: ">", False: "<="}
        sign = signs[None if beats is None else bool(beats)]
        parts = [
            f"{fraction(candidate)} {sign} live {fraction(current)}"
            + (f" ({live})" if name_live and live != manifest.parent else "")
            + (f" - tolerance {tolerance:g}" if tolerance else "")
        ]
    if gate.get("p_value") is not None:
        p_value = f"p={gate['p_value']:.2g}"
        if gate.get("above_chance", True):
            parts.append(f"above chance ({p_value})")
        else:
            parts.append(f"not above chance ({p_value} > {gate.get('significance', 0.05):g})")
    return decision, "; ".join(parts)


def version_row(manifest: ModelManifest, promoted: str | None) -> dict[str, Any]:
    """The JSON form of one ``registry list`` row (full precision: for scripts)."""
    score, n = held_out(manifest)
    decision, why = gate_summary(manifest)
    return {
        "version": manifest.version,
        "kind": manifest.kind,
        "created_at": manifest.created_at.isoformat(),
        "backbone": manifest.backbone,
        "precision": manifest.default_precision,
        "promoted": manifest.version == promoted,
        "held_out": score,
        "held_out_n": n,
        "gate": decision,
        "gate_reason": why,
        "parent": manifest.parent,
        "data_cursor": manifest.data_cursor,
    }


def registry_table(
    manifests: Sequence[ModelManifest], promoted: str | None, *, kind: str = "reward"
) -> Table:
    """One row per version, oldest first; ``*`` marks the promoted (live) one."""
    score_name = "win rate (n)" if kind == "policy" else "held-out acc (n)"
    table = new_table(
        "", "version", "created", "backbone", "precision", score_name, "gate", "why",
        title=f"{kind} models ({len(manifests)}; * promoted)",
    )  # fmt: skip
    for m in manifests:
        score, n = held_out(m)
        decision, why = gate_summary(m)
        live = m.version == promoted
        table.add_row(
            "*" if live else "",
            f"[bold green]{m.version}[/]" if live else m.version,
            f"{m.created_at:%Y-%m-%d %H:%M}",
            m.backbone.rsplit("/", 1)[-1],
            m.default_precision,
            DASH if score is None else f"{fraction(score)} ({n if n is not None else '?'})",
            {"passed": "[green]passed[/]", "refused": "[red]refused[/]"}.get(decision, decision),
            why,
        )
    return table


def manifest_table(manifest: ModelManifest, promoted: str | None) -> Table:
    """``registry show``: one version, key by key, numbers rounded."""
    table = new_table("", "", title=f"{manifest.kind} model {manifest.version}")
    table.show_header = False
    score, n = held_out(manifest)
    decision, why = gate_summary(manifest)
    rows: list[tuple[str, str]] = [
        ("promoted", "yes (live)" if manifest.version == promoted else "no"),
        ("created", f"{manifest.created_at:%Y-%m-%d %H:%M:%S %Z}".strip()),
        ("parent", manifest.parent or DASH),
        ("backbone", manifest.backbone),
        ("precision", manifest.default_precision),
    ]
    if manifest.quantization is not None:
        q = manifest.quantization
        rows.append(
            (
                "int8",
                f"{'kept' if q.passed else 'refused'}: agreement {fraction(q.pairwise_agreement)}"
                f" (threshold {q.threshold:g}, n {q.pairs})",
            )
        )
    if manifest.lora_adapter is not None:
        a = manifest.lora_adapter
        over = f", trained over policy {a.stacked_on}" if a.stacked_on else ""
        rows.append(("LoRA adapter", f"{a.path}/ (rank {a.rank} on {a.base}{over})"))
    name = "win rate" if manifest.kind == "policy" else "held-out accuracy"
    rows.append((name, DASH if score is None else f"{fraction(score)} (n {n or '?'})"))
    rows.append(("gate", f"{decision}: {why}"))
    rows.append(("data cursor", manifest.data_cursor or DASH))
    norm = manifest.normalization
    rows.append(("normalization", f"mean {number(norm.mean)}, std {number(norm.std)}"))
    if manifest.calibration is not None:
        c = manifest.calibration
        ece = (
            f"ECE {number(c.ece_before)} -> {number(c.ece_after)}"
            if c.ece_before is not None and c.ece_after is not None
            else "ECE not measured"
        )
        how = f"fitted on {c.pairs} held-out pairs" if c.fitted else c.note
        rows.append(("calibration", f"temperature {number(c.temperature)} ({how}), {ece}"))
    elif manifest.kind == "reward":
        rows.append(("calibration", f"{DASH} (temperature 1)"))
    for key, value in sorted(manifest.metrics.items()):
        rows.append((key, number(value)))
    rows.append(("files", str(len(manifest.files))))
    for key, text in rows:
        table.add_row(f"[bold]{key}[/]", text)
    return table


# -- feedback statistics ------------------------------------------------------------------------
def agreement_text(stats: Mapping[str, Any]) -> tuple[str, str]:
    """(raw agreement, kappa) for people; a missing value says why it cannot be computed.

    ``stats`` is the JSON form of the statistics (:func:`plaudit.services.feedback.core.
    stats_json`, or ``GetStats`` turned into the same keys)."""
    annotators = len(stats.get("annotators", ()))
    overlap = int(stats.get("overlapping_items", 0))
    if overlap == 0:
        if annotators == 0:
            why = "no feedback yet"
        elif annotators == 1:
            why = "needs two annotators on the same items; 1 annotator so far"
        else:
            why = "needs two annotators on the same items; no item has two votes yet"
        return f"{DASH} ({why})", f"{DASH} ({why})"
    raw = stats.get("raw_agreement")
    raw_text = f"{fraction(raw)} over {overlap:,} items" if raw is not None else DASH
    kappa = stats.get("kappa")
    method = {"cohen": "Cohen's", "fleiss": "Fleiss'"}.get(str(stats.get("kappa_method")), "")
    if kappa is None:
        return raw_text, f"{DASH} (undefined: every vote on shared items is on one side)"
    return raw_text, f"{fraction(kappa)} ({method})".replace(" ()", "")


def feedback_tables(stats: Mapping[str, Any]) -> list[Table]:
    """``feedback stats``: counts and agreement, then one row per annotator."""
    summary = new_table("", "", title="feedback")
    summary.show_header = False
    by_kind = stats.get("records_by_kind", {})
    kinds = ", ".join(f"{k} {number(v)}" for k, v in sorted(by_kind.items()))
    raw, kappa = agreement_text(stats)
    rows = [
        ("records", f"{number(stats.get('records', 0))}" + (f" ({kinds})" if kinds else "")),
        ("annotators", number(len(stats.get("annotators", ())))),
        ("judgements", number(stats.get("judgements", 0))),
        ("pairs derived", number(stats.get("pairs_derived", 0))),
        ("raw agreement", raw),
        ("kappa", kappa),
        ("contradicted items", number(stats.get("contradictions", 0))),
        ("tied items", number(stats.get("ties", 0))),
    ]
    for key, text in rows:
        summary.add_row(f"[bold]{key}[/]", text)
    tables = [summary]
    annotators: Iterable[Mapping[str, Any]] = stats.get("annotators", ())
    people = new_table("annotator", "records", "compared votes", "disagreement", "p", "outlier")
    for a in annotators:
        compared = int(a.get("compared_votes", 0))
        people.add_row(
            str(a["annotator_id"]),
            number(a.get("records", 0)),
            number(compared),
            fraction(a.get("disagreement_rate")) if compared else DASH,
            fraction(a.get("p_value")) if compared else DASH,
            "[red]yes[/]" if a.get("outlier") else "",
        )
    if people.row_count:
        tables.append(people)
    return tables
