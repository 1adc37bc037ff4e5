"""What a training run records and tells as it goes, from one row dict per epoch.

- `EpochLog`: the row goes to `metrics.csv` and to TensorBoard event files in the same folder, under the same
  names, with the epoch (1-based: epochs completed) as the step, in both training stages;
- `EpochTable`: the row (one per head in a sweep) as a line of a table on stderr, every epoch for short runs
  and every N epochs (plus the first and last) for long ones, with an ETA that logs without a live bar lack;
- `header`: what a run is about to do, before it starts.
Results proper (leaderboards, evaluation tables) go to stdout through `hepreg.runs.progress.results`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from hepreg.runs.files import atomic_write
from hepreg.runs.progress import console, results
from hepreg.runs.directory import MetricsCSV


class EpochLog:
    """metrics.csv and TensorBoard logs of one training folder. `resume_after`: epochs already done, whose
    rows are kept (and later ones dropped, in the CSV and in TensorBoard's view)."""

    def __init__(self, folder: Path, resume_after: int = 0, enabled: bool = True):
        self.folder = Path(folder)
        self.csv = MetricsCSV(self.folder / "metrics.csv")
        self.writer = None
        if enabled:
            self.csv.truncate_after(resume_after)
            from torch.utils.tensorboard import SummaryWriter  # imported here: only training needs it

            self.folder.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(self.folder), purge_step=resume_after + 1 if resume_after else None)

    def append(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        self.csv.append(row)
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclass(frozen=True)
class Column:
    label: str
    key: str
    fmt: str  # format spec of the value, e.g. ".4f"
    width: int


def fold(epochs: int, rows: int = 20) -> int:
    """Print every N-th epoch so that a run shows about `rows` of them: 1, 2, 5, 10, 20, 50, ..."""
    n = 1
    while epochs / n > rows:
        n = n * 5 // 2 if str(n)[0] == "2" else n * 2  # 1, 2, 5, 10, 20, 50, 100, ...
    return n


def duration(seconds: float) -> str:
    """Short wall time: 45s, 12m30s, 3h05m."""
    if not math.isfinite(seconds):
        return "–"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class EpochTable:
    """Per-epoch lines of one table on stderr; the header once (or above every epoch with `repeat_header`,
    when progress bars come between the lines). Each line holds one row per head, named in a sweep."""

    def __init__(self, columns: list[Column], epochs: int, *, start_epoch: int = 0, names: bool = False,
                 name_width: int = 10, repeat_header: bool = False, title: str | None = None):
        self.columns, self.epochs, self.start = columns, epochs, start_epoch
        self.every = fold(epochs - start_epoch)
        self.names, self.name_width = names, name_width
        self.repeat_header, self.title = repeat_header, title
        self.printed = False
        self.t0 = time.perf_counter()

    def due(self, epoch: int) -> bool:
        """Whether the row of `epoch` (1-based) is printed."""
        return epoch == self.start + 1 or epoch % self.every == 0 or epoch == self.epochs

    def eta(self, epoch: int) -> float:
        done = epoch - self.start
        return (time.perf_counter() - self.t0) / max(done, 1) * (self.epochs - epoch)

    def table(self, epoch: int, rows: list[tuple[str, dict[str, Any]]], best: set[str] = frozenset()) -> Table:
        header = self.repeat_header or not self.printed
        t = Table(box=box.SIMPLE_HEAD, show_header=header, show_edge=False, pad_edge=False, header_style="bold",
                  padding=(0, 0), title=self.title if header else None)
        t.add_column("epoch", justify="right", width=7, no_wrap=True)
        if self.names:
            t.add_column("head", justify="left", width=self.name_width, no_wrap=True, overflow="ellipsis")
        for c in self.columns:
            t.add_column(c.label, justify="right", width=c.width, no_wrap=True)
        t.add_column("", width=1, no_wrap=True)  # * marks a new best val loss
        t.add_column("eta", justify="right", width=6, no_wrap=True)
        for i, (name, row) in enumerate(rows):
            cells = [f"{epoch}/{self.epochs}" if i == 0 else ""]
            if self.names:
                cells.append(name)
            for c in self.columns:
                v = row.get(c.key)
                cells.append("–" if v is None or (isinstance(v, float) and not math.isfinite(v))
                             else format(v, c.fmt))
            cells += ["*" if name in best else "", duration(self.eta(epoch)) if i == 0 else ""]
            t.add_row(*cells)
        return t

    def print(self, epoch: int, rows: list[tuple[str, dict[str, Any]]], best: set[str] = frozenset(),
              force: bool = False) -> None:
        if not (force or self.due(epoch)):
            return
        if not self.printed and self.every > 1:
            console.print(f"(a line every {self.every} epochs, and the first and last; * = new best val loss)",
                          highlight=False)
        console.print(self.table(epoch, rows, best))
        self.printed = True


HEAD_COLUMNS = [Column("train", "train_loss", ".4f", 7), Column("val", "val_loss", ".4f", 7),
                Column("σ(q/pT)", "val_qpt_res", ".3f", 7), Column("q mis-ID", "val_charge_misid", ".2%", 8),
                Column("ev/s", "events_per_s", ",.0f", 7), Column("lr", "lr", ".1e", 7)]
ASSIGN_COLUMNS = [Column("train", "train_loss", ".3f", 6), Column("val", "val_loss", ".3f", 6),
                  Column("trk eff", "track_eff", ".3f", 7), Column("fake", "fake_rate", ".3f", 5),
                  Column("hit eff", "hit_eff", ".3f", 7), Column("purity", "hit_purity", ".3f", 6),
                  Column("DM eff", "dm_eff", ".3f", 6), Column("ev/s", "events_per_s", ",.0f", 6),
                  Column("lr", "lr", ".0e", 5)]
FINETUNE_COLUMNS = [Column("train", "train_loss", ".3f", 7), Column("val", "val_loss", ".3f", 7),
                    Column("assign", "val_assign", ".3f", 6), Column("head", "val_head", ".3f", 6),
                    Column("trk eff", "track_eff", ".4f", 7), Column("fake", "fake_rate", ".4f", 6),
                    Column("DM eff", "dm_eff", ".4f", 6), Column("σ(q/pT)", "val_qpt_res", ".4f", 7),
                    Column("q mis-ID", "val_charge_misid", ".2%", 8), Column("ev/s", "events_per_s", ",.0f", 6),
                    Column("lr head", "lr_head", ".0e", 7)]


def header(title: str, facts: list[str], heads: list[tuple[str, dict[str, Any]]] | None = None) -> None:
    """What a run is about to do: a title, one fact per line, and a small table of its heads."""
    console.print(f"[bold]{title}[/]", highlight=False)
    for fact in facts:
        console.print(f"  {fact}", highlight=False, soft_wrap=True)  # a path is never cut into lines
    if heads:
        t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
        for i, col in enumerate(heads[0][1]):
            t.add_column(col, justify="left" if i == 0 else "right", no_wrap=True,
                         max_width=16 if i == 0 else None, overflow="ellipsis")
        for _, cells in heads:
            t.add_row(*(str(v) for v in cells.values()))
        console.print(t)


LEADERBOARD = {"name": "name", "kind": "kind", "track_frame": "frame", "fit_proxy": "fit", "loss": "loss",
               "hidden_dim": "width", "num_layers": "depth", "dropout": "drop", "lr": "lr",
               "threshold": "thr", "best_epoch": "epoch", "val_loss": "val loss", "val_qpt_res": "σ(q/pT)",
               "val_pt_res": "σ(pT)/pT", "val_charge_misid": "q mis-ID"}


# printed only where the heads differ (the header shows them all)
CONFIG_COLUMNS = ("kind", "track_frame", "fit_proxy", "loss", "mlp", "dropout", "lr", "threshold")


def leaderboard_cell(column: str, value: Any) -> str:
    if value is None:
        return "–"
    if column == "val_charge_misid":
        return f"{value:.1%}"
    if column == "lr":
        return f"{value:.0e}"
    if column == "threshold":
        return f"{value:g}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def leaderboard(rows: list[dict[str, Any]], path: Path) -> None:
    """Print the configurations ranked by the val q/pT resolution at their best epoch (losses of different
    kinds, smooth-L1 and Gaussian NLL, do not compare), and write the same table as CSV."""
    rows = sorted(rows, key=lambda r: r.get("val_qpt_res", math.inf))
    labels = {"name": "name", "kind": "kind", "track_frame": "frame", "fit_proxy": "fit", "loss": "loss",
              "mlp": "MLP", "dropout": "drop", "lr": "lr", "threshold": "thr", "best_epoch": "ep",
              **{k: LEADERBOARD[k] for k in list(LEADERBOARD)[-4:]}}
    shown_rows = [{**r, "mlp": f"{r.get('hidden_dim')}×{r.get('num_layers')}"} for r in rows]
    shown = [c for c in labels if c not in CONFIG_COLUMNS or len({str(r.get(c)) for r in shown_rows}) > 1]
    table = Table(title="head leaderboard: best epoch of each, val split", box=box.SIMPLE_HEAD, header_style="bold",
                  pad_edge=False, show_edge=False, padding=(0, 1) if len(shown) <= 8 else (0, 0),
                  caption="σ: core width (half the central 68 %) of (pred − true)/|true|")
    for c in shown:
        table.add_column(labels[c], justify="left" if c == "name" else "right", no_wrap=True,
                         max_width=10 if c == "name" else None)
    for r in shown_rows:
        table.add_row(*[leaderboard_cell(c, r.get(c)) for c in shown])
    results.print(table)
    with atomic_write(path) as f:
        f.write(",".join(LEADERBOARD) + "\n")
        for r in rows:
            f.write(",".join(str(r.get(c, "")) for c in LEADERBOARD) + "\n")
