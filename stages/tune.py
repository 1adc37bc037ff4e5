"""`hepreg tune`: an Optuna study over head settings, each trial a cached train-head run.

A head trains from the cache in minutes, so many can be tried; a sampler that learns which settings pay (TPE)
and a pruner that stops trials clearly behind after a few epochs (median or Hyperband, on the per-epoch val
σ(q/pT) that train-head computes anyway) spend that time better than a hand-written grid.

- Each trial trains one head with `train_head.train_epochs` into `runs/<name>/tune/trial-NNNN/` (best.pt, last.pt,
  metrics.csv, config.yaml: a head like any other, for `evaluate --head`, `predict`, `export-model`). The trials of
  one process share the opened train and val splits and the inputs prepared on them.
- The study lives in a database: `tune/study.db` (SQLite) by default, any database Optuna reaches with
  `--storage`. Running the command again continues the study; several processes (or nodes, on a database
  server) given the same storage share it, each running its own `--trials`.
- A trial holds a lock on its folder while it runs. A trial left RUNNING whose lock is free (its process was
  killed) is marked failed by the next `hepreg tune` on that machine, and its settings are tried again.
"""
from __future__ import annotations

import dataclasses
import math
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from hepreg.config import SearchSpace, TunedParam, load_space
from hepreg.settings import Config, HeadConfig
from hepreg.errors import ConfigError
from hepreg.evaluation import plots
from hepreg.runs.directory import BEST, TRAINING_RESULTS, RunDir
from hepreg.flat import FlatBatch
from hepreg.runs.distributed import DistInfo, started
from hepreg.runs.files import LockError, stage_lock, taking_turns
from hepreg.runs.log import leaderboard
from hepreg.runs.outputs import guard
from hepreg.runs.progress import console
from hepreg.prepared import HeadSource, steps_per_epoch
from hepreg.stages.train_head import build_member, open_sources, train_epochs

STUDY_FILE = "study.db"
MAX_RETRIES = 2  # a trial whose process dies is tried again at most this often (one that kills it every time)


def run(cfg: Config, space_path: str | Path, trials: int = 20, timeout_min: float | None = None,
        storage: str | None = None) -> optuna.Study:
    """Run `trials` trials of the study of run `cfg.name` (fewer if `timeout_min` minutes pass first: a trial
    under way finishes), then write the leaderboard, the figures and `tune/best`, a link to the best trial."""
    space = load_space(space_path, cfg.head)
    tune_dir = RunDir(cfg).tune
    tune_dir.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(tune_dir / STUDY_FILE).resolve()}"
    study = open_study(cfg, space, url, tune_dir)
    done = sum(t.state != TrialState.WAITING for t in study.trials)  # queued ones are still to come
    console.print(f"[bold]tune · run {cfg.name}[/] · study {study.study_name!r} in {url} · {done} "
                  f"trials so far · this process runs {trials}"
                  + (f" or {timeout_min:g} minutes" if timeout_min else ""), highlight=False, soft_wrap=True)
    deadline = time.monotonic() + 60 * timeout_min if timeout_min else math.inf
    with started(cfg.head_train.device) as (device, info):
        if info.enabled:
            raise ConfigError("hepreg tune runs one process per study worker, not under torchrun: start "
                              "`hepreg tune` several times on the same --storage instead")
        train, val = open_sources(cfg, space.min_threshold(cfg.head), info, device)
        shared = Shared(train, val, steps_per_epoch(train, info), train.sample(), info, device)
        for _ in range(trials):
            if time.monotonic() > deadline:
                console.print(f"--timeout {timeout_min:g} min reached: no new trial", highlight=False)
                break
            retry_dead_trials(study, tune_dir)
            trial = study.ask()
            # every trial draws from its own seeded stream: processes sharing the study never repeat each
            # other's random draws, and a study of one process is reproducible
            study.sampler = sampler(space, cfg.seed * 1_000_003 + trial.number)
            run_trial(cfg, space, study, trial, tune_dir, shared)
    report(cfg, study, tune_dir)
    return study


# ----------------------------------------------------------------------------------------------- the study
def sampler(space: SearchSpace, seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(n_startup_trials=space.startup_trials, seed=seed)


def pruner(space: SearchSpace, epochs: int) -> optuna.pruners.BasePruner:
    """Median: a trial whose val σ(q/pT) after an epoch is above the median of earlier trials' at that epoch
    stops there. Hyperband: trials race in brackets from `warmup_epochs` up to all the epochs."""
    if space.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=space.startup_trials, n_warmup_steps=space.warmup_epochs)
    if space.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(space.warmup_epochs, 1), max_resource=epochs)
    return optuna.pruners.NopPruner()


