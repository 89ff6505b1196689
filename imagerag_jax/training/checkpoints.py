"""Orbax checkpoints of the trainable state: the one owner of checkpoint managers.

Layout: ``workdir/checkpoints/<step>/<item>`` with the named items

  params          adapter, LoRA, discriminator heads and their spectral-norm batch_stats
  gen_opt_state   generator AdamW state
  disc_opt_state  discriminator AdamW state
  train_meta      step counter and the base RNG key
  data_iter       input-pipeline position (JSON)
  config          the run's config (JSON)
  frozen          paths and fingerprints of the frozen towers (JSON; their weights are not saved)

Saves are asynchronous (the loop continues while arrays are written) and atomic (a step directory
appears only once complete, so a process killed mid-save leaves the previous checkpoint as the
latest). Keeps the last ``max_to_keep``. `Checkpointer` is the trainer's (writing) manager;
`restore_trained` reads a finished run without creating, cleaning or deleting anything (export,
inference).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

from imagerag_jax import storage
from imagerag_jax.errors import UserError

STATE_ITEMS = ("params", "gen_opt_state", "disc_opt_state", "train_meta")
JSON_ITEMS = ("data_iter", "config", "frozen")
DIRECTORY = "checkpoints"


class CheckpointError(UserError):
    """A workdir or step without a readable checkpoint (one-line message for the CLI)."""


def split_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """Train state -> {item name: pytree} (step and rng go together under train_meta)."""
    return {
        "params": state["params"],
        "gen_opt_state": state["gen_opt_state"],
        "disc_opt_state": state["disc_opt_state"],
        "train_meta": {"step": state["step"], "rng": state["rng"]},
    }


def join_state(items: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `split_state`."""
    return {
        "params": items["params"],
        "gen_opt_state": items["gen_opt_state"],
        "disc_opt_state": items["disc_opt_state"],
        "step": items["train_meta"]["step"],
        "rng": items["train_meta"]["rng"],
    }


class Checkpointer:
    """A CheckpointManager for the train state plus JSON side items."""

    def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory) if "://" not in directory else directory
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True,
            # A run that died mid-save leaves a tmp directory; clean it rather than trip on it.
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=STATE_ITEMS + JSON_ITEMS
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (None without one)."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints kept."""
        return list(self.manager.all_steps())

    def save(self, step: int, state: Mapping[str, Any], *, data_iter: Mapping[str, Any],
             config: Mapping[str, Any], frozen: Mapping[str, Any]) -> bool:
        """Starts an (async) save of `state` and the JSON items at `step`; True if it started."""
        args = {name: ocp.args.StandardSave(tree) for name, tree in split_state(state).items()}
        args.update(
            data_iter=ocp.args.JsonSave(dict(data_iter)),
            config=ocp.args.JsonSave(dict(config)),
            frozen=ocp.args.JsonSave(dict(frozen)),
        )
        saved = self.manager.save(step, args=ocp.args.Composite(**args), force=True)
        logging.info("checkpoint: %s step %d to %s", "saving" if saved else "skipped", step,
                     self.directory)
        return saved

    def restore(self, step: int, abstract_state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(state, json items) at `step`; arrays get the shardings of `abstract_state`'s leaves."""
        args = {name: ocp.args.StandardRestore(tree) for name, tree in split_state(abstract_state).items()}
        args.update({name: ocp.args.JsonRestore() for name in JSON_ITEMS})
        out = self.manager.restore(step, args=ocp.args.Composite(**args))
        state = join_state({name: out[name] for name in STATE_ITEMS})
        return state, {name: out[name] for name in JSON_ITEMS}

    def restore_json(self, step: int, name: str) -> Any:
        """One JSON item (e.g. 'config') without touching the arrays."""
        return self.manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))[name]

    def wait(self) -> None:
        """Blocks until pending async saves are complete on disk."""
        self.manager.wait_until_finished()

    def reached_preemption(self, step: int) -> bool:
        """True when a multi-host preemption notice (jax's sync manager) has reached `step`."""
        if jax.process_count() == 1:  # single process: SIGTERM is handled by the trainer
            return False
        try:
            return bool(self.manager.reached_preemption(step))
        except Exception:  # pylint: disable=broad-except  # no distributed runtime: no notice
            return False

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def _read_only_manager(workdir: str, error: type[Exception]) -> ocp.CheckpointManager:
    """A read-only manager of workdir/checkpoints (never creates, cleans or deletes anything)."""
    # A local folder or a URL (gs://...), which orbax reads itself.
    directory = os.path.join(workdir if storage.is_url(workdir) else os.path.abspath(workdir), DIRECTORY)
    if not storage.isdir(workdir):
        raise error(f"workdir {workdir} does not exist")
    if not storage.isdir(directory):
        raise error(f"{workdir} has no {DIRECTORY}/ folder: not a training workdir, or the run "
                    "saved no checkpoint yet")
    options = ocp.CheckpointManagerOptions(create=False, read_only=True, cleanup_tmp_directories=False,
                                           enable_async_checkpointing=False, save_interval_steps=0,
                                           max_to_keep=None)
    return ocp.CheckpointManager(directory, options=options, item_names=STATE_ITEMS + JSON_ITEMS)


def _pick_step(steps: list[int], workdir: str, step: int | None, error: type[Exception]) -> int:
    """`step`, or the latest complete checkpoint; `error` when absent."""
    steps = sorted(steps)
    if not steps:
        raise error(f"{workdir}/{DIRECTORY} holds no complete checkpoint")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise error(f"{workdir} has no checkpoint at step {step}; available: {steps}")
    return int(step)


def restore_trained(workdir: str, step: int | None = None, *,
                    error: type[Exception] = CheckpointError) -> tuple[int, Any, dict[str, Any]]:
    """(step, trained params as host numpy, {'config', 'frozen'} JSON) of a run's checkpoint.

    ``step`` defaults to the latest complete one. Read-only: a running trainer is undisturbed.
    """
    import numpy as np  # pylint: disable=g-import-not-at-top

    manager = _read_only_manager(workdir, error)
    try:
        step = _pick_step(list(manager.all_steps()), workdir, step, error)
        json_items = manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore(), frozen=ocp.args.JsonRestore()))
        params = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore()))["params"]
    finally:
        manager.close()
    params = jax.tree.map(np.asarray, params)
    return step, params, {"config": current_config(dict(json_items["config"])),
                          "frozen": dict(json_items["frozen"])}


def current_config(config: dict[str, Any]) -> dict[str, Any]:
    """A run's saved config in today's field names, so runs saved by earlier versions still load.

    Runs saved before ``random_seed`` existed seeded their random towers with ``seed``.
    """
    if "random_seed" not in config:
        config = {**config, "random_seed": config.get("seed", 0)}
    return config


def read_scalars(workdir: str) -> dict[str, dict[int, float]]:
    """The scalar metrics a run logged to its TensorBoard files: {tag: {step: value}}."""
    import glob  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    files = sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*")))
    if not files:
        raise FileNotFoundError(f"{workdir} holds no TensorBoard event files (events.out.tfevents.*)")
    out: dict[str, dict[int, float]] = {}
    for record in tf.data.TFRecordDataset(files):
        event = tf.compat.v1.Event.FromString(record.numpy())
        for value in event.summary.value:
            if value.metadata.plugin_data.plugin_name == "scalars":
                out.setdefault(value.tag, {})[int(event.step)] = float(tf.make_ndarray(value.tensor))
    return out
