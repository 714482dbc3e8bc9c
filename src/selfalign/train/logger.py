"""Per-epoch log of a run: ``log.csv`` (rewritten atomically) and TensorBoard events when available."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from selfalign import atomic


class RunLogger:
    def __init__(self, run_dir: Path):
        self.path = run_dir / "log.csv"
        self.rows: list[dict] = []
        if self.path.is_file():  # resuming: keep the epochs already logged
            with open(self.path, newline="", encoding="utf-8") as fh:
                self.rows = list(csv.DictReader(fh))
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # TensorBoard is optional; the CSV log is always written
            pass

    def log_epoch(self, row: dict) -> None:
        self.rows = [r for r in self.rows if int(r["epoch"]) != int(row["epoch"])] + [row]
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic.write_text(self.path, buf.getvalue())
        if self.writer is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, int(row["epoch"]))
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