def open_study(cfg: Config, space: SearchSpace, url: str, tune_dir: Path) -> optuna.Study:
    """The run's study in `url`, created on first use; SQLite waits up to a minute for another writer."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # each trial's line is printed here instead
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    with taking_turns(tune_dir / ".study.lock"):  # processes started together create the study in turn
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine)
        except Exception as e:  # a URL SQLAlchemy cannot parse or reach, a driver not installed
            raise ConfigError(f"--storage {url}: cannot open it as an Optuna storage ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:300]})") from None
        study = optuna.create_study(study_name=cfg.name, storage=storage, direction="minimize", load_if_exists=True,
                                    sampler=sampler(space, cfg.seed), pruner=pruner(space, cfg.head_train.epochs))
        if not study.trials:  # a new study tries the run config's own head first: its best is never worse
            study.enqueue_trial(own_settings(space, cfg.head), user_attrs={"start": "the run config's head"})
        return study


def own_settings(space: SearchSpace, head: HeadConfig) -> dict[str, Any]:
    """The searched settings of `head`, where the space holds them (the others are drawn)."""
    out = {}
    for p in space.params:
        value = getattr(head, p.name)
        value = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        if p.choices is not None and value in p.choices or p.choices is None and p.low <= value <= p.high:
            out[p.name] = value
    return out


def trial_dir(tune_dir: Path, number: int) -> Path:
    return tune_dir / f"trial-{number:04d}"


def retry_dead_trials(study: optuna.Study, tune_dir: Path) -> None:
    """Trials of this machine left RUNNING by a process that died (their folder's lock is free): marked failed,
    and their settings queued to be tried again, up to `MAX_RETRIES` times."""
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("host") != host:  # another machine's, or not started yet
            continue
        try:
            with stage_lock(trial_dir(tune_dir, t.number)):
                current = study.get_trials(deepcopy=False)[t.number]  # finished meanwhile?
                if current.state == TrialState.RUNNING:
                    fail_and_retry(study, current, "its process died")
        except LockError:
            continue  # its process is alive


def fail_and_retry(study: optuna.Study, t: optuna.trial.FrozenTrial, why: str) -> None:
    study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
    retries = t.user_attrs.get("retries", 0)
    if retries >= MAX_RETRIES:
        console.print(f"trial {t.number} failed ({why}); not tried again: its settings failed "
                      f"{retries + 1} times", highlight=False)
        return
    study.enqueue_trial(t.params, user_attrs={"retry_of": t.number, "retries": retries + 1})
    console.print(f"trial {t.number} failed ({why}); its settings are tried again", highlight=False)


# ----------------------------------------------------------------------------------------------- one trial
@dataclass
class Shared:
    """What every trial of one process trains on: the opened splits (held, their inputs prepared once)."""
    train: HeadSource
    val: HeadSource
    steps: int
    sample: FlatBatch  # the heads' standardisation statistics come from it
    info: DistInfo
    device: torch.device


def suggest(trial: optuna.Trial, p: TunedParam) -> Any:
    with warnings.catch_warnings():  # an enqueued value off the space's grid (the run config's own head) is kept
        warnings.filterwarnings("ignore", message="Fixed parameter")
        return _suggest(trial, p)


def _suggest(trial: optuna.Trial, p: TunedParam) -> Any:
    if p.choices is not None:
        return trial.suggest_categorical(p.name, list(p.choices))
    if p.integer:
        return trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
    return trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)


def run_trial(cfg: Config, space: SearchSpace, study: optuna.Study, trial: optuna.Trial, tune_dir: Path,
              shared: Shared) -> None:
    """One head with the trial's settings, trained under its folder's lock; each epoch's val σ(q/pT) goes to
    the pruner. The trial is told its result (the σ(q/pT) of best.pt) before the lock is let go."""
    out = trial_dir(tune_dir, trial.number)
    with stage_lock(out):
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        guard(out, TRAINING_RESULTS, overwrite=False, command="tune")  # a folder left by another study
        hc = space.head({p.name: suggest(trial, p) for p in space.params}, cfg.head)
        settings = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
        console.print(f"[bold]trial {trial.number}[/]: {settings}", highlight=False, soft_wrap=True)
        member = build_member(out.name, hc, cfg, shared.train.dim, shared.device, shared.info, shared.sample,
                              cfg.head_train.epochs * shared.steps, out)

        def report(epoch: int, rows: list[tuple[str, dict]]) -> None:
            trial.report(rows[0][1]["val_qpt_res"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch}")

        state = TrialState.COMPLETE
        try:
            train_epochs(cfg, [member], shared.train, shared.val, shared.steps, shared.info, shared.device, names=False,
                on_epoch=report)
        except optuna.TrialPruned as e:
            state = TrialState.PRUNED
            console.print(f"trial {trial.number} {e}: val σ(q/pT) behind the other trials'", highlight=False)
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                fail_and_retry(study, study.get_trials(deepcopy=False)[trial.number], "interrupted")
            else:
                study.tell(trial, state=TrialState.FAIL)
            raise
        best = member.progress.best_metrics
        trial.set_user_attr("row", {"name": out.name, **dataclasses.asdict(hc), **best})
        value = best.get("val_qpt_res", math.nan)
        with warnings.catch_warnings():  # a NaN result fails the trial, said below
            warnings.simplefilter("ignore")
            told = study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
        if told.state == TrialState.COMPLETE:
            console.print(f"trial {trial.number} complete: val σ(q/pT) {value:.4g} at epoch "
                          f"{best.get('best_epoch')} (best so far {study.best_value:.4g})",
                          highlight=False)
        elif told.state == TrialState.FAIL:
            console.print(f"trial {trial.number} failed: val σ(q/pT) is {value}", highlight=False)


# ----------------------------------------------------------------------------------------------- results
def report(cfg: Config, study: optuna.Study, tune_dir: Path) -> None:
    """The leaderboard of the complete trials, the figures, and `tune/best` (a link to the best trial's folder)."""
    trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == s for t in trials) for s in TrialState}
    console.print(f"study {study.study_name!r}: {len(trials)} trials, {count[TrialState.COMPLETE]} complete, "
                  f"{count[TrialState.PRUNED]} pruned, {count[TrialState.FAIL]} failed, "
                  f"{count[TrialState.RUNNING]} running elsewhere", highlight=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE and "row" in t.user_attrs]
    if not done:
        return
    leaderboard([t.user_attrs["row"] for t in done], tune_dir / "leaderboard.csv")
    if cfg.eval.plots:  # false: the leaderboard only, as evaluate's tables only
        title = f"{cfg.name} · {len(trials)} trials"
        plots.optimisation_history([(t.number, t.value if t.state == TrialState.COMPLETE else last_value(t),
                                     t.state.name.lower()) for t in trials
                                    if t.state in (TrialState.COMPLETE, TrialState.PRUNED)],
                                   tune_dir / "optimisation_history.png", title)
        importances = param_importances(study)
        if importances:
            plots.param_importances(importances, tune_dir / "param_importances.png", title)
    best = study.best_trial
    folder = trial_dir(tune_dir, best.number)
    if (folder / BEST).is_file():
        link = tune_dir / ".best.tmp"
        link.unlink(missing_ok=True)
        link.symlink_to(folder.name)
        os.replace(link, tune_dir / "best")
        if cfg.eval.plots:
            plots.learning_curves(folder / "metrics.csv", folder / "learning_curves.png", f"{cfg.name} · {folder.name}")
        console.print(f"best: trial {best.number}, val σ(q/pT) {best.value:.4g} → {tune_dir / 'best' / BEST} "
                      f"(`hepreg evaluate --head {tune_dir / 'best' / BEST}`)", highlight=False, soft_wrap=True)
    else:
        console.print(f"best: trial {best.number}, val σ(q/pT) {best.value:.4g}, trained on "
                      f"{best.user_attrs.get('host')} (its folder is not here)", highlight=False)


def last_value(t: optuna.trial.FrozenTrial) -> float:
    return t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else math.nan


def param_importances(study: optuna.Study) -> dict[str, float] | None:
    """PED-ANOVA importances (no scikit-learn needed), once there are enough complete trials to rank."""
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if len(done) < 3 or not done[0].params:
        console.print("parameter importances: need 3 complete trials", highlight=False)
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
    except (ValueError, RuntimeError, ZeroDivisionError) as e:
        console.print(f"parameter importances not computed: {e}", highlight=False)
        return None
