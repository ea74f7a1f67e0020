"""`ssm2d study`: the study file, the plan of unique runs, resuming, and the rendered report.

Training tests use synthetic IDX files (tests/datasets/dataset_files.py), so they never skip for
lack of Fashion-MNIST; only the --quick smoke test of configs/study.yaml needs the real data.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "datasets"))
from dataset_files import make_idx  # noqa: E402

from ssm2d.cli import main  # noqa: E402
from ssm2d.data import DatasetError, dataset_info  # noqa: E402
from ssm2d.train import ConfigError, train  # noqa: E402
from ssm2d.train import study_timing  # noqa: E402
from ssm2d.train.folder_lock import folder_lock  # noqa: E402
from ssm2d.train.study import run_study, time_study  # noqa: E402
from ssm2d.train.study_config import load_study  # noqa: E402
from ssm2d.train.study_evals import spectrum_summary  # noqa: E402
from ssm2d.train.study_report import (  # noqa: E402
    UNTIMED_NOTE, arm_rows, cost_text, paired, render_results, summary_sentence, table, verdict,
)
from ssm2d.train.study_timing import (  # noqa: E402
    TimingSettings, time_training_steps, timing_key, train_steps_per_epoch,
)

ROOT = Path(__file__).resolve().parents[2]

# A tiny recipe on synthetic 28 x 28 IDX data: 40 training images, batch 8, one epoch.
RECIPE = dict(dataset="fashion_mnist", epochs=1, batch_size=8, lr=1e-3, warmup_epochs=0.0, mixup=0.0, cutmix=0.0,
              auto_augment=None, re_prob=0.0, repeated_aug=1, drop_path=0.0, crop_padding=0, hflip=0.0,
              label_smoothing=0.0, workers=0, val_batch_size=20)  # fmt: skip
TINY = TimingSettings(rounds=1, steps=1, warmup=0)  # the closing timing pass at its cheapest


def _study_file(tmp_path: Path, data_dir: Path, **changes) -> Path:
    study = {
        "recipe": {**RECIPE, "data_dir": str(data_dir)},
        "seeds": [0, 1],
        "quick": {"seeds": [0], "train_fraction_scale": 0.5},
        "experiments": {
            "pe": {"claim": "the SSM helps", "models": ["vit_mini_28", "vit_mini_28_ssm2d"],
                   "pairs": [{"a": "vit_mini_28_ssm2d", "b": "vit_mini_28", "expect": "better"}]},
            "fraction": {"claim": "data", "models": ["vit_mini_28"], "plot": "train_fraction",
                         "settings": [{"train_fraction": 0.5}, {"train_fraction": 1.0}]},
            "rank": {"claim": "rank", "models": ["vit_mini_28_ssm2d", "vit_mini_28_s4nd"], "plot": "resolution",
                     "evaluations": {"resolution": {"sizes": [36]}, "kernel_rank": {}}},
            "spectrum": {"claim": "rank", "models": ["vit_mini_28_ssm2d", "vit_mini_28_s4nd"], "plot": "spectrum"},
        },
    }  # fmt: skip
    for key, value in changes.items():
        study[key] = value
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


@pytest.fixture
def data_dir(tmp_path):
    make_idx(tmp_path / "fmnist", n_train=40, n_val=20)
    return tmp_path / "fmnist"


def test_plan_trains_shared_runs_once(tmp_path, data_dir):
    plan = load_study(_study_file(tmp_path, data_dir))
    # pe: 2 models x 2 seeds; fraction 1.0 is the recipe's = vit_mini_28 of pe; rank's ssm2d is pe's.
    assert list(plan.runs) == [
        "vit_mini_28/seed0", "vit_mini_28_ssm2d/seed0", "vit_mini_28/seed1", "vit_mini_28_ssm2d/seed1",
        "vit_mini_28/train_fraction=0.5/seed0", "vit_mini_28/train_fraction=0.5/seed1",
        "vit_mini_28_s4nd/seed0", "vit_mini_28_s4nd/seed1",
    ]  # fmt: skip
    shared = plan.runs["vit_mini_28/seed0"]
    assert [(u["experiment"], u["arm"]) for u in shared.uses] == [
        ("pe", "vit_mini_28"), ("fraction", "vit_mini_28 [train_fraction=1.0]")]
    shared_arm = plan.arm_runs[("fraction", "vit_mini_28 [train_fraction=1.0]")]
    assert shared_arm == {0: "vit_mini_28/seed0", 1: "vit_mini_28/seed1"}
    assert list(plan.runs["vit_mini_28_ssm2d/seed1"].evaluations) == ["resolution", "kernel_rank"]
    assert plan.runs["vit_mini_28/seed0"].evaluations == {}
    assert plan.runs["vit_mini_28/seed0"].hash != plan.runs["vit_mini_28/seed1"].hash

    quick = load_study(_study_file(tmp_path, data_dir), quick=True)
    assert quick.seeds == [0] and len(quick.runs) == 4  # the scaled 0.5 x 0.5 fraction is its own run
    assert quick.runs["vit_mini_28/seed0"].config.train_fraction == 0.5
    assert quick.runs["vit_mini_28/train_fraction=0.25/seed0"].uses[0]["arm"] == "vit_mini_28 [train_fraction=0.5]"


def test_the_shipped_study_config():
    plan = load_study(ROOT / "configs" / "study.yaml")
    assert [e.name for e in plan.experiments] == [
        "pe_ablation", "spatial_layers", "sample_efficiency", "resolution", "kernel_rank", "variants"]
    assert len(plan.seeds) >= 3
    for exp in plan.experiments:
        for arm in exp.arms:
            assert set(plan.arm_runs[(exp.name, arm.label)]) == set(plan.seeds), arm.label
    assert "vit_mini_28_dwconv" in {a.model for a in plan.experiment("spatial_layers").arms}
    recipe = {k: v for k, v in plan.runs["vit_mini_28/seed0"].config.to_dict().items() if k not in ("model", "seed")}
    for run in plan.runs.values():  # one recipe: runs differ only in model, seed and their settings
        settings = {k for u in run.uses for k in u["settings"]}
        differ = {k for k, v in run.config.to_dict().items() if k not in ("model", "seed") and recipe[k] != v}
        assert differ <= settings, (run.id, differ)
    assert len(load_study(ROOT / "configs" / "study.yaml", quick=True).seeds) == 1


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(recipe={**RECIPE, "model": "vit_mini_28"}), "recipe: model are set per run by the study"),
        (dict(recipe={**RECIPE, "epochz": 1}), r"unknown keys epochz \(did you mean epochs\?\)"),
        (dict(seeds=[0, 0]), "seeds: expected a non-empty list of distinct integer seeds"),
        (dict(seeds=[]), "seeds: expected a non-empty list"),
        (dict(extra=1), "unknown keys extra; valid keys: recipe, seeds, quick, experiments"),
        (dict(experiments={"e": {"models": ["vit_mini_28"]}}), "experiments.e: missing claim"),
        (dict(experiments={"e": {"claim": "c", "models": []}}), "experiments.e.models: expected a non-empty list"),
        (dict(experiments={"e": {"claim": "c", "models": ["m"], "plots": "bars"}}), "experiments.e: unknown keys plots"),
        (dict(experiments={"e": {"claim": "c", "models": ["m"], "plot": "pie"}}), "experiments.e.plot: expected one of"),
        (dict(experiments={"e": {"claim": "c", "models": ["m"], "settings": [{"lr": "fast"}]}}),
         "experiments.e.settings\\[0\\]: lr: expected float"),
        (dict(experiments={"e": {"claim": "c", "models": ["m"], "evaluations": {"speed": {}}}}),
         "experiments.e.evaluations: unknown keys speed"),
        (dict(experiments={"e": {"claim": "c", "models": ["m"], "evaluations": {"resolution": {"sizes": []}}}}),
         "resolution.sizes: expected a list of input sizes"),
        (dict(experiments={"e": {"claim": "c", "models": ["m"], "pairs": [{"a": "m", "b": "n", "expect": "better"}]}}),
         r"experiments.e.pairs\[0\].b: expected one of the arms \['m'\], got 'n'"),
        (dict(experiments={"e": {"claim": "c", "models": ["m", "n"], "pairs": [{"a": "m", "b": "n", "expect": "up"}]}}),
         "expect: expected one of better, not_worse"),
        (dict(experiments={"e": {"claim": "c", "models": ["m", "n"],
                                 "pairs": [{"a": "m", "b": "n", "expect": "better", "metric": "acc5"}]}}),
         "metric: expected final_acc1, best_acc1, effective_rank or acc1@SIZE"),
        (dict(experiments={"e": {"claim": "c", "models": ["m", "m"]}}), "the same model and setting appear twice"),
        (dict(quick={"train_fraction_scale": 2}), "quick.train_fraction_scale: expected a number in \\(0, 1\\]"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key(tmp_path, change, message):
    path = _study_file(tmp_path, tmp_path, **change)
    with pytest.raises(ConfigError, match=message):
        load_study(path, quick="quick" in change)


def _without_timings(payload: dict) -> dict:
    payload = copy.deepcopy(payload)
    for record in payload["runs"].values():
        record.pop("epoch_seconds")
        for row in record["history"]:
            row.pop("epoch_seconds")
    payload.pop("command")
    payload.pop("timing")
    return payload


class _Interrupt(RuntimeError):
    pass


def _counting(calls: list[str], stop_after: int | None = None):
    def train_fn(cfg, resume):
        assert resume is True  # the study owns its run folders: a killed run continues from last.pt
        if stop_after is not None and len(calls) == stop_after:
            raise _Interrupt(f"killed before {cfg.output}")
        calls.append(Path(cfg.output).as_posix().split("/runs/", 1)[1])
        return train(cfg, resume)

    return train_fn


def test_resume_repeats_no_finished_run(tmp_path, data_dir):
    plan = load_study(_study_file(tmp_path, data_dir, seeds=[1]))  # 4 unique runs, one shared by 3 experiments
    assert len(plan.runs) == 4
    full_calls: list[str] = []
    full = run_study(plan, tmp_path / "full", train_fn=_counting(full_calls), timing_settings=TINY)
    assert full_calls == list(plan.runs)  # every unique run once
    # ...then one timing pass over the arms' models (a train_fraction arm is its model's step).
    timing = full["timing"]
    assert list(timing["models"]) == ["vit_mini_28", "vit_mini_28_ssm2d", "vit_mini_28_s4nd"]
    assert {k: timing[k] for k in ("batch_size", "rounds", "steps", "warmup", "reference")} == {
        "batch_size": 8, "rounds": 1, "steps": 1, "warmup": 0, "reference": "vit_mini_28"}
    assert timing["threads"] == torch.get_num_threads() and timing["models"]["vit_mini_28"]["ratio"] == 1.0
    assert all(e["step_seconds"] > 0 for e in timing["models"].values())
    assert json.loads((tmp_path / "full" / "study.json").read_text())["timing"] == timing
    # steps_per_epoch: the trainer's own record (config.yaml); 40 images / batch 8, 20 at fraction 0.5.
    assert {run_id: r["steps_per_epoch"] for run_id, r in full["runs"].items()} == {
        "vit_mini_28/seed1": 5, "vit_mini_28_ssm2d/seed1": 5, "vit_mini_28/train_fraction=0.5/seed1": 2,
        "vit_mini_28_s4nd/seed1": 5}  # fmt: skip

    calls: list[str] = []
    with pytest.raises(_Interrupt):
        run_study(plan, tmp_path / "cut", train_fn=_counting(calls, stop_after=2))
    saved = json.loads((tmp_path / "cut" / "study.json").read_text())
    assert list(saved["runs"]) == list(plan.runs)[:2]  # written after every finished run
    again: list[str] = []
    resumed = run_study(plan, tmp_path / "cut", train_fn=_counting(again), timing_settings=TINY)
    assert again == list(plan.runs)[2:]
    assert _without_timings(resumed) == _without_timings(full)

    # Nothing left: a third call trains nothing, times nothing and changes nothing.
    cut_timing = resumed["timing"]
    nothing: list[str] = []
    again_payload = run_study(plan, tmp_path / "cut", train_fn=_counting(nothing), timing_settings=TINY)
    assert _without_timings(again_payload) == _without_timings(full) and nothing == []
    assert again_payload["timing"] == cut_timing

    # The records carry what the report needs.
    record = full["runs"]["vit_mini_28_ssm2d/seed1"]
    assert record["experiment"] == "pe" and record["seed"] == 1 and record["model"] == "vit_mini_28_ssm2d"
    assert record["final_acc1"] == record["history"][-1]["val_acc1"] and record["params"] > 0
    assert [r["img_size"] for r in record["evaluations"]["resolution"]] == [36]
    ranks = record["evaluations"]["kernel_rank"]["layers"]
    assert len(ranks) == 4 and all(1.0 <= r["effective_rank_mean"] <= 13.0 for r in ranks)
    s4nd = full["runs"]["vit_mini_28_s4nd/seed1"]["evaluations"]
    assert [r["method"] for r in s4nd["resolution"]] == ["rate change", "rate 1"]
    assert all(abs(r["effective_rank_mean"] - 1.0) < 1e-3 for r in s4nd["kernel_rank"]["layers"])  # rank 1

    # Every plot kind renders from the records alone.
    results = render_results(full, tmp_path / "docs").read_text()
    plots = sorted(p.name for p in (tmp_path / "docs" / "img").iterdir())
    assert plots == ["fraction.png", "pe.png", "rank.png", "spectrum.png"]
    assert "| `vit_mini_28_ssm2d` | 0.175M |" in results and " of 1) |" not in results

    # --resume-from: a fresh folder seeded from the finished study trains nothing.
    seeded: list[str] = []
    copy_of = run_study(plan, tmp_path / "seeded", resume_from=tmp_path / "full" / "study.json",
                        train_fn=_counting(seeded), timing_settings=TINY)  # fmt: skip
    assert seeded == [] and _without_timings(copy_of) == _without_timings(full)
    assert copy_of["timing"] == full["timing"]  # taken over, and nothing left to time

    # --only: an added arm trains alone.
    grown = _study_file(tmp_path, data_dir)
    study = yaml.safe_load(grown.read_text())
    study["seeds"] = [1]
    study["experiments"]["pe"]["models"].append("vit_mini_28_dwconv")
    grown.write_text(yaml.safe_dump(study, sort_keys=False))
    added: list[str] = []
    run_study(load_study(grown), tmp_path / "full", only=["pe"], train_fn=_counting(added), timing_settings=TINY)
    assert added == ["vit_mini_28_dwconv/seed1"]
    grown_timing = json.loads((tmp_path / "full" / "study.json").read_text())["timing"]["models"]
    assert list(grown_timing) == ["vit_mini_28", "vit_mini_28_ssm2d", "vit_mini_28_s4nd", "vit_mini_28_dwconv"]
    assert {k: v for k, v in grown_timing.items() if k != "vit_mini_28_dwconv"} == timing["models"]  # only it, timed

    # A new evaluation size runs on the finished runs' weights, without training them again.
    study["experiments"]["rank"]["evaluations"]["resolution"]["sizes"] = [36, 44]
    grown.write_text(yaml.safe_dump(study, sort_keys=False))
    evaluated: list[str] = []
    more = run_study(load_study(grown), tmp_path / "full", train_fn=_counting(evaluated), timing_settings=TINY)
    assert evaluated == []
    assert [r["img_size"] for r in more["runs"]["vit_mini_28_ssm2d/seed1"]["evaluations"]["resolution"]] == [36, 44]


def test_models_restricts_the_runs_within_only(tmp_path, data_dir):
    """--models trains only the named models' runs, inside the --only experiments; unknown names are refused."""
    plan = load_study(_study_file(tmp_path, data_dir, seeds=[0]))
    calls: list[str] = []
    nothing = run_study(plan, tmp_path / "s", only=["pe"], models=["vit_mini_28_s4nd"], train_fn=_counting(calls),
                        timing_settings=TINY)  # fmt: skip
    assert calls == [] and nothing["timing"] is None  # s4nd is not a model of pe: nothing to train or time
    payload = run_study(plan, tmp_path / "s", models=["vit_mini_28_s4nd"], train_fn=_counting(calls),
                        timing_settings=TINY)  # fmt: skip
    assert calls == ["vit_mini_28_s4nd/seed0"] and list(payload["runs"]) == ["vit_mini_28_s4nd/seed0"]
    assert list(payload["timing"]["models"]) == ["vit_mini_28", "vit_mini_28_s4nd"]  # and the reference
    with pytest.raises(ConfigError, match="--models: unknown models vim_mini_28; the study trains vit_mini_28, "):
        run_study(plan, tmp_path / "s", models=["vim_mini_28"])


