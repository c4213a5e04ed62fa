"""Progress bars and status lines on stderr, so stdout stays clean for tables and JSON."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import warnings
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
T = TypeVar("T")


def new_progress() -> Progress:
    """A progress display in slimlm's style that disappears when done."""
    columns = (
        TextColumn("  {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    return Progress(*columns, console=console, transient=True)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar that disappears when done."""
    with new_progress() as progress:
        yield from progress.track(items, total=total, description=description)


class LibraryBar:
    """Stands in for tqdm inside a library: bars named in `shown` are drawn like slimlm's own, the rest are silent."""

    shown: tuple[str, ...] = ()

    def __init__(self, iterable=None, total=None, desc=None, disable=False, **_):
        self.iterable = iterable
        self.progress = None
        if desc in self.shown and not disable:
            self.progress = new_progress()
            self.task = self.progress.add_task(desc, total=total if total is not None else len(iterable))
            self.progress.start()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def update(self, n: int = 1) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def set_description(self, *_, **__) -> None:
        pass

    set_postfix = set_description


@contextlib.contextmanager
def library_bars(modules: Iterable[str], shown: tuple[str, ...] = ()) -> Iterator[None]:
    """While the block runs, the tqdm of each named library module draws the bars named in `shown` in slimlm's
    style and keeps the rest quiet. A module that draws its bars another way (a later release) keeps its own."""
    bar = type("Bar", (LibraryBar,), {"shown": shown})
    patched = []
    for name in modules:
        module = importlib.import_module(name)
        if hasattr(module, "tqdm"):
            patched.append((module, module.tqdm))
            module.tqdm = bar
    try:
        yield
    finally:
        for module, original in patched:
            module.tqdm = original


def status(message: str) -> None:
    console.print(f"  {message}", highlight=False, soft_wrap=True)


def quiet_libraries() -> None:
    """Our own progress bars replace the libraries' tqdm bars and advisory warnings."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # bitsandbytes warns that the optional `kernels` package (which downloads from the hub) is absent; we do not use it.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed", irrelevant to LMs
    # lm-eval: our status lines replace its dataset-building bars and its advice about passing a model object.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for name in ("lm-eval", "lm_eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
