"""Diffusion schedule, forward corruption, DDIM time pairs/updates and proposal padding."""
from __future__ import annotations

import math

import pytest
import torch

from diffusioninst.modeling.diffusion import (
    boxes_from_signal,
    corrupt_boxes,
    cosine_beta_schedule,
    ddim_step,
    ddim_time_pairs,
    diffusion_buffers,
    extract,
    pad_boxes,
    predict_noise_from_start,
    q_sample,
    signal_from_boxes,
)

BUFFER_NAMES = [
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
]


def _f(t: float, s: float = 0.008) -> float:
    return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def test_cosine_schedule_closed_form() -> None:
    betas = cosine_beta_schedule(1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert math.isclose(betas[0].item(), 1 - _f(0.001) / _f(0.0), rel_tol=1e-12)
    assert math.isclose(betas[500].item(), 1 - _f(0.501) / _f(0.5), rel_tol=1e-12)
    assert betas[-1].item() == 0.999
    assert (betas >= 0).all() and (betas <= 0.999).all()
    assert (betas[1:-1] >= betas[:-2]).all()


def test_buffers_names_dtype_and_values() -> None:
    buffers = diffusion_buffers()
    assert list(buffers) == BUFFER_NAMES
    for value in buffers.values():
        assert value.dtype == torch.float64 and value.shape == (1000,)
    ac = buffers["alphas_cumprod"]
    betas = buffers["betas"]
    expected_last = math.prod(1 - b for b in betas.tolist())
    assert math.isclose(ac[-1].item(), expected_last, rel_tol=1e-9)
    assert math.isclose(ac[0].item(), 1 - betas[0].item(), rel_tol=1e-15)
    assert (ac[1:] < ac[:-1]).all()
    assert buffers["alphas_cumprod_prev"][0].item() == 1.0
    assert torch.equal(buffers["alphas_cumprod_prev"][1:], ac[:-1])
    ones = torch.ones_like(ac)
    torch.testing.assert_close(buffers["sqrt_alphas_cumprod"] ** 2, ac)
    torch.testing.assert_close(buffers["sqrt_one_minus_alphas_cumprod"] ** 2, 1 - ac)
    torch.testing.assert_close(buffers["log_one_minus_alphas_cumprod"].exp(), 1 - ac)
    torch.testing.assert_close(buffers["sqrt_recip_alphas_cumprod"] * buffers["sqrt_alphas_cumprod"], ones)
    torch.testing.assert_close(buffers["sqrt_recipm1_alphas_cumprod"] ** 2, 1 / ac - 1)
    assert buffers["posterior_variance"][0].item() == 0.0
    assert math.isclose(buffers["posterior_log_variance_clipped"][0].item(), math.log(1e-20))
    i = 10
    prev, cur, beta = ac[i - 1].item(), ac[i].item(), betas[i].item()
    assert math.isclose(buffers["posterior_variance"][i].item(), beta * (1 - prev) / (1 - cur), rel_tol=1e-12)
    assert math.isclose(buffers["posterior_mean_coef1"][i].item(), beta * math.sqrt(prev) / (1 - cur), rel_tol=1e-12)
    assert math.isclose(
        buffers["posterior_mean_coef2"][i].item(), (1 - prev) * math.sqrt(1 - beta) / (1 - cur), rel_tol=1e-12
    )


def test_ddim_time_pairs() -> None:
    assert ddim_time_pairs(1000, 1) == [(999, -1)]
    assert ddim_time_pairs(1000, 4) == [(999, 749), (749, 499), (499, 249), (249, -1)]
    full = ddim_time_pairs(10, 10)
    assert full[0] == (9, 8) and full[-1] == (0, -1) and len(full) == 10
    pairs = ddim_time_pairs(1000, 3)
    assert len(pairs) == 3 and pairs[0][0] == 999 and pairs[-1][1] == -1
    assert all(a > b for a, b in pairs)


def test_extract_and_q_sample() -> None:
    a = torch.arange(10, dtype=torch.float64)
    out = extract(a, torch.tensor([3, 7]), (2, 5, 4))
    assert out.shape == (2, 1, 1) and out.flatten().tolist() == [3.0, 7.0]
    buffers = diffusion_buffers()
    x0 = torch.randn(2, 5, 4)
    noise = torch.randn(2, 5, 4)
    t = torch.tensor([0, 600])
    xt = q_sample(x0, t, buffers["sqrt_alphas_cumprod"], buffers["sqrt_one_minus_alphas_cumprod"], noise)
    for b in range(2):
        ac = buffers["alphas_cumprod"][t[b]].item()
        torch.testing.assert_close(xt[b], (math.sqrt(ac) * x0[b] + math.sqrt(1 - ac) * noise[b]).double())
    single = q_sample(x0[1], t[1:], buffers["sqrt_alphas_cumprod"], buffers["sqrt_one_minus_alphas_cumprod"], noise[1])
    torch.testing.assert_close(single, xt[1])
    x0_hat = predict_noise_from_start(
        xt, t, x0, buffers["sqrt_recip_alphas_cumprod"], buffers["sqrt_recipm1_alphas_cumprod"]
    )
    torch.testing.assert_close(x0_hat, noise.double())


def test_corrupt_boxes_statistics() -> None:
    buffers = diffusion_buffers()
    sa, s1ma = buffers["sqrt_alphas_cumprod"], buffers["sqrt_one_minus_alphas_cumprod"]
    g = torch.Generator().manual_seed(0)
    x_start = torch.full((2, 20000, 4), 0.5)
    x_start[..., 2:] = 0.25
    noise = torch.randn(2, 20000, 4, generator=g)
    t = torch.tensor([0, 999])
    out = corrupt_boxes(x_start, t, noise, 2.0, sa, s1ma)
    assert out.shape == (2, 20000, 4) and out.dtype == torch.float32
    torch.testing.assert_close(out[0], torch.tensor([0.375, 0.375, 0.625, 0.625]).expand(20000, 4), atol=2e-2, rtol=0)
    signal = q_sample((x_start * 2 - 1) * 2.0, t, sa, s1ma, noise)
    assert abs(signal[1].mean().item()) < 0.03
    assert abs(signal[1].std().item() - 1.0) < 0.03
    ac0 = buffers["alphas_cumprod"][0].item()
    expected_std = torch.full((4,), math.sqrt(1 - ac0), dtype=torch.float64)
    expected_mean = math.sqrt(ac0) * torch.tensor([0.0, 0.0, -1.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(signal[0].std(dim=0), expected_std, rtol=0.03, atol=0)
    torch.testing.assert_close(signal[0].mean(dim=0), expected_mean, rtol=0, atol=1e-3)
    torch.testing.assert_close(signal[1].std(dim=0), torch.ones(4, dtype=torch.float64), rtol=0.03, atol=0)
    assert ((out >= -0.5) & (out <= 1.5)).all()
    centre = (out[1, :, :2] + out[1, :, 2:]) / 2
    assert (centre >= 0).all() and (centre <= 1).all()


def test_box_signal_mappings() -> None:
    boxes = torch.tensor([[[0.1, 0.2, 0.5, 0.9], [0.0, 0.0, 1.0, 1.0]]])
    signal = signal_from_boxes(boxes, 2.0)
    torch.testing.assert_close(signal[0, 1], torch.tensor([0.0, 0.0, 2.0, 2.0]))
    torch.testing.assert_close(boxes_from_signal(signal, 2.0), boxes)
    assert torch.equal(boxes_from_signal(torch.full((1, 1, 4), 9.0), 2.0), torch.tensor([[[0.5, 0.5, 1.5, 1.5]]]))
    assert signal_from_boxes(torch.tensor([[[-5.0, -5.0, 5.0, 5.0]]]), 2.0).abs().max().item() == 2.0


def test_ddim_step_formula() -> None:
    ac = diffusion_buffers()["alphas_cumprod"]
    alpha, alpha_next = ac[749], ac[499]
    g = torch.Generator().manual_seed(0)
    x0, eps, noise = (torch.randn(1, 6, 4, generator=g) for _ in range(3))
    a, an = alpha.item(), alpha_next.item()
    sigma = math.sqrt((1 - a / an) * (1 - an) / (1 - a))
    c = math.sqrt(1 - an - sigma**2)
    out = ddim_step(x0, eps, alpha, alpha_next, 1.0, noise)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x0 * math.sqrt(an) + c * eps + sigma * noise)
    det = ddim_step(x0, eps, alpha, alpha_next, 0.0, noise)
    torch.testing.assert_close(det, ddim_step(x0, eps, alpha, alpha_next, 0.0, torch.randn(1, 6, 4)))
    torch.testing.assert_close(det, x0 * math.sqrt(an) + math.sqrt(1 - an) * eps)


def test_pad_boxes() -> None:
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(3, 4, generator=g)
    padded = pad_boxes(gt, 20000, generator=g)
    assert padded.shape == (20000, 4)
    assert torch.equal(padded[:3], gt)
    placeholder = padded[3:]
    assert abs(placeholder[:, :2].mean().item() - 0.5) < 0.01
    assert abs(placeholder[:, :2].std().item() - 1 / 6) < 0.01
    assert (placeholder[:, 2:] >= 1e-4).all()
    assert (placeholder[:, 2:] == 1e-4).any()
    assert (placeholder[:, :2] < 1e-4).any()

    empty = pad_boxes(torch.zeros(0, 4), 5, generator=g)
    assert empty.shape == (5, 4)
    assert torch.equal(empty[0], torch.tensor([0.5, 0.5, 1.0, 1.0]))

    same = torch.rand(5, 4, generator=g)
    assert torch.equal(pad_boxes(same, 5), same)

    many = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    kept = pad_boxes(many, 4, generator=g)
    assert kept.shape == (4, 4)
    rows = (kept[:, 0] / 4).long()
    assert (rows[1:] > rows[:-1]).all()
    assert torch.equal(kept, many[rows])
    seen = {tuple((pad_boxes(many, 4, generator=g)[:, 0] / 4).long().tolist()) for _ in range(30)}
    assert len(seen) > 1


@pytest.mark.parametrize("timesteps", [10, 1000])
def test_alphas_cumprod_ends(timesteps: int) -> None:
    ac = diffusion_buffers(timesteps)["alphas_cumprod"]
    assert 0.9 < ac[0].item() < 1.0
    assert ac[-1].item() < 1e-4