def test_seeds_split_the_training_and_resume_from_merges_it(tmp_path, data_dir):
    """--seeds trains only those seeds' runs; two folders that split a study by seed are merged by
    copying the run folders and taking over the records with --resume-from, which trains nothing."""
    plan = load_study(_study_file(tmp_path, data_dir))  # seeds 0 and 1
    calls: list[str] = []
    for seed in (0, 1):
        payload = run_study(plan, tmp_path / f"s{seed}", only=["pe"], models=["vit_mini_28"], seeds=[seed],
                            train_fn=_counting(calls), timing_settings=TINY)  # fmt: skip
        assert list(payload["runs"]) == [f"vit_mini_28/seed{seed}"]
    assert calls == ["vit_mini_28/seed0", "vit_mini_28/seed1"]
    shutil.copytree(tmp_path / "s1" / "runs", tmp_path / "s0" / "runs", dirs_exist_ok=True)
    merged = run_study(plan, tmp_path / "s0", only=["pe"], models=["vit_mini_28"],
                       resume_from=tmp_path / "s1" / "study.json", train_fn=_counting(calls),
                       timing_settings=TINY)  # fmt: skip
    assert len(calls) == 2 and sorted(merged["runs"]) == ["vit_mini_28/seed0", "vit_mini_28/seed1"]
    assert merged["runs"]["vit_mini_28/seed1"]["final_acc1"] == payload["runs"]["vit_mini_28/seed1"]["final_acc1"]
    with pytest.raises(ConfigError, match="--seeds: unknown seeds 2, 5; the study's seeds are 0, 1"):
        run_study(plan, tmp_path / "s0", seeds=[5, 1, 2])


