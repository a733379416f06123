"""The training loop shared by the AR trainer (`trainer.py`) and the tokenizer trainer
(`tokenizer/training.py`).

A run is a list of `Phase`s: the step function of step s is that of the last phase starting at or
before s (the host step counter picks it, so nothing is traced per schedule), and a phase's
`enter(state)` runs when the loop reaches its start (e.g. IAR2's fresh stage-2 optimizers). The
step functions are the trainers' jitted, sharded, donating ones. The run resumes from the newest
valid checkpoint in `workdir/checkpoints` (state and data position), saves every `ckpt_every`
steps, on SIGTERM and at the end. Metrics stay on the device until a log step, where a
non-finite loss or gradient norm stops the run without saving that state. Without a workdir
nothing is read or written (benchmarks, tests).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import numpy as np

from iar_jax import checkpointing, sharding
from iar_jax.runtime import NonFiniteLossError, Preempted, Preemption

# What a resume does with the newest checkpoint (config.train.restore): `auto` restores everything
# (a different state tree is an error); `params_only` does so too when it can, else keeps the
# params (and EMA) and step and re-initialises the rest (e.g. after changing ema_decay or the
# optimizer); `start_over` trains from scratch when every checkpoint is unreadable.
RESTORE_MODES = ("auto", "params_only", "start_over")


@dataclasses.dataclass(frozen=True)
class Phase:
    start: int  # first step of the phase
    step: Callable[[Any, Any], Any]  # (state, global batch) -> (state, device metrics)
    enter: Optional[Callable[[Any], Any]] = None  # state -> state when the run reaches `start`


@dataclasses.dataclass
class Result:
    state: Any
    step: int
    preempted: bool  # stopped by SIGTERM (after saving, when there is a workdir)
    writer: Any  # the metric writer, for what the caller writes after the loop


def restore_mode(config) -> str:
    mode = config.train.get("restore", "auto")
    if mode not in RESTORE_MODES:
        raise ValueError(f"config.train.restore={mode!r}; use one of {', '.join(RESTORE_MODES)}")
    return mode


@contextlib.contextmanager
def locked(config, workdir: Optional[str]):
    """Checks config.train.restore, then holds the workdir lock (enter it before any compile, so a
    second run on the same workdir fails at once)."""
    restore_mode(config)
    with checkpointing.WorkdirLock(workdir) if workdir else contextlib.nullcontext():
        yield


def batch_iterator(config, source):
    """This host's batches of `source` (`iar_jax.data.codes`' deterministic stream, resumable)."""
    from iar_jax.data import codes

    d = config.data
    args = (source, int(config.train.global_batch), int(config.train.seed), jax.process_index(), jax.process_count())
    loader = d.get("loader", "grain")
    if loader == "grain":
        return codes.GrainBatchIterator(*args, num_threads=int(d.get("num_workers", 0)))
    if loader == "numpy":
        return codes.BatchIterator(*args)
    raise ValueError(f"unknown config.data.loader {loader!r}; use grain or numpy (both give the same batches)")


def jit_step(fn: Callable, state_shardings, batch_shardings, mesh, extra_args: int = 0) -> Callable:
    """jit of fn(state, batch, *extra) -> (state, metrics): the state keeps its shardings and is
    donated, the batch is sharded as given, the extra arguments and the metrics are replicated."""
    rep = sharding.replicated(mesh)
    return jax.jit(fn, in_shardings=(state_shardings, batch_shardings) + (rep,) * extra_args,
                   out_shardings=(state_shardings, rep), donate_argnums=(0,))


def raise_if_preempted(trainer, state) -> None:
    """For the commands: a run stopped by SIGTERM exits with runtime.PREEMPTED_EXIT_CODE."""
    if trainer.preempted:
        raise Preempted(f"stopped by SIGTERM at step {int(jax.device_get(state['step']))} after saving it; run the "
                        "same command again to resume")


def run(config, workdir: Optional[str], phases: Sequence[Phase], init_state: Callable[[], Any], abstract_state,
        batches, put_batch: Callable[[Dict[str, np.ndarray]], Any], meta: Dict[str, Any],
        num_steps: Optional[int] = None, log_fn: Optional[Callable[[int, Dict[str, float]], None]] = None,
        step_fn: Optional[Callable[[int, Dict[str, Any]], None]] = None,
        from_params: Optional[Callable[[checkpointing.Checkpointer, int], Any]] = None) -> Result:
    """Trains until `num_steps` (default config.train.num_steps); call it inside `locked`.

    `abstract_state` (ShapeDtypeStructs with shardings) is what a checkpoint restores into;
    `batches` a `batch_iterator`; `put_batch` makes a host batch global. `log_fn(step, means)` runs
    at every log step, `step_fn(step, device_metrics)` after every step (reading a metric waits for
    that step). `from_params(ckpt, step)` builds a fresh state around a checkpoint's params
    (restore=params_only); trainers without one refuse that mode.
    """
    from clu import metric_writers, parameter_overview, periodic_actions

    mode = restore_mode(config)
    if mode == "params_only" and from_params is None:
        raise ValueError("config.train.restore=params_only is not supported by this trainer; use auto or start_over")
    phases = sorted(phases, key=lambda p: p.start)
    if not phases or phases[0].start != 0:
        raise ValueError(f"the phases must start at step 0; got starts {[p.start for p in phases]}")
    t = config.train
    total = int(num_steps or t.num_steps)
    log_every, ckpt_every = int(t.log_every), int(t.ckpt_every)

    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=int(t.keep_ckpts)) if workdir else None
    restored = None
    if ckpt is not None:
        fix = "resume with the config it was saved with, or use a fresh --workdir"
        if from_params is not None:
            fix = ("resume with the config it was saved with, or add --config.train.restore=params_only to keep its "
                   "params and step and re-initialise the rest")
        try:
            restored = ckpt.restore_latest(abstract_state, expect_meta=meta, start_over=mode == "start_over", fix=fix)
        except checkpointing.IncompatibleCheckpointError as e:
            if mode != "params_only":
                raise
            restored = (from_params(ckpt, e.step), None, None, e.step)
    if restored is None:
        state, start = init_state(), 0
        if workdir:
            logging.info("no checkpoint in %s: starting from scratch", workdir)
    else:
        state, data_state, _, start = restored
        if data_state is None:  # params_only: the data stream continues at the step, as a resume would
            batches.seek(start)
            logging.warning("restored only the params of step %d in %s (restore=params_only); optimizer state and "
                            "rng re-initialised", start, workdir)
        else:
            batches.restore(data_state)
        logging.info("resumed from step %d in %s", start, workdir)

    main = jax.process_index() == 0
    writer = metric_writers.create_default_writer(workdir, just_logging=not (workdir and main))
    if start == 0 and workdir and main:
        parameter_overview.log_parameter_overview(state["params"])
        writer.write_hparams(_flatten_cfg(config))
    hooks = [periodic_actions.ReportProgress(num_train_steps=total, writer=writer, every_secs=60)]
    pending: List[tuple] = []
    last_saved = start if restored is not None else None

    def flush():
        if not pending:
            return
        rows = jax.device_get([m for _, m in pending])
        for (s, _), row in zip(pending, rows):
            bad = [f"{k} {row[k]}" for k in ("loss", "grad_norm") if k in row and not np.isfinite(row[k])]
            if bad:
                where = (f"step {last_saved} in {ckpt.directory}" if last_saved is not None else "none saved yet"
                         ) if ckpt is not None else "no workdir"
                raise NonFiniteLossError(
                    f"non-finite {' and '.join(bad)} at step {s}; stopped without saving it (last good checkpoint: "
                    f"{where}); lower optim.lr or check the data")
        mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        writer.write_scalars(pending[-1][0], mean)
        if log_fn is not None:
            log_fn(pending[-1][0], mean)
        pending.clear()

    def save(step, force=False):
        nonlocal last_saved
        flush()
        if ckpt is not None:
            ckpt.save(step, state, batches.state(), meta, force=force)
            last_saved = step

    step, preempted = start, False
    try:
        with Preemption(log_every) as preempt:
            while step < total:
                phase = [p for p in phases if p.start <= step][-1]
                if phase.enter is not None and step == phase.start:
                    state = phase.enter(state)
                state, metrics = phase.step(state, put_batch(next(batches)))
                step += 1
                pending.append((step, metrics))
                for h in hooks:
                    h(step)
                if step_fn is not None:
                    step_fn(step, metrics)
                if step % log_every == 0 or step == total:
                    flush()
                if step % ckpt_every == 0 or step == total:
                    save(step)
                if preempt.any_host(step):
                    if last_saved != step:
                        save(step, force=True)
                    logging.warning("stopped at step %d on SIGTERM; re-run the same command to resume", step)
                    preempted = True
                    break
    finally:  # also on errors: let the last good (async) save land
        if ckpt is not None:
            ckpt.close()
        writer.flush()
    return Result(state, step, preempted, writer)


def _flatten_cfg(config, prefix=""):
    out = {}
    for k, v in config.items():
        if hasattr(v, "items"):
            out.update(_flatten_cfg(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
    return out
