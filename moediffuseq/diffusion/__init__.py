"""The diffusion process of MoE-DiffuSeq: schedules, the loss, the timestep draw of training and
the samplers (the reverse process)."""
from moediffuseq.diffusion.losses import LossTerms, diffusion_loss
from moediffuseq.diffusion.schedule import NoiseSchedule
from moediffuseq.diffusion.timestep_draw import (
    TIMESTEP_DRAWS,
    LossAwareTimestepDraw,
    UniformTimestepDraw,
    make_timestep_draw,
)

__all__ = [
    "TIMESTEP_DRAWS",
    "LossAwareTimestepDraw",
    "LossTerms",
    "NoiseSchedule",
    "UniformTimestepDraw",
    "diffusion_loss",
    "make_timestep_draw",
]