def test_a_second_study_on_a_folder_in_use_is_refused(tmp_path, data_dir):
    """Two training studies in one folder would train the same runs twice and drop each other's
    records: the second is refused before it trains; a timing pass (--timing) may run beside."""
    plan = load_study(_study_file(tmp_path, data_dir, seeds=[0]))
    calls: list[str] = []
    with folder_lock(tmp_path / "s", "--output"):
        with pytest.raises(ConfigError, match=r"--output: \S+ is already in use by this process \(pid \d+\)"):
            run_study(plan, tmp_path / "s", train_fn=_counting(calls), timing_settings=TINY)
        timed = time_study(plan, tmp_path / "s", timing_settings=TINY)
    assert calls == [] and timed["runs"] == {} and "vit_mini_28" in timed["timing"]["models"]
    run_study(plan, tmp_path / "s", only=["pe"], train_fn=_counting(calls), timing_settings=TINY)  # free again
    assert calls == ["vit_mini_28/seed0", "vit_mini_28_ssm2d/seed0"]


def test_changed_recipe_is_refused(tmp_path, data_dir):
    plan = load_study(_study_file(tmp_path, data_dir))
    one = {"experiments": {"pe": {"claim": "c", "models": ["vit_mini_28"]}}}
    run_study(load_study(_study_file(tmp_path, data_dir, seeds=[0], **one)), tmp_path / "a", timing_settings=TINY)
    changed = _study_file(tmp_path, data_dir, seeds=[0], recipe={**RECIPE, "data_dir": str(data_dir), "lr": 2e-3}, **one)
    with pytest.raises(ConfigError, match=r"study.json: run vit_mini_28/seed0 in .* another config \(lr: 0.001 -> 0.002\)"):
        run_study(load_study(changed), tmp_path / "a")
    with pytest.raises(ConfigError, match=r"--resume-from: run vit_mini_28/seed0 .* \(lr: 0.001 -> 0.002\)"):
        run_study(load_study(changed), tmp_path / "b", resume_from=tmp_path / "a" / "study.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="is not a study.json of format 1"):
        run_study(plan, tmp_path / "c", resume_from=tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="--only: unknown experiments nope; the study has pe, fraction, rank, spectrum"):
        run_study(plan, tmp_path / "d", only=["nope"])


def _record(run_id: str, model: str, seed: int, final: float, best: float, params: int = 1000, **evaluations) -> dict:
    return {"id": run_id, "model": model, "seed": seed, "final_acc1": final, "best_acc1": best, "params": params,
            "epoch_seconds": 10.0 + seed, "history": [{"epoch": 1, "val_acc1": final}], "evaluations": evaluations}


def _payload() -> dict:
    """Arms a (3 of 3 seeds), b (3 of 3) and c (2 of 3); a - b = +2, +3, +1 per seed."""
    runs = {}
    for seed, (a, b, c) in enumerate([(80.0, 78.0, 70.0), (81.0, 78.0, 72.0), (79.0, 78.0, None)]):
        runs[f"a/seed{seed}"] = _record(f"a/seed{seed}", "a", seed, a, a + 1, 2_000_000)
        runs[f"b/seed{seed}"] = _record(f"b/seed{seed}", "b", seed, b, b + 1)
        if c is not None:
            runs[f"c/seed{seed}"] = _record(f"c/seed{seed}", "c", seed, c, c)

    def arm(m: str) -> dict:
        return {"label": m, "model": m, "settings": {}, "runs": {str(s): f"{m}/seed{s}" for s in range(3)}}

    experiments = {
        "exp": {"claim": "a beats b", "arms": [arm("a"), arm("b"), arm("c")], "evaluations": {}, "plot": "bars",
                "pairs": [{"a": "a", "b": "b", "expect": "better", "metric": "final_acc1"}]},
        "open": {"claim": "c beats b", "arms": [arm("b"), arm("c")], "evaluations": {}, "plot": "bars",
                 "pairs": [{"a": "c", "b": "b", "expect": "better", "metric": "final_acc1"}]},
        "neg": {"claim": "b beats a", "arms": [arm("a"), arm("b")], "evaluations": {}, "plot": "bars",
                "pairs": [{"a": "b", "b": "a", "expect": "better", "metric": "final_acc1"}]},
    }  # fmt: skip
    return {"format": 1, "config": "study.yaml", "command": "ssm2d study study.yaml --output out", "quick": False,
            "recipe": {"epochs": 5}, "seeds": [0, 1, 2], "experiments": experiments, "runs": runs}  # fmt: skip


def test_rendered_numbers_come_from_the_records(tmp_path):
    payload = _payload()  # of an older ssm2d: no timing pass, no steps_per_epoch: the wall times, marked
    lines = table(payload, "exp").splitlines()
    assert lines[2] == "| `a` | 2.000M | 80.00 ± 1.00 | 81.00 ± 1.00 | 11.0\\* |  | 3 |"
    assert lines[3] == "| `b` | 0.001M | 78.00 ± 0.00 | 79.00 ± 0.00 | 11.0\\* |  | 3 |"
    assert lines[4] == "| `c` | 0.001M | 71.00 ± 1.41 | 71.00 ± 1.41 | 10.5\\* |  | in progress (2 of 3) |"
    assert lines[5:] == ["", UNTIMED_NOTE]

    pair = paired(arm_rows(payload, "exp"), "a", "b")
    assert (pair["n"], pair["mean"], pair["signs"], pair["complete"]) == (3, 2.0, "+++", True)
    assert pair["std"] == pytest.approx(1.0)
    assert verdict(pair, "better") == "holds" and verdict({**pair, "mean": 0.5}, "better") == "does not hold"
    assert verdict({**pair, "mean": -0.5}, "not_worse") == "holds"
    assert verdict({**pair, "mean": -1.5}, "not_worse") == "does not hold"
    assert summary_sentence(payload, "exp").startswith("The claim holds at this scale")
    assert summary_sentence(payload, "open") == "Not decided yet: 5 of 6 runs finished."  # c is in progress
    assert summary_sentence(payload, "neg").startswith("The claim does not hold at this scale: `b` vs `a`")

    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Results\n\n<!-- BEGIN study-results (generated, do not edit) -->\nSTALE BLOCK\n"
                      "<!-- END study-results -->\n\n## Layout\n")  # fmt: skip
    path = render_results(payload, tmp_path / "docs", readme)
    text = path.read_text()
    assert "| `a` | 2.000M | 80.00 ± 1.00 | 81.00 ± 1.00 | 11.0\\* |  | 3 |" in text
    assert "'s / epoch' is the wall time of an epoch (training and evaluation) as the run went" in text
    assert "`a` - `b` (final_acc1; expected above): +2.00 ± 1.00 points over 3 seeds (per seed: +++): **holds**" in text
    assert "in progress (2 of 3)" in text and "80.12" in text  # the paper's Swin CIFAR-100 number
    assert "1 of 9 runs are still to come: their arms are marked 'in progress (n of m)'" in text
    assert (tmp_path / "docs" / "img" / "exp.png").stat().st_size > 0
    assert json.loads((tmp_path / "docs" / "results.json").read_text()) == payload
    block = readme.read_text()
    assert "STALE BLOCK" not in block and block.endswith("<!-- END study-results -->\n\n## Layout\n")
    assert "[docs/results.md](docs/results.md)" in block and "- `neg`: The claim does not hold" in block
    render_results(payload, tmp_path / "docs", readme)
    assert readme.read_text() == block  # idempotent
    payload["runs"]["c/seed2"] = _record("c/seed2", "c", 2, 71.0, 71.0)
    finished = render_results(payload, tmp_path / "docs").read_text()
    assert "still to come" not in finished and "in progress" not in finished

    fresh = tmp_path / "FRESH.md"  # no block yet: it goes under the Results heading
    fresh.write_text("# x\n\n## Results\n\nThe demo.\n\n## Layout\n")
    render_results(payload, tmp_path / "docs", fresh)
    text = fresh.read_text()
    assert text.startswith("# x\n\n## Results\n\n<!-- BEGIN study-results (generated, do not edit) -->\nFrom `ssm2d")
    assert text.endswith("<!-- END study-results -->\n\nThe demo.\n\n## Layout\n")


