"""Samplers on an analytic problem: Gaussian data, whose exact x0 predictor is known."""
import pytest
import torch

from moediffuseq.diffusion import NoiseSchedule
from moediffuseq.diffusion.samplers import SAMPLERS, Conditioning, SamplerConfig, mbr_select, sample

MU, STD = 1.5, 0.5
M = torch.tensor([0.3, -0.2, 0.1, 0.0])
SCHEDULE = NoiseSchedule.create("sqrt", 2000)
AB = SCHEDULE.alphas_cumprod.float()


def exact_denoiser(x, t):
    """E[x0 | x_t] for x0 - m ~ N(MU, STD^2) per coordinate, x_t - m = a (x0 - m) + s eps."""
    a = AB[t].sqrt()[:, None, None]
    v = (1 - AB[t])[:, None, None]
    return MU + a * STD**2 / (a**2 * STD**2 + v) * (x - M - a * MU) + M


def problem(B=64, L=16):
    g = torch.Generator().manual_seed(0)
    anchor = torch.randn(B, L, 4, generator=g)
    target = torch.zeros(B, L, dtype=torch.bool)
    target[:, 6:] = True
    return anchor, target


def condition(anchor, target, denoise=exact_denoiser, **heads):
    return Conditioning(denoise, anchor, target, M, **heads)


@pytest.mark.parametrize("cfg", [SamplerConfig("ddpm", 2000), SamplerConfig("ddim", 100),
                                 SamplerConfig("dpm++", 10), SamplerConfig("dpm++", 20)],
                         ids=["ddpm-2000", "ddim-100", "dpm++-10", "dpm++-20"])
def test_recovers_the_data_distribution(cfg):
    anchor, target = problem()
    r = sample(condition(anchor, target), SCHEDULE, cfg, generator=torch.Generator().manual_seed(1))
    y = (r.x0 - M)[target]
    assert abs(y.mean().item() - MU) < 0.05
    assert abs(y.std().item() - STD) < 0.05
    assert torch.equal(r.x0[~target], anchor[~target])  # source bit-exact
    assert r.steps_taken == (cfg.steps if cfg.method != "dpm++" else cfg.steps + 1)


def exact_ode_solution(schedule, anchor, target, start):
    """The probability-flow ODE's exact end for the Gaussian data of ``exact_denoiser`` (its
    flow is affine: it keeps (y - alpha MU) / sqrt(alpha^2 STD^2 + sigma^2) per coordinate),
    from ``start`` (the centred noise at step T-1) to step 0, then the x0 prediction there,
    as the samplers return it. float64."""
    ab = schedule.alphas_cumprod
    a_T, s_T, a_0, s_0 = ab[-1].sqrt(), (1 - ab[-1]).sqrt(), ab[0].sqrt(), (1 - ab[0]).sqrt()
    z = (start.double() - a_T * MU) / (a_T**2 * STD**2 + s_T**2).sqrt()
    y_0 = a_0 * MU + (a_0**2 * STD**2 + s_0**2).sqrt() * z
    x0 = MU + a_0 * STD**2 / (a_0**2 * STD**2 + s_0**2) * (y_0 - a_0 * MU) + M.double()
    return torch.where(target[..., None], x0, anchor.double())


def dpm_error(schedule, steps, **options):
    """RMS distance of DPM-Solver++ from the exact ODE solution, on the schedule's own table."""
    ab = schedule.alphas_cumprod.float()

    def denoise(x, t):  # exact_denoiser on this schedule
        a, v = ab[t].sqrt()[:, None, None], (1 - ab[t])[:, None, None]
        return MU + a * STD**2 / (a**2 * STD**2 + v) * (x - M - a * MU) + M

    anchor, target = problem()
    start = torch.randn(anchor.shape, generator=torch.Generator().manual_seed(2))  # what sample draws
    exact = exact_ode_solution(schedule, anchor, target, start)
    out = sample(condition(anchor, target, denoise), schedule, SamplerConfig("dpm++", steps, **options),
                 generator=torch.Generator().manual_seed(2)).x0
    return (out.double() - exact).square().mean().sqrt().item()


@pytest.mark.parametrize("kind,T", [("sqrt", 2000), ("linear", 1000), ("cosine", 1000)])
def test_dpm_solver_converges_to_the_exact_ode_solution(kind, T):
    """Every doubling of the steps brings DPM-Solver++ closer to the exact probability-flow ODE
    solution, at least 5x over two doublings, down to 1e-3 of the data's standard deviation:
    a solver whose lambda steps stop shrinking at the ends of the schedule (time-uniform steps on
    "sqrt") stalls near 1e-2 instead."""
    schedule = SCHEDULE if kind == "sqrt" else NoiseSchedule.create(kind, T)
    steps = [5, 10, 20, 40, 80]
    errors = [dpm_error(schedule, n) for n in steps]
    for n, e, e2 in zip(steps, errors, errors[1:]):
        assert e2 < 0.9 * e, (kind, n, errors)
    for n, e, e4 in zip(steps, errors, errors[2:]):
        assert e4 < e / 5, (kind, n, errors)
    assert errors[-1] <= 1e-3 * STD, (kind, errors)


