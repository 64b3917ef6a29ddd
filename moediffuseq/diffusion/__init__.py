"""The diffusion process of MoE-DiffuSeq: schedules, loss, step samplers and samplers."""
from moediffuseq.diffusion.losses import LossTerms, diffusion_loss
from moediffuseq.diffusion.schedule import NoiseSchedule
from moediffuseq.diffusion.timestep_sampler import (
    LossAwareTimestepSampler,
    UniformTimestepSampler,
    make_timestep_sampler,
)

__all__ = [
    "LossAwareTimestepSampler",
    "LossTerms",
    "NoiseSchedule",
    "UniformTimestepSampler",
    "diffusion_loss",
    "make_timestep_sampler",
]
