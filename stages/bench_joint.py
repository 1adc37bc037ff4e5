"""Step (a) of `hepreg bench`: stage 1 and the head trained jointly (one backward through both, the step of
`hepreg finetune`), run in its own process so that its peak memory is its own."""
from __future__ import annotations

import time
from pathlib import Path

import torch


def joint_training(config: str | Path, metrics_csv: str | Path, max_events: int | None = None) -> None:
    """Train the stage-1 model and the head together, one backward through both; write events_per_s per epoch.

    The step is `hepreg finetune`'s (`hepreg.models.joint.joint_loss`: MaskFormer + matched assignment loss,
    FlatBatch.from_padded of the live outputs with gradients, a head of `build_head` + its loss), here from an
    untrained stage 1 and head in one optimiser. Run in its own process by `run`. `max_events`
    limits each epoch to the first training events: the slowest step need not see them all to give its rate.
    """
    from hepreg.runs.allocator import tune
    from hepreg.config import load_config
    from hepreg.data.batching import HitLoader
    from hepreg.data.reader import open_dataset, split_ranges
    from hepreg.runs.distributed import resolve_device
    from hepreg.models.head import build_head
    from hepreg.models.joint import joint_loss
    from hepreg.models.maskformer import MaskFormer
    from hepreg.runs.directory import MetricsCSV

    tune()
    cfg = load_config(config)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.assign.device)
    dataset = open_dataset(cfg.data.path, cfg.data.max_events)
    start, stop = split_ranges(len(dataset), cfg.data.val_fraction, cfg.data.test_fraction)["train"]
    stop = stop if max_events is None else min(stop, start + max_events)
    loader = HitLoader(dataset, start, stop, shuffle=True, batch_size=cfg.data.batch_size,
                       bucket_window=cfg.data.bucket_window, seed=cfg.seed)
    model = MaskFormer(cfg.model).to(device)
    head = build_head(cfg.head, cfg.model.dim).to(device)
    params = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.assign.lr, weight_decay=cfg.assign.weight_decay)
    metrics = MetricsCSV(metrics_csv)
    fitted = False
    for epoch in range(cfg.head_train.epochs):
        loader.set_epoch(epoch)
        model.train(), head.train()
        events, t0 = 0, time.perf_counter()
        for batch in loader:
            batch = batch.to(device)
            # standardisation from the first batch: enough for a throughput figure
            loss = joint_loss(model, head, batch, cfg.assign, estimate_scales=not fitted).total
            fitted = True
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.assign.grad_clip)
            optimizer.step()
            events += batch.size
        seconds = time.perf_counter() - t0
        metrics.append({"epoch": epoch + 1, "last_loss": loss.item(), "train_events": events,
                        "events_per_s": events / seconds})
