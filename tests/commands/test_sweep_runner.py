"""The sweep runner: spec checks, per-run configs, skip/resume, failures and after-steps.

Runs are launched through `safeproj.commands.sweep.runner.launch`; here it is replaced by a function that
does what a finished run does to its folder (a summary.json with status done), so resume logic is checked
by counting launches without training anything. tests/commands/test_smoke_sweep.py runs real ones.
"""

import json
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

from safeproj.commands.fit import SafeprojCLI
from safeproj.commands.sweep import runner, sweep_command
from safeproj.commands.sweep.config import check_cell, run_config
from safeproj.commands.sweep.runner import LOCK_FILE, run_sweep
from safeproj.commands.sweep.spec import load_spec
from safeproj.io import write_json

ROOT = Path(__file__).resolve().parents[2]
MIXED = str(ROOT / "recipes" / "mixed.yaml")


def _spec(tmp_path, **extra) -> Path:
    spec = {
        "name": "t",
        "seeds": [0, 1],
        "set": {"model.model": "tiny", "trainer.max_steps": 2, "UtilityEval.num_samples": 2},
        "runs": [
            {
                "name": "online",
                "recipe": MIXED,
                "grid": {"OnlineProjection.frac": [0.25, 0.75], "OnlineProjection.selection": ["top", "random"]},
            },
            {"name": "plain", "recipe": MIXED, "set": {"OnlineProjection": None}},
        ],
        **extra,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


class FakeRuns:
    """Stands in for the run subprocesses: records each launch and leaves what a finished run leaves."""

    def __init__(self, fail=()):
        self.launches: list[tuple[str, int]] = []
        self.fail = set(fail)

    def __call__(self, cmd, log, env, keep_fds=()):
        assert cmd[1:4] == ["-m", "safeproj.cli", "fit"]
        overrides = yaml.safe_load(Path(cmd[-1]).read_text())
        root = Path(overrides["trainer"]["default_root_dir"])
        summary_cb = next(cb for cb in overrides["trainer"]["callbacks"] if cb["class_path"].endswith("RunSummary"))
        labels = summary_cb["init_args"]["labels"]
        self.launches.append((labels["cell"], labels["seed"]))
        with open(log, "a") as handle:
            handle.write("training\n")
        if (labels["cell"], labels["seed"]) in self.fail:
            return 1
        (root / "checkpoint").mkdir(exist_ok=True)
        write_json(
            root / "summary.json",
            {"status": "done", "labels": labels, "config": overrides, "metrics": {}, "posthoc": []},
        )
        return 0


@pytest.fixture
def fake_runs(monkeypatch):
    runs = FakeRuns()
    monkeypatch.setattr(runner, "launch", runs)
    return runs


def test_grid_expands_into_named_cells(tmp_path):
    sweep = load_spec(_spec(tmp_path))
    names = [c.name for c in sweep.cells]
    assert names == [
        "online-frac=0.25-selection=top",
        "online-frac=0.25-selection=random",
        "online-frac=0.75-selection=top",
        "online-frac=0.75-selection=random",
        "plain",
    ]
    assert sweep.cells[3].overrides["OnlineProjection.frac"] == 0.75
    assert sweep.cells[3].overrides["OnlineProjection.selection"] == "random"
    assert sweep.cells[3].overrides["trainer.max_steps"] == 2  # the common set reaches every cell
    assert sweep.seeds == [0, 1]
    assert load_spec(_spec(tmp_path), seeds=[4, 5, 6]).seeds == [4, 5, 6]


class _ParseOnly(SafeprojCLI):
    def instantiate_classes(self) -> None:
        pass


def _parsed(cell, seed, run_dir, tmp_path):
    overrides = tmp_path / "mixed.yaml"
    overrides.write_text(yaml.safe_dump(run_config(cell, seed, run_dir, "t")))
    return _ParseOnly(run=False, args=["--config", str(cell.recipe), "--config", str(overrides)]).config


def test_run_config_sets_callback_args_seed_and_folders_through_the_cli(tmp_path):
    cell = load_spec(_spec(tmp_path)).cells[3]
    config = _parsed(cell, 1, tmp_path / "run", tmp_path)
    classes = [cb.class_path.rsplit(".", 1)[-1] for cb in config.trainer.callbacks]
    assert classes == ["OnlineProjection", "UtilityEval", "HarmEval", "NonFiniteGuard", "RunSummary"]
    online = config.trainer.callbacks[0].init_args
    assert (online.frac, online.selection, online.keep, online["on"]) == (0.75, "random", "orthogonal", "update")
    assert config.trainer.callbacks[1].init_args.num_samples == 2
    labels = config.trainer.callbacks[-1].init_args.labels
    assert labels["cell"] == cell.name and labels["seed"] == 1 and labels["recipe"] == "mixed"
    assert config.seed_everything == 1 and config.data.seed == 1 and config.model.seed == 1
    assert config.trainer.default_root_dir == str(tmp_path / "run")
    assert config.trainer.logger.init_args.save_dir == str(tmp_path / "run")
    assert config.model.model == "tiny" and config.trainer.max_steps == 2


def test_seed_keys_reach_callback_seeds_of_runs_that_have_them(tmp_path):
    sweep = load_spec(_spec(tmp_path, seed_keys=["seed_everything", "OnlineProjection.seed"]))
    online = run_config(sweep.cells[0], 3, tmp_path / "run", "t", sweep.seed_keys)
    projection = next(cb for cb in online["trainer"]["callbacks"] if cb["class_path"].endswith("OnlineProjection"))
    assert projection["init_args"]["seed"] == 3 and online["seed_everything"] == 3
    plain = run_config(sweep.cells[4], 3, tmp_path / "run", "t", sweep.seed_keys)
    assert not any(cb["class_path"].endswith("OnlineProjection") for cb in plain["trainer"]["callbacks"])


def test_callbacks_are_removed_and_added(tmp_path):
    sweep = load_spec(_spec(tmp_path))
    plain = _parsed(sweep.cells[4], 0, tmp_path / "run", tmp_path)
    classes = [cb.class_path.rsplit(".", 1)[-1] for cb in plain.trainer.callbacks]
    assert classes == ["UtilityEval", "HarmEval", "NonFiniteGuard", "RunSummary"]
    cell = sweep.cells[4]
    cell.overrides = {
        **cell.overrides,
        "PosthocProjection": {"subspace": "safety", "fracs": [0.5]},
        "PosthocProjection.keep": "orthogonal",
    }
    added = _parsed(cell, 0, tmp_path / "run", tmp_path).trainer.callbacks
    posthoc = next(cb for cb in added if cb.class_path.endswith("PosthocProjection")).init_args
    assert (posthoc.subspace, posthoc.fracs, posthoc.keep) == ("safety", [0.5], "orthogonal")


def test_resume_runs_only_what_is_not_done(tmp_path, fake_runs):
    spec, out = _spec(tmp_path), tmp_path / "out"
    first = run_sweep(spec, out, max_runs=3)  # stopped after three runs, as a killed sweep would be
    assert len(fake_runs.launches) == 3 and first.skipped == 0
    done = {p.parent: p.stat().st_mtime_ns for p in out.rglob("summary.json")}
    assert len(done) == 3

    second = run_sweep(spec, out)
    assert second.skipped == 3 and len(second.ran) == 7
    assert len(fake_runs.launches) == 10 and len(set(fake_runs.launches)) == 10  # nothing ran twice
    assert all(p.joinpath("summary.json").stat().st_mtime_ns == t for p, t in done.items())

    # A crash mid-run leaves a folder without summary.json: only that run starts over.
    crashed = out / "plain" / "seed1"
    (crashed / "summary.json").unlink()
    (crashed / "partial.bin").write_bytes(b"half")
    third = run_sweep(spec, out)
    assert fake_runs.launches[10:] == [("plain", 1)] and third.skipped == 9
    assert not (crashed / "partial.bin").exists()
    assert (crashed / "run.log.1").read_text().count("training") == 1  # the crashed attempt's log is kept
    assert (crashed / "checkpoint").is_dir() and json.loads((crashed / "summary.json").read_text())["status"] == "done"

    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert len(index) == 11 and {r["kind"] for r in index} == {"run"}
    assert index[-1]["cell"] == "plain" and index[-1]["seed"] == 1

    run_sweep(spec, out)
    assert len(fake_runs.launches) == 11  # all done: nothing launched


def test_failed_run_is_reported_and_retried(tmp_path, monkeypatch):
    runs = FakeRuns(fail={("plain", 0)})
    monkeypatch.setattr(runner, "launch", runs)
    spec, out = _spec(tmp_path), tmp_path / "out"
    with pytest.raises(SystemExit, match=r"1 failed.*plain seed0"):
        sweep_command(str(spec), str(out))
    assert not (out / "plain" / "seed0" / "summary.json").exists()
    assert len(runs.launches) == 10  # the other runs went on
    runs.fail.clear()
    result = sweep_command(str(spec), str(out))
    assert result == {"out_dir": str(out.resolve()), "total": 10, "skipped": 9, "ran": 1, "failed": 0}
    assert runs.launches[-1] == ("plain", 0)


def test_dry_run_plans_without_writing(tmp_path, fake_runs):
    out = tmp_path / "out"
    result = run_sweep(_spec(tmp_path), out, dry_run=True)
    assert len(result.planned) == 10 and not out.exists() and not fake_runs.launches
    assert all(cmd[-2] == "--config" and cmd[-1].endswith("mixed.yaml") for cmd in result.planned)


def test_a_running_sweep_holds_its_folder(tmp_path, fake_runs):
    out = tmp_path / "out"
    out.mkdir()
    with FileLock(str(out / LOCK_FILE)), pytest.raises(ValueError, match="another sweep is running"):
        run_sweep(_spec(tmp_path), out)
    assert not fake_runs.launches


def test_after_steps_fill_placeholders_once_per_seed(tmp_path, fake_runs, monkeypatch):
    calls = []

    def overlap(a: str, b: str, etas: list[float] = (0.5,), out_dir: str = "x", cache_dir: str | None = None):
        calls.append((a, b, list(etas), out_dir, cache_dir))
        Path(out_dir, "mso.json").write_text("[]")

    monkeypatch.setattr(runner, "after_function", lambda command: overlap if command == "overlap" else None)
    after = [
        {
            "name": "pair",
            "overlap": {
                "a": "{plain}/checkpoint",
                "b": "{online-frac=0.25-selection=top}/checkpoint",
                "etas": [0.3],
                "cache_dir": "{out_dir}/spectra-{seed}",
            },
        },
        {"name": "other", "eval": {"run": "{plain}"}},
    ]
    spec, out = _spec(tmp_path, after=after), (tmp_path / "out").resolve()
    result = run_sweep(spec, out)
    assert [c[0] for c in calls] == [f"{out}/plain/seed0/checkpoint", f"{out}/plain/seed1/checkpoint"]
    assert calls[1][1] == f"{out}/online-frac=0.25-selection=top/seed1/checkpoint"
    assert calls[0][3] == str(out / "after" / "pair" / "seed0") and calls[0][2] == [0.3]
    assert [c[4] for c in calls] == [f"{out}/spectra-0", f"{out}/spectra-1"]
    assert result.after_ran == ["pair seed0", "pair seed1"]
    assert json.loads((out / "after" / "pair" / "seed1" / "after.json").read_text())["status"] == "done"
    run_sweep(spec, out)  # done steps are not repeated
    assert len(calls) == 2


def test_included_specs_prefix_cells_and_their_after_steps(tmp_path, fake_runs):
    child = tmp_path / "child.yaml"
    child.write_text(
        yaml.safe_dump(
            {
                "name": "kid",
                "runs": [{"name": "a", "recipe": MIXED}],
                "after": [{"name": "p", "overlap": {"a": "{a}/checkpoint", "b": "safety:tiny"}}],
            }
        )
    )
    parent = tmp_path / "parent.yaml"
    parent.write_text(
        yaml.safe_dump({"name": "all", "seeds": [3], "include": ["child.yaml"], "set": {"trainer.max_steps": 1}})
    )
    sweep = load_spec(parent)
    assert [c.name for c in sweep.cells] == ["kid/a"] and sweep.seeds == [3]
    assert sweep.cells[0].overrides["trainer.max_steps"] == 1
    assert sweep.after[0].name == "kid/p" and sweep.after[0].cells == ["kid/a"]


def test_replace_swaps_or_drops_the_config_files_of_included_runs(tmp_path):
    for name in ("big.yaml", "small.yaml", "data.yaml", "kept.yaml"):
        (tmp_path / name).write_text("trainer: {max_steps: 1}\n")
    run = {"name": "a", "recipe": MIXED, "configs": ["big.yaml", "data.yaml", "kept.yaml"]}
    (tmp_path / "child.yaml").write_text(yaml.safe_dump({"name": "kid", "runs": [run]}))
    parent = {"include": ["child.yaml"], "replace": {"big.yaml": "small.yaml", "data.yaml": None}}
    (tmp_path / "parent.yaml").write_text(yaml.safe_dump(parent))
    [cell] = load_spec(tmp_path / "parent.yaml").cells
    assert [c.name for c in cell.configs] == ["small.yaml", "kept.yaml"]

    for replace, message in (
        ({"unused.yaml": None}, "replace names .*unused.yaml, which no included run uses"),
        ({"missing.yaml": None}, "replace: file 'missing.yaml' not found"),
        ({"big.yaml": 3}, r"replace.big.yaml: expected a config file name or null"),
        (["big.yaml"], "replace must map config file names"),
    ):
        (tmp_path / "unused.yaml").write_text("{}\n")
        (tmp_path / "parent.yaml").write_text(yaml.safe_dump({"include": ["child.yaml"], "replace": replace}))
        with pytest.raises(ValueError, match=message):
            load_spec(tmp_path / "parent.yaml")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"bogus": 1}, "unknown key 'bogus'"),
        ({"seeds": [0, 0]}, "seeds repeat"),
        ({"seeds": "0"}, "seeds"),
        ({"runs": [{"recipe": "no-such-recipe"}]}, r"runs\[0\].recipe"),
        ({"runs": [{"recipe": MIXED, "grid": {"model.lr": 0.1}}]}, r"grid.model.lr"),
        ({"runs": [{"recipe": MIXED, "set": {"lr": 0.1}}]}, "unknown key 'lr'"),
        ({"runs": [{"recipe": MIXED, "colour": 1}]}, "unknown key 'colour'"),
        ({"after": [{"overlap": {"a": "{nope}/checkpoint", "b": "x"}}]}, r"\{nope\}"),
        ({"after": [{"sweep": {}}]}, "exactly one command"),
        ({"seed_keys": ["foo"]}, "seed_keys entry 'foo'"),
    ],
)
def test_bad_spec_is_one_line_naming_the_key(tmp_path, change, message):
    with pytest.raises(ValueError, match=message) as err:
        load_spec(_spec(tmp_path, **change))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"SafeLoRA.rank": 2}, "not among the run's callbacks"),
        ({"NoSuchCallback": {"x": 1}}, "not in the recipe's callbacks"),
        ({"UtilityEval": 3}, "takes a mapping"),
        ({"trainer.max_steps.x": 1}, "trainer.max_steps is 2"),
        ({"data.seed": 5}, "set per seed"),
        ({"UtilityEval.num_sample": 5}, "cell 'plain': its config does not parse: .*'num_sample' is not accepted"),
        ({"model.lrr": 0.1}, "cell 'plain': its config does not parse: .*'lrr'"),
    ],
)
def test_overrides_that_do_not_fit_the_recipe_fail_before_any_run(tmp_path, fake_runs, override, message):
    spec = _spec(tmp_path)
    raw = yaml.safe_load(spec.read_text())
    raw["runs"][1]["set"].update(override)
    spec.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=message):
        run_sweep(spec, tmp_path / "out")
    assert not fake_runs.launches


