"""`ssm2d study`: the experiments of a study file, trained once per unique run, resumable.

Each unique run (model, resolved recipe, seed) trains into `DIR/runs/<id>/` with the trainer of
`ssm2d train` (always with resume, so a run killed mid-training continues from its `last.pt`),
then the evaluations its experiments ask for run on its final weights. After every finished run
`DIR/study.json` is rewritten atomically, so a killed study re-run with the same command repeats
no finished run. `resume_from` seeds it with the finished records of an earlier study (e.g. the
committed `docs/results.json`), each checked against the run it stands for.

The study ends with a timing pass (`study_timing`) over the arms' models that have no timing entry
yet; `time_study` (`ssm2d study --timing`) times them again without training. study.json keeps the
entries under "timing", the fair cost column of the report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .config import RUN_RECORD_KEY, ConfigError
from .inference import load_trained_model
from .folder_lock import folder_lock
from .io import write_text_atomic
from .study_config import PlannedRun, StudyPlan, describe_difference, run_hash
from .study_evals import kernel_rank, resolution_accuracy
from .study_timing import (
    DEFAULT_TIMING, QUICK_TIMING, TimingSettings, measured_alike, merged_timing, timed_configs, timing_header,
    timing_key, timing_of, timing_pass, train_steps_per_epoch,
)
from .trainer import train

__all__ = ["FORMAT", "run_study", "study_payload", "time_study"]

log = logging.getLogger("ssm2d.study")

FORMAT = 1  # version of study.json's layout


def _steps_per_epoch(run: PlannedRun, folder: Path) -> int:
    """The run's optimizer steps per epoch: from the run record of its folder's config.yaml when
    that holds this run, else by the trainer's rule on the data set (`train_steps_per_epoch`)."""
    path = folder / "config.yaml"
    written = yaml.safe_load(path.read_text()) if path.is_file() else None
    if isinstance(written, dict) and isinstance(written.get(RUN_RECORD_KEY), dict):
        config = {k: v for k, v in written.items() if k != RUN_RECORD_KEY}
        if run_hash(config) == run.hash and "steps_per_epoch" in written[RUN_RECORD_KEY]:
            return written[RUN_RECORD_KEY]["steps_per_epoch"]
    return train_steps_per_epoch(run.config)


def _record(run: PlannedRun, summary: dict[str, Any], steps_per_epoch: int) -> dict[str, Any]:
    history = summary["history"]
    first = run.uses[0]
    config = {k: v for k, v in run.config.to_dict().items() if k != "output"}
    return {
        "id": run.id, "config_hash": run.hash, "experiment": first["experiment"], "model": run.config.model,
        "seed": run.config.seed, "settings": first["settings"], "uses": run.uses, "config": config,
        "params": summary["params"], "epochs": summary["epochs"], "history": history,
        "final_acc1": summary["final"]["val_acc1"], "final_loss": summary["final"]["val_loss"],
        "best_acc1": summary["best_acc1"], "best_epoch": summary["best_epoch"],
        "epoch_seconds": statistics.fmean(row["epoch_seconds"] for row in history),
        "steps_per_epoch": steps_per_epoch, "evaluations": {},
    }  # fmt: skip


def _evaluate(run: PlannedRun, record: dict[str, Any], folder: Path, missing: list[str]) -> None:
    """Run the evaluations `missing` on the run's final weights (its last.pt) into `record`."""
    model, state = load_trained_model(folder / "last.pt")
    args = state["model_args"]
    size = args["img_size"]  # model_args always hold the data set's (H, W)
    input_size = (args["in_chans"], *size)
    for name in missing:
        if name == "resolution":
            sizes = run.evaluations["resolution"]["sizes"]
            record["evaluations"]["resolution"] = resolution_accuracy(model, run.config, args, sizes)
        else:
            record["evaluations"]["kernel_rank"] = kernel_rank(model, input_size)


def _needs(run: PlannedRun, record: dict[str, Any]) -> list[str]:
    """Evaluations the run's experiments ask for that its record lacks (or has for other sizes)."""
    have = record.get("evaluations", {})
    missing = [name for name in run.evaluations if name not in have]
    if "resolution" in have and "resolution" in run.evaluations:
        sizes = {r["img_size"] for r in have["resolution"]}
        if sizes != set(run.evaluations["resolution"]["sizes"]):
            missing.append("resolution")
    return missing


