"""nn.Module heads: training loops whose loss falls, state, mappings from InsightFace and PML."""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import fusedface as ff
from conftest import assert_close

HEADS = [
    pytest.param(ff.ArcFace, {}, id="ArcFace"),
    pytest.param(ff.CosFace, {}, id="CosFace"),
    pytest.param(ff.CombinedMargin, {}, id="CombinedMargin"),
    pytest.param(ff.SphereFace, dict(margin=2.0), id="SphereFace"),
    pytest.param(ff.ElasticArcFace, {}, id="ElasticArcFace"),
    pytest.param(ff.ElasticArcFace, dict(plus=True), id="ElasticArcFace-plus"),
    pytest.param(ff.ElasticCosFace, dict(plus=True), id="ElasticCosFace-plus"),
    pytest.param(ff.KappaFace, {}, id="KappaFace"),
    pytest.param(ff.SVSoftmax, {}, id="SVSoftmax"),
    pytest.param(ff.MVSoftmax, dict(margin_type="arc"), id="MVSoftmax-arc"),
    pytest.param(ff.NPT, dict(k=2), id="NPT"),
    pytest.param(ff.OTFace, {}, id="OTFace"),
]


def _dataset(n_classes=20, per_class=10, in_dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, in_dim, generator=g)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    X = centres[y] + 0.7 * torch.randn(len(y), in_dim, generator=g)
    return X, y