def test_shipped_sweep_specs_load_and_fit_their_recipes(tmp_path):
    # paper.yaml names hub models: tests/test_paper_spec.py checks it against a hub cache it populates.
    specs = sorted(p for p in (ROOT / "recipes" / "sweeps").glob("*.yaml") if p.stem != "paper")
    assert {p.stem for p in specs} >= {"parallel", "orthogonal", "overlap", "activations", "smoke", "default"}
    for path in specs:
        sweep = load_spec(path)
        # paper-smoke.yaml checks the paper's sweep on a CPU: one seed is what it needs.
        assert len(sweep.seeds) >= (1 if path.stem == "paper-smoke" else 2) and sweep.cells
        for cell in sweep.cells:
            check_cell(cell, sweep, tmp_path)  # parsed by the CLI as its runs will be
    # The paper's grid: 5 fracs × 3 selections online, and an unprojected run with the post hoc grid.
    orthogonal = load_spec(ROOT / "recipes" / "sweeps" / "orthogonal.yaml")
    assert len(orthogonal.cells) == 16 and len(orthogonal.seeds) >= 3


def test_launch_streams_output_to_the_log_and_returns_the_exit_code(tmp_path):
    import sys

    log = tmp_path / "run.log"
    code = runner.launch([sys.executable, "-c", "print('step 1'); raise SystemExit(3)"], log, {})
    assert code == 3
    text = log.read_text()
    assert text.startswith("$ ") and "step 1" in text


def test_sigterm_stops_the_sweep_like_ctrl_c():
    import os
    import signal
    import time

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), runner._sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this at once
    assert signal.getsignal(signal.SIGTERM) == before


def test_todo_list_is_made_under_the_sweep_lock(tmp_path, fake_runs, monkeypatch):
    import fcntl
    import os

    out, held = tmp_path / "out", []
    is_done = runner.is_done

    def checked(run_dir, *args):
        fd = os.open(out / LOCK_FILE, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(False)
        except BlockingIOError:
            held.append(True)
        finally:
            os.close(fd)
        return is_done(run_dir, *args)

    out.mkdir()
    (out / LOCK_FILE).touch()
    monkeypatch.setattr(runner, "is_done", checked)
    run_sweep(_spec(tmp_path), out)
    assert held and all(held)