def test_render_only_reads_the_json_and_writes_only_the_report(tmp_path, capsys):
    (tmp_path / "old.json").write_text(json.dumps(_payload()))
    out, docs = tmp_path / "out", tmp_path / "docs"
    main(["study", str(tmp_path / "unread.yaml"), "--output", str(out), "--render-only", "--resume-from",
          str(tmp_path / "old.json"), "--docs", str(docs), "--readme", str(tmp_path / "absent.md")])  # fmt: skip
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {docs / 'results.md'}, {docs / 'results.json'} and {docs / 'img'}/")
    assert not out.exists() and json.loads((docs / "results.json").read_text())["runs"] == _payload()["runs"]


def test_table_costs_an_arm_by_its_timed_step(tmp_path):
    """s / epoch = the timing entry's step time x the runs' steps per epoch; an arm without an
    entry keeps its wall time, marked, with the note under the table."""
    payload = _payload()
    for exp in payload["experiments"].values():
        for arm in exp["arms"]:
            arm["timed_as"] = {"a": "a", "b": "b [n_ssm=1]", "c": "c"}[arm["model"]]
    for record in payload["runs"].values():
        record["steps_per_epoch"] = 40
    payload["timing"] = {
        "batch_size": 128, "threads": 2, "rounds": 3, "steps": 5, "warmup": 2, "reference": "a",
        "command": "ssm2d study study.yaml --output out --timing",
        "models": {"a": {"step_seconds": 0.25, "ratio": 1.0}, "b [n_ssm=1]": {"step_seconds": 0.5, "ratio": 2.0}},
    }  # fmt: skip
    lines = table(payload, "exp").splitlines()
    assert lines[2] == "| `a` | 2.000M | 80.00 ± 1.00 | 81.00 ± 1.00 | 10.0 | 1.00 | 3 |"  # 0.25 s x 40 steps
    assert lines[3] == "| `b` | 0.001M | 78.00 ± 0.00 | 79.00 ± 0.00 | 20.0 | 2.00 | 3 |"
    assert lines[4] == "| `c` | 0.001M | 71.00 ± 1.41 | 71.00 ± 1.41 | 10.5\\* |  | in progress (2 of 3) |"
    assert lines[5:] == ["", UNTIMED_NOTE]
    assert table(payload, "neg").splitlines()[2:] == [  # every arm timed: no note
        "| `a` | 2.000M | 80.00 ± 1.00 | 81.00 ± 1.00 | 10.0 | 1.00 | 3 |",
        "| `b` | 0.001M | 78.00 ± 0.00 | 79.00 ± 0.00 | 20.0 | 2.00 | 3 |"]
    rows = arm_rows(payload, "exp")
    assert [(r["timed"], r["seconds"], r["ratio"]) for r in rows] == [(True, 10.0, 1.0), (True, 20.0, 2.0),
                                                                       (False, 10.5, None)]  # fmt: skip
    text = cost_text(payload)
    assert "one synthetic batch of 128 images; no data loading, no evaluation) times the run's steps per epoch" in text
    assert "2 warm-up steps of each, then 3 rounds that each time, model after model, 5 steps of `a` and then" in text
    assert "at 2 threads. '× ref' is the median over rounds of the model's step time over `a`'s just before it" in text
    assert text.endswith("Last timing pass: `ssm2d study study.yaml --output out --timing`.")
    assert text in render_results(payload, tmp_path / "docs").read_text()


