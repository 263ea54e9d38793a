"""The sparse-matrix RoIAlign backward equals torchvision's gradient; the parallel forward is bit-identical to it."""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes
from torchvision.ops import roi_align

from conftest import ROOT
from diffusioninst.layers import ROIAlignCPU, parallel_roi_align, roi_align_fast_backward, use_cpu_kernels


def _rois(num: int, batch: int, extent: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(num, 2, generator=g) * extent * 1.2 - 0.1 * extent
    wh = torch.rand(num, 2, generator=g) * extent * 0.5
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[0] = torch.tensor([-40.0, -40.0, -5.0, -5.0])  # entirely outside: zero gradient
    boxes[1] = torch.tensor([extent - 10, extent - 10, extent + 30, extent + 30])  # crosses the bottom-right edge
    boxes[2] = torch.tensor([10.0, 10.0, 10.0, 30.0])  # zero width
    return torch.cat([torch.randint(0, batch, (num, 1), generator=g).float(), boxes], 1)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio,output_size,scale", [(2, (7, 7), 0.25), (1, (4, 6), 0.125), (3, (2, 2), 1.0)])
def test_gradient_equals_torchvision(aligned, sampling_ratio, output_size, scale):
    torch.manual_seed(0)
    features = torch.randn(3, 5, 17, 23, dtype=torch.float64, requires_grad=True)
    rois = _rois(40, 3, 23 / scale).double()
    grad_out = torch.randn(40, 5, *output_size, dtype=torch.float64)
    expected_out = roi_align(features, rois, output_size, scale, sampling_ratio, aligned)
    (expected,) = torch.autograd.grad(expected_out, features, grad_out)
    out = roi_align_fast_backward(features, rois, output_size, scale, sampling_ratio, aligned)
    (got,) = torch.autograd.grad(out, features, grad_out)
    assert torch.equal(out, expected_out)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_pooler_swap_keeps_forward_and_gradient():
    torch.manual_seed(0)
    pooler = ROIPooler((7, 7), (1 / 4, 1 / 8), sampling_ratio=2, pooler_type="ROIAlignV2")
    fast = ROIPooler((7, 7), (1 / 4, 1 / 8), sampling_ratio=2, pooler_type="ROIAlignV2")
    use_cpu_kernels(fast)
    assert all(type(m) is ROIAlignCPU for m in fast.level_poolers)
    feats = [torch.randn(2, 8, 32, 40, requires_grad=True), torch.randn(2, 8, 16, 20, requires_grad=True)]
    boxes = [Boxes(_rois(30, 1, 128, seed=s)[:, 1:].clamp(0, 128)) for s in (1, 2)]
    grad = torch.randn(60, 8, 7, 7)
    ref = pooler(feats, boxes)
    ref_grads = torch.autograd.grad(ref, feats, grad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the sparse-beta warning is silenced
        out = fast(feats, boxes)
        grads = torch.autograd.grad(out, feats, grad)
    assert torch.equal(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_needs_fixed_sampling_ratio():
    with pytest.raises(ValueError, match="POOLER_SAMPLING_RATIO"):
        roi_align_fast_backward(torch.zeros(1, 1, 4, 4), torch.zeros(1, 5), (2, 2), 1.0, 0, True)


@pytest.fixture
def three_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # chunked even on a one-core machine
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parallel_forward_is_bit_identical_to_one_torchvision_call(three_threads, dtype):
    torch.manual_seed(0)
    features = torch.randn(3, 16, 40, 52, dtype=dtype)
    rois = _rois(101, 3, 52 / 0.25).to(dtype)
    for sampling_ratio in (2, 0):
        expected = roi_align(features, rois, (7, 7), 0.25, sampling_ratio, True)
        assert torch.equal(parallel_roi_align(features, rois, (7, 7), 0.25, sampling_ratio, True), expected)
        assert torch.equal(ROIAlignCPU((7, 7), 0.25, sampling_ratio, aligned=True)(features, rois), expected)


def test_parallel_forward_under_autocast_matches_torchvisions_float32_cast(three_threads):
    torch.manual_seed(0)
    features = torch.randn(2, 8, 30, 30).bfloat16()
    rois = _rois(60, 2, 120)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = roi_align(features, rois, (7, 7), 0.25, 2, True)  # torchvision's autocast kernel: float32 inside
        got = parallel_roi_align(features, rois, (7, 7), 0.25, 2, True)
    assert got.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(got, expected)


FORK_SCRIPT = """
import os, sys, torch
from diffusioninst.layers import parallel_roi_align
torch.set_num_threads(3)
features = torch.randn(1, 4, 20, 20)
rois = torch.cat([torch.zeros(50, 1), torch.rand(50, 2) * 40, 40 + torch.rand(50, 2) * 40], 1)
expected = parallel_roi_align(features, rois, (7, 7), 0.25, 2, True)  # the parent's worker threads now exist
pid = os.fork()
if pid == 0:
    os._exit(0 if torch.equal(parallel_roi_align(features, rois, (7, 7), 0.25, 2, True), expected) else 1)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.slow
def test_parallel_forward_works_in_a_forked_child():
    # A fresh interpreter: libgomp itself hangs in a child forked after the parent ran an OpenMP region.
    done = subprocess.run([sys.executable, "-c", FORK_SCRIPT], cwd=ROOT, timeout=60, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


THREADS_SCRIPT = """
import os, sys, torch
from diffusioninst import runtime
from diffusioninst.layers import roi_align as module
if runtime._openmp_set_num_threads() is None:
    print("no OpenMP runtime found"); sys.exit(0)
torch.set_num_threads(2)
features = torch.randn(1, 256, 64, 64)
(features * 2).sum()  # the main thread's OpenMP team exists now
before = len(os.listdir("/proc/self/task"))
rois = torch.cat([torch.zeros(200, 1), torch.rand(200, 2) * 100, 100 + torch.rand(200, 2) * 100], 1)
module.parallel_roi_align(features, rois, (7, 7), 0.25, 2, True)  # each chunk's output (>32768 values) is zero-filled
added = len(os.listdir("/proc/self/task")) - before
in_worker = module._thread_pool(2).submit(torch.get_num_threads).result()
print(added, in_worker, torch.get_num_threads())
"""


@pytest.mark.slow
def test_workers_start_no_openmp_teams_of_their_own():
    """More OpenMP threads than CPUs make libgomp stop spinning between parallel regions (slow small ops)."""
    done = subprocess.run([sys.executable, "-c", THREADS_SCRIPT], cwd=ROOT, timeout=60, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    if done.stdout.startswith("no OpenMP"):
        pytest.skip(done.stdout.strip())
    added, in_worker, in_main = (int(v) for v in done.stdout.split())
    assert (added, in_worker, in_main) == (2, 1, 2)  # the two workers only; they run ops on one thread


def test_one_pool_serves_calls_with_few_and_many_rois(three_threads):
    from diffusioninst.layers import roi_align as module

    features = torch.randn(1, 4, 30, 30)
    for num in (100, 20, 60):  # 3, 2 and 3 chunks
        rois = _rois(num, 1, 120)
        assert torch.equal(parallel_roi_align(features, rois, (7, 7), 0.25, 2, True),
                           roi_align(features, rois, (7, 7), 0.25, 2, True))
        if num == 100:
            pool = module._pool
    assert module._pool is pool and module._pool_workers == 3