@pytest.mark.parametrize("steps", [10, 40])
def test_second_order_last_step_is_closer_than_lower_order_final(steps):
    """The default second-order last step (lower_order_final=False) lands at least 5x closer to
    the exact ODE solution than a first-order one, whose error on the schedule's last lambda gap
    stays whatever the number of steps."""
    second = dpm_error(SCHEDULE, steps)
    first = dpm_error(SCHEDULE, steps, lower_order_final=True)
    assert second * 5 < first, (second, first)


def test_starting_noise_is_centred_on_m():
    anchor, target = problem(B=1024)
    starts = []

    def recorder(x, t):
        starts.append(x.clone())  # the sampler updates x in place
        return exact_denoiser(x, t)

    sample(condition(anchor, target, recorder), SCHEDULE, SamplerConfig("ddim", 2), generator=torch.Generator().manual_seed(3))
    first = starts[0][target]  # (n, 4)
    torch.testing.assert_close(first.mean(0), M, atol=0.04, rtol=0)  # 4 standard errors
    assert abs(first.std().item() - 1) < 0.03


def test_clamping_rounds_to_the_embedding_and_early_stop():
    anchor, target = problem(B=4)
    emb = torch.randn(50, 4)
    logits_fn = lambda x: x @ emb.T  # noqa: E731
    r = sample(condition(anchor, target, embedding=emb, logits=logits_fn), SCHEDULE,
               SamplerConfig("ddim", 200, clamp=True, early_stop_patience=3), generator=torch.Generator().manual_seed(4))
    rows = r.x0[target]
    assert (rows[:, None, :] == emb[None]).all(-1).any(-1).all()  # every target vector is an embedding row
    assert r.stopped_early and r.steps_taken < 200


def test_callback_sees_every_model_call_and_changes_nothing():
    anchor, target = problem(B=4)
    seen = []
    cfg = SamplerConfig("dpm++", 5)
    plain = sample(condition(anchor, target), SCHEDULE, cfg, generator=torch.Generator().manual_seed(5))
    watched = sample(condition(anchor, target), SCHEDULE, cfg, generator=torch.Generator().manual_seed(5),
                     callback=lambda call, t, x0: seen.append((call, t, x0.clone())))
    assert torch.equal(plain.x0, watched.x0)
    assert [c for c, _, _ in seen] == list(range(1, watched.steps_taken + 1))
    assert [t for _, t, _ in seen] == sorted((t for _, t, _ in seen), reverse=True)
    assert torch.equal(seen[-1][2], watched.x0)


def test_bad_sampler_config():
    with pytest.raises(ValueError, match="sampler must be one of"):
        SamplerConfig("euler")
    anchor, target = problem(B=2)
    with pytest.raises(ValueError, match="clamp=True needs the word embedding"):
        sample(condition(anchor, target), SCHEDULE, SamplerConfig("ddim", 5, clamp=True))


def test_mbr_picks_the_consensus():
    candidates = [[1, 2, 3], [1, 2, 4], [9, 9, 9], [1, 2, 3]]
    overlap = lambda a, b: sum(x == y for x, y in zip(a, b))  # noqa: E731
    assert mbr_select(candidates, overlap) == 0


@pytest.mark.parametrize("method", SAMPLERS)
def test_self_conditioning_feeds_each_run_its_own_previous_estimate(method):
    """Every sampler hands the denoiser the previous x0 prediction of the same run (None at the
    first call), so MBR samples never see each other's estimates."""
    from moediffuseq.diffusion.samplers import Conditioning

    schedule = NoiseSchedule.create("sqrt", 200)
    anchor = torch.randn(2, 6, 4)
    target = torch.zeros(2, 6, dtype=torch.bool)
    target[:, 3:] = True
    seen, returned = [], []

    def denoise(x, t, x0_prev):
        seen.append(None if x0_prev is None else x0_prev.clone())
        out = torch.full_like(x, float(len(seen)))
        returned.append(torch.where(target[..., None], out, anchor))
        return out

    cond = Conditioning(denoise, anchor, target, torch.zeros(4), self_conditioning=True)
    for _ in range(2):  # two runs, as MBR samples
        first = len(seen)
        result = sample(cond, schedule, SamplerConfig(method, 4), generator=torch.Generator().manual_seed(0))
        assert seen[first] is None
        for i in range(first + 1, len(seen)):
            torch.testing.assert_close(seen[i], returned[i - 1])
        torch.testing.assert_close(result.x0, returned[-1])


@pytest.mark.parametrize("T", [1, 2, 3, 50, 2000])
def test_dpm_solver_steps_are_distinct_from_the_last_to_zero(T):
    from moediffuseq.diffusion.samplers import dpm_solver_timesteps

    ab = NoiseSchedule.create("sqrt", T).alphas_cumprod
    for steps in (1, 2, 5, 10, T - 1, T + 3):
        if steps < 1:
            continue
        times = dpm_solver_timesteps(ab, steps)
        assert times[0] == T - 1 and times[-1] == 0, (steps, times)
        assert all(a > b for a, b in zip(times, times[1:])), (steps, times)
        assert len(times) == (1 if T == 1 else min(steps, T - 1) + 1), (steps, times)
