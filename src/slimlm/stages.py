"""The registry of stage kinds: each kind's config class and its `run` function, in one place."""

from __future__ import annotations

from slimlm.compress import stage as prune
from slimlm.distill import stage as distill
from slimlm.quantize import bnb, cast, export

# kind -> (config class, run function)
STAGES = {
    "prune": (prune.PruneConfig, prune.run),
    "distill": (distill.DistillConfig, distill.run),
    "cast": (cast.CastConfig, cast.run),
    "export": (export.ExportConfig, export.run),
    "bitsandbytes": (bnb.BitsAndBytesStageConfig, bnb.run),
}
