"""The state of a run directory, read from its ledger and run.json (``evomerge status RUN_DIR``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from evomerge.heartbeat import liveness, read_heartbeat
from evomerge.racing import stopped_per_rung
from evomerge.run_dir import open_ledger, read_info, require_run_dir
from evomerge.selection import test_scores, winner
from evomerge.uncertainty import evidence_row, with_se


def run_status(run_dir: Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    require_run_dir(run_dir)
    info = read_info(run_dir)
    state = info.get("status", "unknown")
    reason = info.get("reason")
    alive, note = liveness(run_dir, info) if state == "running" else (False, "")
    if state == "running" and not alive:
        state, reason = "interrupted", note  # the controller died without saying so: `evomerge resume` continues it
    beat = read_heartbeat(run_dir) if state == "running" else None
    dispatched: set[int] = set()
    done: list[dict] = []
    rungs: list[dict] = []
    records = open_ledger(run_dir).records()
    for rec in records:
        if rec.get("kind") == "dispatch":
            dispatched.add(rec["trial_id"])
        elif rec.get("kind") == "trial":
            done.append(rec)
        elif rec.get("kind") == "rung":
            rungs.append(rec)
    finished_ids = {r["trial_id"] for r in done}
    complete = [r for r in done if r["state"] == "complete"]
    best, chosen = winner(records)  # with a validation split: the best there among the top trials
    tests = test_scores(records)
    sure = _uncertainty(run_dir, records, best, chosen)
    max_trials = int(info.get("max_trials") or 0)
    rate = eta = None
    times = sorted(r["finished_at"] for r in done)
    if len(times) >= 2 and times[-1] > times[0]:
        rate = (len(times) - 1) / (times[-1] - times[0]) * 3600.0
        if state == "running":
            eta = max(0, max_trials - len(done)) / rate * 3600.0
    return {
        "run_id": info.get("run_id", run_dir.name),
        "run_dir": str(run_dir),
        "experiment": info.get("experiment"),
        "state": state,
        "trials_done": len(done),
        "trials_failed": len(done) - len(complete),
        "trials_cached": sum(1 for r in done if r.get("cached_from")),
        "trials_running": len(dispatched - finished_ids) if state == "running" else 0,
        "max_trials": max_trials,
        "islands": info.get("islands"),
        "best_fitness": best["fitness"] if best else None,
        "best_trial": best["trial_id"] if best else None,
        "best_recipe_hash": best["recipe_hash"] if best else None,
        "best_validation": chosen["validation_fitness"] if chosen else None,
        "best_validation_corrected": chosen.get("validation_corrected") if chosen else None,
        "best_test": tests.get(best["recipe_hash"]) if best else None,
        "validated_trials": len(chosen["candidates"]) if chosen else 0,
        "trials_per_hour": rate,
        "eta_seconds": eta,
        "tracking_uri": info.get("tracking_uri"),
        "mlflow_run_id": info.get("mlflow_run_id"),
        "resumed": info.get("resumed", 0),
        "reason": reason,
        "note": note or None,
        "ray_address": info.get("ray_address"),
        "workers": (beat or {}).get("workers"),
        "racing": _racing(done, rungs),
        "standard_errors": {k: v for k, v in sure.items() if k != "evidence"},
        "evidence": sure.get("evidence"),
    }


def _uncertainty(run_dir: Path, records: list[dict], best: Optional[dict], chosen: Optional[dict]) -> dict[str, Any]:
    """The run's standard errors and evidence (see :mod:`evomerge.uncertainty`); {} for a run dir
    without its experiment copy."""
    from evomerge.run_dir import read_experiment_data
    from evomerge.uncertainty import run_uncertainty

    try:
        exp = read_experiment_data(run_dir)
    except OSError:
        return {}
    return run_uncertainty(records, exp["suite"], best, exp["base_model"], chosen)


def _racing(done: list[dict], rungs: list[dict]) -> Optional[dict[str, Any]]:
    """Racing runs: how many finished trials stopped at each rung, and the item evaluations."""
    stopped = stopped_per_rung(done)
    if not stopped:
        return None
    items = sum(int(n) for rec in rungs for n, _, _ in rec["tallies"].values())
    return {"stopped_at_rung": stopped, "item_evaluations": items}


def format_status(s: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [
        ("run", f"{s['run_id']} ({s['experiment']})"),
        ("state", s["state"] + ("  -> continue with: evomerge resume " + s["run_dir"]
                                if s["state"] in ("interrupted", "killed", "failed") else "")),
    ]
    if s.get("reason") and s["state"] != "finished":
        rows.append(("why", s["reason"]))
    if s.get("note"):
        rows.append(("note", s["note"]))
    if s.get("workers"):
        w = s["workers"]
        rows.append(("workers", f"{w['live']} live of {w['target']}" + (f", {w['starting']} starting" if w.get("starting") else "")
                     + (f", {w['restarting']} to be started again" if w.get("restarting") else "")
                     + (f" (Ray: {s['ray_address']})" if s.get("ray_address") else "")))
    rows += [
        ("trials", f"{s['trials_done']}/{s['max_trials']} done, {s['trials_failed']} failed, "
                   + (f"{s['trials_cached']} from the fitness cache, " if s.get("trials_cached") else "")
                   + f"{s['trials_running']} running ({s['islands']} island(s))"),
    ]
    if s.get("racing"):
        r = s["racing"]
        rows.append(("racing", "trials final at rung " + ", ".join(f"{k}: {n}" for k, n in enumerate(r["stopped_at_rung"]))
                     + f"; {r['item_evaluations']} item evaluations"))
    se = s.get("standard_errors") or {}
    if s["best_fitness"] is not None:
        rows.append(("best", f"{with_se(s['best_fitness'], se.get('search'))}  trial {s['best_trial']}, "
                             f"recipe {s['best_recipe_hash']}"))
        scores = [f"search {with_se(s['best_fitness'], se.get('search'))}"]
        if s.get("best_validation") is not None:
            scores.append(f"validation {with_se(s['best_validation'], se.get('validation'))} (chosen there among the top "
                          f"{s['validated_trials']} by search fitness"
                          + (f"; {s['best_validation_corrected']:.4f} less its winner's curse"
                             if s.get("best_validation_corrected") is not None else "") + ")")
        if s.get("best_test") is not None:
            scores.append(f"test {with_se(s['best_test'], (se.get('tests') or {}).get('best'))}")
        if len(scores) > 1:
            rows.append(("best's scores", ", ".join(scores)))
    row = evidence_row(s.get("evidence"))
    if row is not None:
        rows.append(row)
    if s["trials_per_hour"] is not None:
        eta = f", ETA {_duration(s['eta_seconds'])}" if s["eta_seconds"] is not None else ""
        rows.append(("rate", f"{s['trials_per_hour']:.0f} trials/hour{eta}"))
    if s["mlflow_run_id"]:
        rows.append(("mlflow", f"{s['tracking_uri']}  run {s['mlflow_run_id']}"))
    return rows


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
