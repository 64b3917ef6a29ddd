"""Noise schedules, respacing and the timestep draw of training."""
import pytest
import torch

from moediffuseq.diffusion import LossAwareTimestepDraw, NoiseSchedule, UniformTimestepDraw


@pytest.mark.parametrize("kind", ["sqrt", "linear", "cosine"])
def test_schedule_is_monotone_and_in_range(kind):
    s = NoiseSchedule.create(kind, 2000)
    ab = s.alphas_cumprod
    assert (ab[1:] < ab[:-1]).all() and ab[0] < 1 and ab[-1] > 0
    assert ((s.betas > 0) & (s.betas <= 0.999)).all()
    assert (s.posterior_variance >= 0).all()


def test_sqrt_schedule_values():
    s = NoiseSchedule.create("sqrt", 2000)
    assert abs(s.alphas_cumprod[0].item() - 0.985) < 1e-3
    assert abs((1 - s.alphas_cumprod[0]).sqrt().item() - 0.121) < 1e-3
    assert s.alphas_cumprod[-1].item() < 1e-6


@pytest.mark.parametrize("steps", [1, 10, 200, 2000])
def test_respacing_keeps_the_abar_of_the_kept_steps(steps):
    s = NoiseSchedule.create("sqrt", 2000)
    r = s.respace(steps)
    assert r.num_steps == steps and r.timesteps[-1] == 1999
    torch.testing.assert_close(r.alphas_cumprod, s.alphas_cumprod[r.timesteps], rtol=1e-9, atol=1e-15)


def test_respacing_explicit_and_errors():
    s = NoiseSchedule.create("linear", 100)
    r = s.respace([0, 10, 99])
    assert r.timesteps.tolist() == [0, 10, 99]
    with pytest.raises(ValueError, match="increasing"):
        s.respace([5, 3])
    with pytest.raises(ValueError, match=r"steps must be in \[1, 100\]"):
        s.respace(0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        NoiseSchedule.create("quadratic", 10)


def test_uniform_draw_weights_are_one():
    t, w = UniformTimestepDraw(50).draw(1000, torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() < 50 and torch.equal(w, torch.ones(1000))


def test_loss_aware_draw_prefers_high_loss_steps():
    draw = LossAwareTimestepDraw(4, history=3)
    assert not draw.warmed_up()
    for _ in range(3):
        draw.update(torch.arange(4), torch.tensor([1.0, 1.0, 1.0, 9.0]))
    assert draw.warmed_up()
    p = draw.probabilities()
    assert p[3] > 0.7 and abs(p.sum().item() - 1) < 1e-9
    t, w = draw.draw(20000, torch.Generator().manual_seed(0))
    # importance weights make the estimate unbiased: E[w f(t)] = mean_t f(t)
    f = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert abs((w * f[t]).mean().item() - f.mean().item()) < 0.05
    state = draw.state_dict()
    other = LossAwareTimestepDraw(4, history=3)
    other.load_state_dict(state)
    torch.testing.assert_close(other.probabilities(), p)


def test_lookup_follows_the_device_of_the_steps_and_copies_the_tables_once():
    schedule = NoiseSchedule.create("sqrt", 100).respace(10)
    t = torch.tensor([0, 3, 9])
    ab_t, steps = schedule.lookup(t)
    assert torch.equal(ab_t, schedule.alphas_cumprod.float()[t]) and torch.equal(steps, schedule.timesteps[t])
    first = schedule._on_device[t.device][0]
    schedule.lookup(t.flip(0))
    assert schedule._on_device[t.device][0] is first  # one copy per device, not one per call
    ab_meta, steps_meta = schedule.lookup(t.to("meta"))
    assert ab_meta.device.type == "meta" and steps_meta.device.type == "meta"