def _read_study_json(path: Path, source: str) -> dict[str, Any]:
    """The payload of a study.json; ConfigError (naming `source`) when it is not one."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{source}: cannot read {path} as a study.json ({err})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or not isinstance(payload.get("runs"), dict):
        raise ConfigError(f"{source}: {path} is not a study.json of format {FORMAT} (written by `ssm2d study`)")
    return payload


def _planned_records(payload: dict[str, Any], path: Path, plan: StudyPlan, source: str) -> dict[str, dict[str, Any]]:
    """The finished records of a study.json's payload (read from `path`) that belong to `plan`,
    each checked against its run.

    Raises:
        ConfigError: a record of a planned run was trained with another resolved config (a changed
            recipe needs a new output folder).
    """
    records = {}
    for run_id, record in payload["runs"].items():
        run = plan.runs.get(run_id)
        if run is None:
            log.info("%s: %s is not in this study's plan; dropped", source, run_id)
            continue
        if record.get("config_hash") != run.hash or run_hash(record.get("config", {})) != run.hash:
            planned = {k: v for k, v in run.config.to_dict().items() if k != "output"}
            raise ConfigError(
                f"{source}: run {run_id} in {path} was trained with another config "
                f"({describe_difference(record.get('config', {}), planned)}); use a new --output, or remove the "
                "record to retrain it"
            )
        first = run.uses[0]  # the plan names the experiments that use the run now
        records[run_id] = {**record, "experiment": first["experiment"], "settings": first["settings"], "uses": run.uses}
    return records


def study_payload(
    plan: StudyPlan, records: dict[str, dict[str, Any]], command: str | None, timing: dict[str, Any] | None = None
) -> dict[str, Any]:
    """study.json: the plan (experiments, arms, the run of each seed and the timing entry each arm
    is costed by), the finished records, and the timing object (None before the first pass)."""
    experiments = {}
    for exp in plan.experiments:
        arms = [
            {"label": a.label, "model": a.model, "settings": a.settings, "timed_as": timing_key(a.model, a.settings),
             "runs": {str(seed): run_id for seed, run_id in plan.arm_runs[(exp.name, a.label)].items()}}
            for a in exp.arms
        ]  # fmt: skip
        experiments[exp.name] = {
            "claim": exp.claim, "arms": arms, "evaluations": exp.evaluations, "pairs": exp.pairs, "plot": exp.plot
        }
    runs = {run_id: records[run_id] for run_id in plan.runs if run_id in records}
    return {
        "format": FORMAT, "config": plan.source, "command": command, "quick": plan.quick, "recipe": plan.recipe,
        "seeds": plan.seeds, "experiments": experiments, "timing": timing, "runs": runs,
    }  # fmt: skip


def _selected(plan: StudyPlan, only: list[str] | None, models: list[str] | None) -> set[str]:
    """The experiments of `only` (default: all), after checking `only` and `models` against the plan."""
    names = [e.name for e in plan.experiments]
    unknown = [n for n in only or [] if n not in names]
    if unknown:
        raise ConfigError(f"--only: unknown experiments {', '.join(unknown)}; the study has {', '.join(names)}")
    planned = sorted({r.config.model for r in plan.runs.values()})
    unknown = [m for m in models or [] if m not in planned]
    if unknown:
        raise ConfigError(f"--models: unknown models {', '.join(unknown)}; the study trains {', '.join(planned)}")
    return set(only or names)


def _load(
    plan: StudyPlan, out: Path, resume_from: str | Path | None
) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None, str | None]:
    """The records, the timing object and the command of `resume_from` and of `out/study.json`
    (which wins); records of an older ssm2d get their `steps_per_epoch`."""
    sources = [] if resume_from is None else [(Path(resume_from), "--resume-from")]
    if (out / "study.json").is_file():
        sources.append((out / "study.json", "study.json"))
    records: dict[str, dict[str, Any]] = {}
    timing, command = None, None
    for path, source in sources:
        payload = _read_study_json(path, source)
        records.update(_planned_records(payload, path, plan, source))
        timing = merged_timing(timing, timing_of(payload, path, source))
        command = payload.get("command")
    for run_id, record in records.items():
        if "steps_per_epoch" not in record:
            record["steps_per_epoch"] = _steps_per_epoch(plan.runs[run_id], out / "runs" / run_id)
    return records, timing, command


def _write(out: Path, payload: dict[str, Any]) -> None:
    write_text_atomic(out / "study.json", json.dumps(payload, indent=1) + "\n")


def _with_disk_timing(out: Path, timed: dict[str, Any] | None) -> dict[str, Any] | None:
    """`timed` merged over the timing object in DIR/study.json now: a `--timing` pass in another
    process may have written entries since this study loaded the file, and a rewrite must keep them."""
    path = out / "study.json"
    try:
        on_disk = timing_of(json.loads(path.read_text()), path, "study.json") if path.is_file() else None
    except (OSError, json.JSONDecodeError, ConfigError):
        return timed  # the file is written atomically: unreadable means not ours to merge
    return merged_timing(on_disk, timed)


def run_study(
    plan: StudyPlan,
    output: str | Path,
    only: list[str] | None = None,
    models: list[str] | None = None,
    resume_from: str | Path | None = None,
    command: str | None = None,
    train_fn: Callable[..., dict[str, Any]] = train,
    timing_settings: TimingSettings | None = None,
    seeds: list[int] | None = None,
) -> dict[str, Any]:
    """Train and evaluate every planned run that has no finished record, then time the training
    step of the arms' models that have no timing entry; returns the payload.

    Args:
        plan: from `load_study`.
        output: DIR: `DIR/study.json` and the run folders `DIR/runs/<id>/`.
        only: experiment names whose runs to train and models to time (default: all); the other
            records and timing entries are kept.
        models: model names whose runs to train and time (default: all), within `only`.
        seeds: the seeds whose runs to train (default: the plan's), within `only` and `models`;
            the timing pass is not restricted. Several processes, each with its own `output` and
            seeds, share a study's training; `resume_from` merges their records afterwards.
        resume_from: a study.json of an earlier study whose finished records and timing entries
            are taken over (those already in DIR/study.json win).
        command: the command line, recorded in the JSON.
        train_fn: the trainer (`ssm2d.train.train`); tests count its calls.
        timing_settings: how the closing timing pass measures (default `DEFAULT_TIMING`); the arms
            whose entry was measured otherwise (or at another thread count) are timed again. A
            --quick plan skips the pass unless this is given (its smoke test stays as fast as its
            training; `time_study` times it with `QUICK_TIMING`).

    Raises:
        ConfigError: another process runs a study in DIR (`folder_lock`; `time_study` may run
            beside it), or DIR/study.json or `resume_from` is not a study.json or holds a run
            trained with another config, or `only`, `models` or `seeds` names what the plan lacks.
    """
    out = Path(output)
    selected = _selected(plan, only, models)
    unknown = sorted(set(seeds or []) - set(plan.seeds))
    if unknown:
        known = ", ".join(map(str, plan.seeds))
        raise ConfigError(f"--seeds: unknown seeds {', '.join(map(str, unknown))}; the study's seeds are {known}")
    todo = [
        r for r in plan.runs.values()
        if any(u["experiment"] in selected for u in r.uses) and (models is None or r.config.model in models)
        and (seeds is None or r.config.seed in seeds)
    ]  # fmt: skip
    with folder_lock(out, "--output"):  # one training study per folder; --timing may run beside it
        return _run_study(plan, out, selected, models, todo, resume_from, command, train_fn, timing_settings)


def _run_study(
    plan: StudyPlan,
    out: Path,
    selected: set[str],
    models: list[str] | None,
    todo: list[PlannedRun],
    resume_from: str | Path | None,
    command: str | None,
    train_fn: Callable[..., dict[str, Any]],
    timing_settings: TimingSettings | None,
) -> dict[str, Any]:
    """`run_study` in its folder, under the folder's lock: trains `todo`, times `selected`'s arms."""
    records, timed, _ = _load(plan, out, resume_from)
    _write(out, study_payload(plan, records, command, timed))
    for i, run in enumerate(todo):
        folder = out / "runs" / run.id
        record = records.get(run.id)
        if record is not None and not _needs(run, record):
            continue
        if record is None or not (folder / "last.pt").is_file():  # a record without weights: train again
            log.info("study: run %d/%d: %s", i + 1, len(todo), run.id)
            summary = train_fn(dataclasses.replace(run.config, output=str(folder)), True)
            evaluations = {} if record is None else record["evaluations"]
            record = {**_record(run, summary, _steps_per_epoch(run, folder)), "evaluations": evaluations}
        missing = _needs(run, record)
        if missing:
            log.info("study: %s: evaluations %s", run.id, ", ".join(missing))
            _evaluate(run, record, folder, missing)
        records[run.id] = record
        timed = _with_disk_timing(out, timed)
        _write(out, study_payload(plan, records, command, timed))
    settings = timing_settings or (None if plan.quick else DEFAULT_TIMING)
    if settings is None:
        return study_payload(plan, records, command, timed)
    timed = _with_disk_timing(out, timed)
    alike = measured_alike(timed, timing_header(plan, settings))
    configs = timed_configs(plan, selected, models)
    untimed = {k: c for k, c in configs.items() if not alike or k not in timed["models"]}
    if untimed:
        log.info("study: timing the training step of %s", ", ".join(untimed))
        timed = timing_pass(plan, untimed, timed, settings, command)
        _write(out, study_payload(plan, records, command, timed))
    return study_payload(plan, records, command, timed)


def time_study(
    plan: StudyPlan,
    output: str | Path,
    only: list[str] | None = None,
    models: list[str] | None = None,
    resume_from: str | Path | None = None,
    command: str | None = None,
    timing_settings: TimingSettings | None = None,
) -> dict[str, Any]:
    """Time the training step of the arms' models again, train nothing; returns the payload.

    The models of the arms of `only` (default: all experiments) and `models` (default: all) are
    timed together, with the reference, and their entries replace those in DIR/study.json's timing
    object; the other entries and every record are kept, and so is the study's command (this
    `command` goes into the timing object). The arguments are `run_study`'s, but `timing_settings`
    defaults to `QUICK_TIMING` for a --quick plan (1 round of 1 step after 1 warm-up step).
    """
    out = Path(output)
    selected = _selected(plan, only, models)
    records, timed, trained_by = _load(plan, out, resume_from)
    settings = timing_settings or (QUICK_TIMING if plan.quick else DEFAULT_TIMING)
    timed = timing_pass(plan, timed_configs(plan, selected, models), timed, settings, command)
    payload = study_payload(plan, records, trained_by or command, timed)
    _write(out, payload)
    return payload
