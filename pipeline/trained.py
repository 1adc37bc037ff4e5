"""A trained stage 1 and a head that belong together: what predict, export-model and evaluate load.

A head is trained on the outputs of one stage-1 checkpoint (its checkpoint records that checkpoint's sha256 as
`stage1_sha256`); fed another stage 1's embeddings it would silently predict nonsense, so it is refused.
A fine-tuned model (`hepreg finetune`'s best.pt) holds both in one checkpoint: stage 1 under `model` and
`config` as a stage-1 checkpoint does, the head under `head`; commands take it as `--model` (`model_paths`),
and `load_trained` is the one loader of both kinds.
"""
from __future__ import annotations

from pathlib import Path

import torch

from hepreg.settings import Config
from hepreg.errors import HepregError
from hepreg.frozen import FrozenAssigner
from hepreg.models.head import head_from_checkpoint, stage1_of
from hepreg.runs.directory import RunDir, load_checkpoint

FINETUNED = "stage1+head"  # the `kind` of a fine-tuned checkpoint


def model_paths(cfg: Config, checkpoint: Path | None = None, head: Path | None = None,
                model: Path | None = None) -> tuple[Path, Path]:
    """The (stage 1, head) checkpoints a command uses: `model`, a fine-tuned checkpoint, for both; else
    `checkpoint` (default assign/best.pt) and `head` (default head/best.pt)."""
    if model is not None:
        if checkpoint is not None or head is not None:
            raise HepregError(f"--model {model} holds stage 1 and the head in one checkpoint; pass it without "
                              f"--checkpoint or --head")
        return Path(model), Path(model)
    rd = RunDir(cfg)
    return Path(checkpoint or rd.assign_best), Path(head or rd.head_best)


def load_head(head_path: str | Path, stage1_sha256: str, stage1_path: str | Path):
    """The trained head of `head_path` (eval mode), refused when trained on another stage-1 checkpoint; the
    head of a fine-tuned checkpoint when `head_path` is one and `stage1_path` the same file."""
    state = load_checkpoint(head_path)
    if state.get("kind") == FINETUNED:
        if Path(stage1_path).resolve() != Path(head_path).resolve():
            raise HepregError(f"{head_path} is a fine-tuned model: it holds its own stage 1, trained together with "
                              f"its head, and is used whole (--model {head_path}), not beside the stage 1 "
                              f"{stage1_path}")
        state = state["head"]
    else:
        state = load_checkpoint(head_path, kind="head", needs=("model", "head_config", "dim"))
        trained_on = stage1_of(state)
        if trained_on != stage1_sha256:
            raise HepregError(f"head checkpoint {head_path} was trained on the outputs of the stage-1 checkpoint "
                              f"with sha256 {trained_on}, but {stage1_path} has sha256 {stage1_sha256}; use a head "
                              f"trained on this stage 1, or the stage 1 the head was trained on")
    try:
        return head_from_checkpoint(state)
    except (RuntimeError, TypeError, ValueError, KeyError) as e:  # weights that do not fit their config
        raise HepregError(f"checkpoint {head_path} does not hold a head this hepreg can rebuild: "
                          f"{type(e).__name__}: {str(e).splitlines()[0]}") from None


def load_trained(stage1_path: str | Path, head_path: str | Path, device: torch.device | str = "cpu"):
    """(FrozenAssigner, head) on `device`, checked to belong together; both from one fine-tuned checkpoint when
    `stage1_path` and `head_path` name it (see `model_paths`)."""
    assigner = FrozenAssigner.from_checkpoint(stage1_path, device)
    return assigner, load_head(head_path, assigner.checkpoint_sha256, stage1_path).to(device)