def test_time_training_steps_times_each_model_right_after_the_reference(monkeypatch):
    """Warm-up of every model, then rounds that time `steps` steps of the reference and then of
    each other model in turn; a ratio is the median over rounds of model / reference-just-before,
    a step time that ratio x the reference's fastest mean (on a fake clock whose speed drifts)."""
    clock = [0.0]
    calls: list[tuple[str, int]] = []
    # seconds per step at each timed call: the machine slows down and speeds up between rounds
    per_step = {"ref": [1.0, 1.0, 3.0, 3.0, 2.0, 2.0], "a": [2.0, 9.0, 5.0], "b": [1.5, 4.5, 3.0]}

    def fake_runner(cfg, seed):
        def run(steps: int) -> None:
            timed = sum(1 for name, _ in calls if name == cfg.model) - 1  # the first call is the warm-up
            calls.append((cfg.model, steps))
            clock[0] += 100.0 if timed < 0 else per_step[cfg.model][timed] * steps

        return run

    monkeypatch.setattr(study_timing, "_step_runner", fake_runner)
    monkeypatch.setattr(study_timing, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    configs = {name: SimpleNamespace(model=name) for name in ("ref", "a", "b")}
    result = time_training_steps(configs, "ref", TimingSettings(rounds=3, steps=4, warmup=2))
    assert calls == [("ref", 2), ("a", 2), ("b", 2)] + [("ref", 4), ("a", 4), ("ref", 4), ("b", 4)] * 3
    # a: 2/1, 9/3, 5/2 -> median 2.5; b: 1.5/1, 4.5/3, 3/2 -> 1.5; the reference's fastest step 1.0
    assert result == {"ref": {"step_seconds": 1.0, "ratio": 1.0}, "a": {"step_seconds": 2.5, "ratio": 2.5},
                      "b": {"step_seconds": 1.5, "ratio": 1.5}}  # fmt: skip
    configs = {"ref": SimpleNamespace(model="ref"), "other": SimpleNamespace(model="other")}
    with pytest.raises(ValueError, match="reference: expected one of the timed models ref, other, got 'vit'"):
        time_training_steps(configs, "vit")
    with pytest.raises(ValueError, match="rounds: expected an integer >= 1, got 0"):
        TimingSettings(rounds=0)
    with pytest.raises(ValueError, match="warmup: expected an integer >= 0, got -1"):
        TimingSettings(warmup=-1)


def test_time_training_steps_of_tiny_models(tmp_path, data_dir):
    """The real step of the smallest models at batch 4: positive times, the reference's ratio 1."""
    plan = load_study(_study_file(tmp_path, data_dir, seeds=[0]))
    configs = {name: dataclasses.replace(plan.runs[f"{name}/seed0"].config, batch_size=4)
               for name in ("vit_mini_28", "vit_mini_28_ssm2d")}  # fmt: skip
    result = time_training_steps(configs, "vit_mini_28", TimingSettings(rounds=1, steps=1, warmup=1))
    assert list(result) == ["vit_mini_28", "vit_mini_28_ssm2d"]
    assert all(0 < entry["step_seconds"] < 60 for entry in result.values())
    assert result["vit_mini_28"]["ratio"] == 1.0
    ssm2d = result["vit_mini_28_ssm2d"]
    assert ssm2d["ratio"] == pytest.approx(ssm2d["step_seconds"] / result["vit_mini_28"]["step_seconds"])
    assert timing_key("vit_mini_28", {"train_fraction": 0.1}) == "vit_mini_28"  # not a step cost
    assert timing_key("vit_mini_28_ssm2d", {"model_kwargs": {"layer_kwargs": {"state_dim": 64}}}) == (
        "vit_mini_28_ssm2d [state_dim=64]")
    assert timing_key("vit_mini_28", {"batch_size": 64, "train_fraction": 0.1}) == "vit_mini_28 [batch_size=64]"


def test_steps_per_epoch_of_records_without_it(tmp_path, data_dir, monkeypatch):
    """Records of an older ssm2d get steps_per_epoch: from the run's config.yaml, else by the trainer's rule."""
    plan = load_study(_study_file(tmp_path, data_dir, seeds=[0], experiments={
        "fraction": {"claim": "data", "models": ["vit_mini_28"], "settings": [{"train_fraction": 0.5}, {}]}}))
    run_study(plan, tmp_path / "a", timing_settings=TINY)
    old = json.loads((tmp_path / "a" / "study.json").read_text())
    for record in old["runs"].values():
        del record["steps_per_epoch"]
    del old["timing"]
    (tmp_path / "a" / "study.json").write_text(json.dumps(old))
    (tmp_path / "old.json").write_text(json.dumps(old))
    expected = {"vit_mini_28/train_fraction=0.5/seed0": 2, "vit_mini_28/seed0": 5}  # 20 and 40 images, batch 8
    assert train_steps_per_epoch(plan.runs["vit_mini_28/train_fraction=0.5/seed0"].config) == 2
    with monkeypatch.context() as patch:  # the runs' folders hold it: the data set is not read
        patch.setattr("ssm2d.train.study.train_steps_per_epoch", None)
        payload = time_study(plan, tmp_path / "a", timing_settings=TINY)
    assert {run_id: r["steps_per_epoch"] for run_id, r in payload["runs"].items()} == expected
    payload = time_study(plan, tmp_path / "b", resume_from=tmp_path / "old.json", timing_settings=TINY)
    assert {run_id: r["steps_per_epoch"] for run_id, r in payload["runs"].items()} == expected
    assert not (tmp_path / "b" / "runs").exists()  # no run folders: computed from the data set; nothing trained


def test_timing_flag_merges_entries_and_trains_nothing(tmp_path, data_dir, capsys):
    """`ssm2d study --timing`: times the planned models (within --models), merges them into the
    timing object of OUTPUT/study.json, renders, and trains nothing."""
    path = _study_file(tmp_path, data_dir)
    out = tmp_path / "out"
    main(["study", str(path), "--quick", "--output", str(out), "--timing", "--models", "vit_mini_28_ssm2d"])
    first = json.loads((out / "study.json").read_text())
    assert first["runs"] == {} and not (out / "runs").exists()
    timing = first["timing"]
    assert (timing["rounds"], timing["steps"], timing["warmup"]) == (1, 1, 1)  # --quick: QUICK_TIMING
    assert list(timing["models"]) == ["vit_mini_28", "vit_mini_28_ssm2d"]  # the reference comes along
    assert timing["command"].endswith("--timing --models vit_mini_28_ssm2d")
    assert first["command"] == timing["command"]  # no study.json before: no training command to keep
    assert timing["models"]["vit_mini_28"]["ratio"] == 1.0 and timing["models"]["vit_mini_28_ssm2d"]["ratio"] > 0
    assert "Last timing pass: `ssm2d study" in (out / "docs" / "results.md").read_text()

    main(["study", str(path), "--quick", "--output", str(out), "--timing", "--models", "vit_mini_28_s4nd"])
    second = json.loads((out / "study.json").read_text())
    assert second["command"] == first["command"] and second["timing"]["command"].endswith("vit_mini_28_s4nd")
    merged = second["timing"]["models"]
    assert list(merged) == ["vit_mini_28", "vit_mini_28_ssm2d", "vit_mini_28_s4nd"]
    assert {k: merged[k] for k in ("vit_mini_28", "vit_mini_28_ssm2d")} == timing["models"]  # kept as they were

    # Timed otherwise (2 steps a round): the old entries are not mixed with the new ones.
    again = time_study(load_study(path, quick=True), out, models=["vit_mini_28_s4nd"],
                       timing_settings=TimingSettings(rounds=1, steps=2, warmup=0))  # fmt: skip
    assert list(again["timing"]["models"]) == ["vit_mini_28", "vit_mini_28_s4nd"] and again["timing"]["steps"] == 2

    with pytest.raises(SystemExit, match="--timing: it times the models into OUTPUT/study.json; it does not go with"):
        main(["study", str(path), "--output", str(out), "--timing", "--render-only"])
    with pytest.raises(SystemExit, match="--seeds: it selects the runs to train; --timing and --render-only train"):
        main(["study", str(path), "--output", str(out), "--timing", "--seeds", "0"])


def test_spectrum_summary_of_known_kernels():
    rank1 = torch.outer(torch.randn(5, dtype=torch.float64), torch.randn(7, dtype=torch.float64))
    flat = torch.eye(5, 7, dtype=torch.float64)
    summary = spectrum_summary(torch.stack([rank1, flat, torch.zeros(5, 7, dtype=torch.float64)]))
    assert summary["zero_channels"] == 1 and summary["channels"] == 3
    assert summary["effective_rank_min"] == pytest.approx(1.0, abs=1e-6)  # rank 1: one singular value
    assert summary["effective_rank_max"] == pytest.approx(5.0)  # 5 equal singular values: exp(log 5)
    assert summary["top1_energy_mean"] == pytest.approx((1.0 + 0.2) / 2)
    assert summary["spectrum"][0] == 1.0 and len(summary["spectrum"]) == 5


@pytest.mark.slow
def test_quick_study_of_the_shipped_config(tmp_path, capsys, monkeypatch):
    """`ssm2d study configs/study.yaml --quick`: every arm, one epoch, one seed; nothing into docs/."""
    try:
        dataset_info("fashion_mnist")
    except DatasetError as err:
        pytest.skip(f"Fashion-MNIST is not installed here ({err})")
    monkeypatch.chdir(tmp_path)  # a stray write to ./docs or ./README.md would land here
    out = tmp_path / "quick"
    main(["study", str(ROOT / "configs" / "study.yaml"), "--quick", "--output", str(out)])
    payload = json.loads((out / "study.json").read_text())
    plan = load_study(ROOT / "configs" / "study.yaml", quick=True)
    assert list(payload["runs"]) == list(plan.runs) and payload["quick"] is True
    assert payload["timing"] is None  # --quick skips the timing pass (`--quick --timing` runs it alone)
    assert (out / "docs" / "results.md").is_file() and (out / "docs" / "img" / "spatial_layers.png").is_file()
    assert not (tmp_path / "docs").exists() and not (tmp_path / "README.md").exists()
    assert "QUICK smoke run" in (out / "docs" / "results.md").read_text()


def test_run_killed_mid_training_resumes_from_last_pt(tmp_path, data_dir, monkeypatch):
    one = {"experiments": {"pe": {"claim": "c", "models": ["vit_mini_28"]}}}
    recipe = {**RECIPE, "data_dir": str(data_dir), "epochs": 2}
    plan = load_study(_study_file(tmp_path, data_dir, seeds=[0], recipe=recipe, **one))
    whole = run_study(plan, tmp_path / "whole", timing_settings=TINY)

    from ssm2d.train import trainer

    epochs: list[int] = []
    run_epoch = trainer._Run.run_epoch

    def killed_in_epoch_2(self):
        epochs.append(self.epoch + 1)
        if len(epochs) == 2:
            raise _Interrupt("killed in epoch 2")
        return run_epoch(self)

    monkeypatch.setattr(trainer._Run, "run_epoch", killed_in_epoch_2)
    with pytest.raises(_Interrupt):
        run_study(plan, tmp_path / "cut")
    assert (tmp_path / "cut" / "runs" / "vit_mini_28" / "seed0" / "last.pt").is_file()
    assert json.loads((tmp_path / "cut" / "study.json").read_text())["runs"] == {}
    resumed = run_study(plan, tmp_path / "cut", timing_settings=TINY)
    assert epochs == [1, 2, 2]  # the re-run trained epoch 2 only, from epoch 1's last.pt
    assert _without_timings(resumed) == _without_timings(whole)


def test_val_fraction_keeps_a_class_balanced_part_of_the_validation_set(tmp_path, data_dir):
    from ssm2d.train import TrainConfig, trainer
    from ssm2d.train.distributed import init_distributed

    values = {**RECIPE, "val_batch_size": 1, "data_dir": str(data_dir), "output": str(tmp_path / "run")}
    for fraction, expected in ((1.0, 20), (0.5, 10)):  # 20 validation images, 2 per class
        run = trainer._Run(TrainConfig(**{**values, "val_fraction": fraction}), init_distributed("cpu"))
        labels = [int(y) for _, y in run.val_loader]
        assert len(labels) == expected and sorted(set(labels)) == list(range(10))
    with pytest.raises(ConfigError, match=r"val_fraction: expected a fraction in \(0, 1\], got 0.0"):
        TrainConfig(**{**values, "val_fraction": 0.0})


def test_a_timing_pass_written_by_another_process_survives_the_running_study(tmp_path, data_dir):
    """`--timing` run while a study trains into the same folder: the study's later rewrites of
    study.json keep the entries, and its closing pass does not time them again."""
    plan = load_study(_study_file(tmp_path, data_dir, seeds=[1]))
    out = tmp_path / "out"
    calls: list[str] = []
    entries = {"vit_mini_28": {"step_seconds": 0.5, "ratio": 1.0}, "vit_mini_28_ssm2d": {"step_seconds": 0.75, "ratio": 1.5}}

    def train_and_time_elsewhere(cfg, resume):
        summary = _counting(calls)(cfg, resume)
        if len(calls) == 1:  # the other process rewrites study.json with its timing object
            payload = json.loads((out / "study.json").read_text())
            header = dict(method=study_timing.TIMING_METHOD, batch_size=8, threads=torch.get_num_threads(), rounds=1,
                          steps=1, warmup=0)
            payload["timing"] = {**header, "reference": "vit_mini_28", "command": "elsewhere", "models": entries}
            (out / "study.json").write_text(json.dumps(payload))
        return summary

    result = run_study(plan, out, train_fn=train_and_time_elsewhere, timing_settings=TINY)
    assert len(calls) == len(plan.runs)
    models = result["timing"]["models"]
    assert {k: models[k] for k in entries} == entries  # kept, not timed again
    assert list(models) == ["vit_mini_28", "vit_mini_28_ssm2d", "vit_mini_28_s4nd"]  # only s4nd was timed
    assert json.loads((out / "study.json").read_text())["timing"]["models"] == models
