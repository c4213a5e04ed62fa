"""The registry of stage kinds: each kind's config class and the module whose `run(config, context)` does the work.

Config modules import only pydantic, so a recipe validates (`slimlm plan`) without torch; a stage's module,
which imports torch and the libraries it uses, is imported when a stage of that kind runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from slimlm.cast.config import CastConfig
from slimlm.compress.config import PruneConfig
from slimlm.distill.config import DistillConfig
from slimlm.export.config import ExportConfig
from slimlm.quantize.config import BitsAndBytesStageConfig
from slimlm.stage import StageConfig, StageFn


@dataclass(frozen=True)
class StageKind:
    config: type[StageConfig]
    module: str  # holds `run(config, context) -> StageResult`

    @property
    def run(self) -> StageFn:
        return importlib.import_module(self.module).run


STAGES = {
    "prune": StageKind(PruneConfig, "slimlm.compress.stage"),
    "distill": StageKind(DistillConfig, "slimlm.distill.stage"),
    "cast": StageKind(CastConfig, "slimlm.cast.stage"),
    "export": StageKind(ExportConfig, "slimlm.export.stage"),
    "bitsandbytes": StageKind(BitsAndBytesStageConfig, "slimlm.quantize.bnb"),
}
STAGE_KINDS: tuple[type[StageConfig], ...] = tuple(kind.config for kind in STAGES.values())
