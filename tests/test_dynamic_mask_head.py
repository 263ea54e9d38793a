"""Dynamic mask head parameter layout and equivalence with the grouped-conv formulation of CondInst/DiffusionInst."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffusioninst.modeling.dynamic_mask_head import (
    DynamicMaskWindows,
    dynamic_mask_logits,
    mask_head_param_layout,
    num_mask_head_params,
    parse_dynamic_params,
)


def _grouped_conv_reference(mask_feats, params, image_index, in_channels=8, channels=8, num_layers=3):
    """Per image: repeat the feature map per instance and run grouped 1x1 convs, as the original does."""
    weight_nums, bias_nums = mask_head_param_layout(in_channels, channels, num_layers)
    out = torch.zeros(params.shape[0], *mask_feats.shape[2:], dtype=mask_feats.dtype)
    for b in range(mask_feats.shape[0]):
        idx = torch.nonzero(image_index == b).squeeze(1)
        m = len(idx)
        if m == 0:
            continue
        splits = list(torch.split_with_sizes(params[idx], weight_nums + bias_nums, dim=1))
        x = mask_feats[b : b + 1].repeat(1, m, 1, 1)
        for layer in range(num_layers):
            out_ch = channels if layer < num_layers - 1 else 1
            w = splits[layer].reshape(m * out_ch, -1, 1, 1)
            bias = splits[num_layers + layer].reshape(m * out_ch)
            x = F.conv2d(x, w, bias=bias, stride=1, padding=0, groups=m)
            if layer < num_layers - 1:
                x = F.relu(x)
        out[idx] = x.reshape(m, *mask_feats.shape[2:])
    return out


def test_layout_defaults() -> None:
    assert mask_head_param_layout() == ([64, 64, 8], [8, 8, 1])
    assert num_mask_head_params() == 153
    assert mask_head_param_layout(16, 4, 2) == ([64, 4], [4, 1])
    assert num_mask_head_params(16, 4, 2) == 73
    assert mask_head_param_layout(8, 8, 1) == ([8], [1])


def test_parse_puts_all_weights_before_biases() -> None:
    params = torch.arange(2 * 153, dtype=torch.float32).reshape(2, 153)
    weights, biases = parse_dynamic_params(params, 8, 8, 3)
    assert [tuple(w.shape) for w in weights] == [(2, 8, 8), (2, 8, 8), (2, 1, 8)]
    assert [tuple(b.shape) for b in biases] == [(2, 8), (2, 8), (2, 1)]
    assert weights[0][0, 0, 1].item() == 1.0
    assert weights[0][0, 1, 0].item() == 8.0
    assert weights[1][0, 0, 0].item() == 64.0
    assert weights[2][0, 0, 7].item() == 135.0
    assert biases[0][0].tolist() == list(range(136, 144))
    assert biases[1][0, 0].item() == 144.0
    assert biases[2][1, 0].item() == 153.0 + 152.0
    with pytest.raises(ValueError):
        parse_dynamic_params(torch.zeros(2, 150), 8, 8, 3)


@pytest.mark.parametrize(
    "batch,num_instances,height,width",
    [(1, 5, 7, 9), (2, 6, 16, 12), (3, 11, 5, 5), (2, 1, 3, 4), (4, 9, 10, 1)],
)
def test_matches_grouped_conv(batch: int, num_instances: int, height: int, width: int) -> None:
    g = torch.Generator().manual_seed(batch * 100 + num_instances)
    feats = torch.randn(batch, 8, height, width, generator=g)
    params = torch.randn(num_instances, 153, generator=g) * 0.5
    image_index = torch.randint(0, batch, (num_instances,), generator=g)
    out = dynamic_mask_logits(feats, params, image_index)
    assert out.shape == (num_instances, height, width)
    torch.testing.assert_close(out, _grouped_conv_reference(feats, params, image_index), rtol=1e-5, atol=1e-5)


def test_mixed_images_unsorted_and_other_layouts() -> None:
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(3, 16, 6, 7, generator=g, dtype=torch.float64)
    image_index = torch.tensor([2, 0, 2, 1, 0, 0, 1])
    for channels, layers in ((4, 2), (8, 3), (6, 1), (5, 4)):
        params = torch.randn(7, num_mask_head_params(16, channels, layers), generator=g, dtype=torch.float64)
        out = dynamic_mask_logits(feats, params, image_index, 16, channels, layers)
        ref = _grouped_conv_reference(feats, params, image_index, 16, channels, layers)
        torch.testing.assert_close(out, ref)


def test_zero_instances_and_gradients() -> None:
    feats = torch.randn(2, 8, 4, 5)
    out = dynamic_mask_logits(feats, torch.zeros(0, 153), torch.zeros(0, dtype=torch.long))
    assert out.shape == (0, 4, 5)
    params = torch.randn(3, 153, requires_grad=True)
    feats.requires_grad_(True)
    image_index = torch.tensor([1, 0, 1])
    upstream = torch.randn(3, 4, 5)
    ours_out = dynamic_mask_logits(feats, params, image_index)
    ref_out = _grouped_conv_reference(feats, params, image_index)
    grads = torch.autograd.grad((ours_out * upstream).sum(), (params, feats))
    ref_grads = torch.autograd.grad((ref_out * upstream).sum(), (params, feats))
    for ours, ref in zip(grads, ref_grads):
        assert ours.abs().sum() > 0
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_chunking_is_transparent(monkeypatch: pytest.MonkeyPatch) -> None:
    import diffusioninst.modeling.dynamic_mask_head as head

    g = torch.Generator().manual_seed(9)
    feats = torch.randn(2, 8, 6, 6, generator=g)
    params = torch.randn(10, 153, generator=g)
    image_index = torch.randint(0, 2, (10,), generator=g)
    full = dynamic_mask_logits(feats, params, image_index)
    monkeypatch.setattr(head, "_CHUNK_ELEMENTS", 8 * 36 * 3)
    monkeypatch.setattr(head, "_CPU_CHUNK_ELEMENTS", 8 * 36 * 3)
    torch.testing.assert_close(dynamic_mask_logits(feats, params, image_index), full)
    zeros = torch.zeros(10, dtype=torch.long)
    torch.testing.assert_close(
        dynamic_mask_logits(feats[:1], params, zeros), _grouped_conv_reference(feats[:1], params, zeros)
    )


@pytest.mark.parametrize("layout", [(8, 8, 3), (8, 4, 2), (6, 8, 1)])
def test_windows_equal_the_full_map(layout) -> None:
    in_ch, ch, layers = layout
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(1, in_ch, 20, 27, generator=g)
    params = torch.randn(5, num_mask_head_params(in_ch, ch, layers), generator=g) * 0.5
    full = dynamic_mask_logits(feats, params, torch.zeros(5, dtype=torch.long), in_ch, ch, layers).sigmoid()
    windows = DynamicMaskWindows(feats[0], params, in_ch, ch, layers)
    assert windows.shape == (5, 20, 27) and len(windows) == 5
    for m, (y0, y1, x0, x1) in enumerate([(0, 20, 0, 27), (3, 4, 5, 19), (7, 20, 0, 1), (0, 11, 26, 27), (5, 9, 2, 8)]):
        torch.testing.assert_close(windows.window(m, y0, y1, x0, x1), full[m, y0:y1, x0:x1], rtol=1e-5, atol=1e-6)


def test_windows_reject_batched_features() -> None:
    with pytest.raises(ValueError, match="mask_feats of shape"):
        DynamicMaskWindows(torch.zeros(1, 8, 4, 4), torch.zeros(2, 153))
