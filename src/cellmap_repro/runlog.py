"""Training logs: TensorBoard scalars under the experiment and a plain-text log.

TensorBoard runs live in ``experiments/<exp>/logs/tensorboard/<model_name>/``; on
resume the writer purges events after the resumed iteration, so curves never show the
steps of an interrupted run twice.
"""

from __future__ import annotations

import time
from pathlib import Path


class RunLog:
    def __init__(self, logs_dir: Path, run_name: str, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.tensorboard_dir = Path(logs_dir) / "tensorboard" / run_name
        self.tensorboard_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(self.tensorboard_dir), purge_step=resume_step)
        self.text = open(Path(logs_dir) / "train.log", "a", encoding="utf-8")

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def line(self, message: str) -> None:
        self.text.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")
        self.text.flush()

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
        self.text.close()


class NoLog:
    """The log of a rank other than 0: rank 0 alone writes the run's logs."""

    def __init__(self, logs_dir: Path, run_name: str, resume_step: int | None = None):
        self.tensorboard_dir = Path(logs_dir) / "tensorboard" / run_name

    def scalar(self, tag: str, value: float, step: int) -> None:
        return None

    def line(self, message: str) -> None:
        return None

    def close(self) -> None:
        return None