class _Backbone(nn.Module):
    def __init__(self, in_dim=32, emb=16):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_dim, 64), nn.ReLU(), nn.Linear(64, 48))
        self.neck = nn.Linear(48, emb)

    def forward(self, x):
        h = self.body(x)
        return self.neck(h), h.view(-1, 3, 4, 4)  # embeddings and a "feature map"


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("cls,kw", HEADS)
def test_twenty_step_training_loss_falls(cls, kw, backend):
    torch.manual_seed(0)
    X, Y = _dataset()
    net = _Backbone()
    head = cls(16, 20, backend=backend, **kw)
    opt = torch.optim.SGD(list(net.parameters()) + list(head.parameters()), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    losses = []
    for step in range(20):
        idx = torch.randperm(len(Y), generator=g)[:64]
        emb, fmap = net(X[idx])
        loss = head(emb, Y[idx], fmap) if cls is ff.OTFace else head(emb, Y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if cls is ff.KappaFace and step == 9:
            head.end_epoch()
    assert all(math.isfinite(v) for v in losses), losses
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, f"{cls.__name__}: loss did not fall: {losses}"
    if hasattr(head, "options") and cls is not ff.NPT:
        assert 0.0 <= float(head.last_accuracy) <= 1.0
        assert 0.0 <= float(head.last_sv_fraction) <= 1.0


def test_heads_hold_W_as_C_by_D_parameter_with_device_and_dtype():
    h = ff.ArcFace(12, 34, device="cpu", dtype=torch.float64)
    assert isinstance(h.weight, nn.Parameter) and h.weight.shape == (34, 12) and h.weight.dtype == torch.float64
    before = h.weight.detach().clone()
    h.reset_parameters()
    assert not torch.equal(before, h.weight)
    r = repr(h)
    assert "in_features=12" in r and "out_features=34" in r and "m2=0.5" in r and "scale=64.0" in r


def test_training_accuracy_comes_from_the_fused_pass():
    W = torch.eye(4, 4, dtype=torch.float64)
    h = ff.CosFace(4, 4, backend="torch", dtype=torch.float64)
    h.weight.data.copy_(W)
    x = torch.tensor([[1.0, 0.1, 0, 0], [0, 1.0, 0.9, 0], [0, 0, 0.2, 1.0], [1.0, 0, 0, 0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 2, -1])
    h(x, y)
    # rows 0, 1 correct, row 2 wrong, row 3 ignored; row 1 has a support vector (0.9/|x| > cos − 0.35)
    assert float(h.last_accuracy) == pytest.approx(2 / 3)
    assert float(h.last_sv_fraction) == pytest.approx(2 / 3)


def test_insightface_margin_list_mapping():
    torch.manual_seed(0)
    a = ff.CombinedMargin(8, 10, margin_list=(1.0, 0.5, 0.0), dtype=torch.float64)
    b = ff.ArcFace(8, 10, dtype=torch.float64)
    b.weight.data.copy_(a.weight.data)
    x, y = torch.randn(5, 8, dtype=torch.float64), torch.randint(0, 10, (5,))
    assert_close(a(x, y), b(x, y), rtol=1e-14, name="margin_list (1, 0.5, 0) == ArcFace")


def test_pml_mapping_degrees_and_transposed_W():
    pml = pytest.importorskip("pytorch_metric_learning.losses",
                              reason="pytorch-metric-learning is a test-only dependency: pip install pytorch-metric-learning")
    torch.manual_seed(1)
    theirs = pml.ArcFaceLoss(num_classes=10, embedding_size=8, margin=28.6479, scale=64).double()
    ours = ff.ArcFace(8, 10, margin=math.radians(28.6479), theta_policy="threshold", dtype=torch.float64)
    ours.weight.data.copy_(theirs.W.data.t())  # PML stores W as [D, C]
    x, y = torch.randn(6, 8, dtype=torch.float64), torch.randint(0, 10, (6,))
    assert abs(ours(x, y).item() - theirs(x, y).item()) < 1e-10 * abs(theirs(x, y).item())


def test_kappaface_state_and_epochs():
    torch.manual_seed(2)
    h = ff.KappaFace(8, 5, dtype=torch.float64)
    x, y = torch.randn(40, 8, dtype=torch.float64), torch.arange(5).repeat(8)
    y[:3] = -1
    assert torch.all(h.class_margins == 0.8), "before the first epoch ends every class uses m0"
    h(x, y)
    assert int(h.epoch_counts.sum()) == 37, "forward in training mode accumulates the statistics"
    h.eval()
    h(x, y)
    assert int(h.epoch_counts.sum()) == 37, "eval mode does not accumulate"
    h.end_epoch()
    assert int(h.epoch_counts.sum()) == 0 and float(h.resultant_sum.abs().sum()) == 0
    assert not torch.all(h.class_margins == 0.8) and torch.isfinite(h.class_margins).all()
    # the margins are what SPEC §3 gives from these statistics
    xn = torch.nn.functional.normalize(x, dim=1)
    n = torch.stack([(y == c).sum() for c in range(5)]).double()
    S = torch.stack([xn[y == c].sum(0) for c in range(5)])
    kappa = ff.reference.kappa_from_resultant(S.norm(dim=1) / n, 8)
    assert_close(h.class_margins, ff.reference.kappa_margins(kappa, n).float(), rtol=1e-6, name="margins")
    sd = h.state_dict()
    for key in ("class_margins", "resultant_sum", "epoch_counts", "class_counts", "epochs_seen"):
        assert key in sd, key
    h2 = ff.KappaFace(8, 5, dtype=torch.float64)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    h2.load_state_dict(torch.load(buf))
    assert torch.equal(h2.class_margins, h.class_margins) and int(h2.epochs_seen) == 1


def test_kappaface_low_precision_statistics_buffer():
    h = ff.KappaFace(8, 5, stats_dtype=torch.bfloat16)
    assert h.resultant_sum.dtype == torch.bfloat16
    h.update_statistics(torch.randn(10, 8), torch.arange(5).repeat(2))
    h.end_epoch()
    assert torch.isfinite(h.class_margins).all()


@pytest.mark.parametrize("cast", [torch.float16, torch.bfloat16])
def test_kappaface_statistics_keep_their_dtype_when_the_head_is_cast(cast):
    """``head.half()`` / ``.to(bf16)`` leaves κ, the margins and the epoch's running sum in the dtype
    they were built with (fp32, or the chosen stats_dtype): a 16-bit sum of a few hundred unit vectors
    per class would lose its small terms. The margins after an epoch equal an fp32 head's on the
    same (16-bit) inputs."""
    torch.manual_seed(0)
    ref = ff.KappaFace(16, 4)
    head = ff.KappaFace(16, 4)
    head.load_state_dict(ref.state_dict())
    head.to(cast)
    assert head.weight.dtype == cast
    for name in ("class_margins", "resultant_sum", "class_kappa"):
        assert getattr(head, name).dtype == torch.float32, name
    x = (torch.randn(4, 16)[torch.arange(4).repeat(200)] + 0.6 * torch.randn(800, 16)).to(cast)
    y = torch.arange(4).repeat(200)
    for lo in range(0, 800, 100):
        head(x[lo:lo + 100], y[lo:lo + 100])
        ref(x[lo:lo + 100].float(), y[lo:lo + 100])
    head.end_epoch()
    ref.end_epoch()
    torch.testing.assert_close(head.class_margins, ref.class_margins, rtol=1e-5, atol=1e-6)
    chosen = ff.KappaFace(16, 4, stats_dtype=torch.bfloat16).half()
    assert chosen.resultant_sum.dtype == torch.bfloat16  # a deliberate stats_dtype is kept too


def test_elastic_generator_reproducible_and_in_state_dict():
    def run(seed):
        h = ff.ElasticArcFace(8, 10, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        h.weight.data.copy_(torch.linspace(-1, 1, 80, dtype=torch.float64).view(10, 8))
        x = torch.linspace(-2, 3, 40, dtype=torch.float64).view(5, 8)
        return h, h(x, torch.tensor([0, 1, 2, 3, 4]))

    h1, a = run(3)
    _, b = run(3)
    _, c = run(4)
    assert a.item() == b.item() and a.item() != c.item()
    h2, _ = run(99)
    h2.load_state_dict(h1.state_dict())
    assert torch.equal(h2.generator.get_state(), h1.generator.get_state())


def test_heads_accept_bad_options_with_clear_errors():
    with pytest.raises(ValueError, match="theta_policy"):
        ff.ArcFace(4, 4, theta_policy="clamp")
    with pytest.raises(ValueError, match="scale"):
        ff.CosFace(4, 4, scale=0)
    with pytest.raises(ValueError, match="margin_type"):
        ff.MVSoftmax(4, 4, margin_type="sphere")
    with pytest.raises(ValueError, match="k=5"):
        ff.NPT(4, 5, k=5)
