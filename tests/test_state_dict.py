"""state_dict save/load of every head through torch.save/torch.load, and heads moved between
dtypes (issue 8).

A loaded head must continue exactly where the saved one stopped: the same class centres, the same
KappaFace statistics and margins, the same ElasticFace draw stream (the generator's state is in the
``state_dict``). ``torch.load`` runs with its default ``weights_only=True``: a checkpoint holds
tensors and plain containers only.
"""
from __future__ import annotations

import io

import pytest
import torch

import fusedface as ff

IN, OUT = 8, 11


def _kappa():
    return ff.KappaFace(IN, OUT)


HEADS = {
    "ArcFace": lambda: ff.ArcFace(IN, OUT),
    "CosFace": lambda: ff.CosFace(IN, OUT),
    "CombinedMargin": lambda: ff.CombinedMargin(IN, OUT),
    "SphereFace": lambda: ff.SphereFace(IN, OUT),
    "ElasticArcFace": lambda: ff.ElasticArcFace(IN, OUT, generator=torch.Generator().manual_seed(1)),
    "ElasticArcFace-plus": lambda: ff.ElasticArcFace(IN, OUT, plus=True, generator=torch.Generator().manual_seed(2)),
    "ElasticCosFace-plus": lambda: ff.ElasticCosFace(IN, OUT, plus=True, generator=torch.Generator().manual_seed(3)),
    "KappaFace": _kappa,
    "SVSoftmax": lambda: ff.SVSoftmax(IN, OUT),
    "MVSoftmax": lambda: ff.MVSoftmax(IN, OUT),
    "NPT": lambda: ff.NPT(IN, OUT, k=3),
    "OTFace": lambda: ff.OTFace(IN, OUT, ot_iters=5),
    "AdaFace": lambda: ff.AdaFace(IN, OUT),
    "CurricularFace": lambda: ff.CurricularFace(IN, OUT),
    "MagFace": lambda: ff.MagFace(IN, OUT),
    "SubCenterArcFace": lambda: ff.SubCenterArcFace(IN, OUT, k=3),
}


def _batch(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, IN, generator=g).to(dtype)
    y = torch.randint(0, OUT, (12,), generator=g)
    y[0], y[-1] = y[1], -1
    return x, y, torch.randn(12, 3, 2, 2, generator=g).to(dtype)


def _loss(head, x, y, fmap):
    return head(x, y, fmap) if isinstance(head, ff.OTFace) else head(x, y)


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf)  # weights_only=True (the default)


def _used(head):
    """A head with non-default state: two training steps (KappaFace: an epoch ended in between,
    then more statistics; ElasticFace: its generator advanced)."""
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    for step in range(2):
        x, y, fmap = _batch(step)
        loss = _loss(head, x, y, fmap)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if isinstance(head, ff.KappaFace) and step == 0:
            head.end_epoch()
    return head


@pytest.mark.parametrize("name", list(HEADS))
def test_state_dict_roundtrip(name):
    torch.manual_seed(0)
    saved = _used(HEADS[name]())
    torch.manual_seed(123)  # a different initialisation and different generator seeds
    loaded = HEADS[name]()
    if getattr(loaded, "generator", None) is not None:
        loaded.generator.manual_seed(999)
    sd = saved.state_dict()
    loaded.load_state_dict(_roundtrip(sd))
    for key, value in sd.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(loaded.state_dict()[key], value), f"{name}: {key}"
    # the loaded head continues exactly where the saved one is: two more calls, bitwise equal
    for step in (5, 6):
        x, y, fmap = _batch(step)
        a, b = _loss(saved, x, y, fmap), _loss(loaded, x, y, fmap)
        assert torch.equal(a, b), f"{name}: call {step}: {a.item()} != {b.item()}"


def test_kappaface_state_is_in_the_state_dict():
    head = _used(_kappa())
    sd = head.state_dict()
    for key in ("weight", "class_margins", "resultant_sum", "epoch_counts", "class_counts", "class_kappa", "epochs_seen"):
        assert key in sd, key
    assert int(sd["epochs_seen"]) == 1 and int(sd["epoch_counts"].sum()) > 0, "mid-epoch statistics are saved"
    assert not torch.all(sd["class_margins"] == head.m0), "the margins of the ended epoch are saved"
    loaded = _kappa()
    loaded.load_state_dict(_roundtrip(sd))
    loaded.end_epoch()
    head.end_epoch()
    assert torch.equal(loaded.class_margins, head.class_margins), "the next epoch's margins agree"


@pytest.mark.parametrize("plus", [False, True])
def test_elastic_generator_state_restored_into_a_head_without_one(plus):
    """A checkpoint of a seeded ElasticFace head, loaded into a head built without a generator,
    gives that head a generator with the saved state (the stream continues)."""
    saved = _used(ff.ElasticArcFace(IN, OUT, plus=plus, generator=torch.Generator().manual_seed(4)))
    loaded = ff.ElasticArcFace(IN, OUT, plus=plus)
    assert loaded.generator is None
    loaded.load_state_dict(_roundtrip(saved.state_dict()))
    assert loaded.generator is not None
    x, y, _ = _batch(7)
    assert torch.equal(saved(x, y), loaded(x, y))


def test_elastic_without_generator_roundtrips():
    head = ff.ElasticCosFace(IN, OUT)
    sd = _roundtrip(head.state_dict())
    other = ff.ElasticCosFace(IN, OUT)
    other.load_state_dict(sd)
    assert other.generator is None and torch.equal(other.weight, head.weight)


@pytest.mark.parametrize("name", list(HEADS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=["float64", "bfloat16", "float16"])
def test_head_moved_between_dtypes(name, dtype):
    """``head.to(dtype)`` converts the centres and floating state; the head then runs on inputs of
    that dtype with a finite loss close to the fp32 head's, its gradient in that dtype; and a
    state_dict crosses dtypes both ways (load_state_dict converts)."""
    torch.manual_seed(0)
    head32 = _used(HEADS[name]())
    moved = HEADS[name]()
    moved.load_state_dict(_roundtrip(head32.state_dict()))
    moved = moved.to(dtype)
    assert moved.weight.dtype == dtype
    kept = set(getattr(moved, "_statistics", ())) if dtype in (torch.float16, torch.bfloat16) else set()
    for key, buf in moved.named_buffers():
        src = dict(head32.named_buffers())[key]
        # running statistics (KappaFace's, AdaFace's, CurricularFace's) keep their dtype under a 16-bit cast
        want = src.dtype if (key in kept or not src.is_floating_point()) else dtype
        assert buf.dtype == want, key
    x, y, fmap = _batch(9)
    if getattr(head32, "generator", None) is not None:  # the same draws for both
        moved.generator.set_state(head32.generator.get_state())
    want = _loss(head32, x, y, fmap)
    got = _loss(moved, x.to(dtype), y, fmap.to(dtype))
    assert torch.isfinite(got)
    tol = {torch.float64: 1e-5, torch.bfloat16: 0.05, torch.float16: 0.01}[dtype]
    assert abs(got.item() - want.item()) <= tol * max(1.0, abs(want.item())), (got.item(), want.item())
    got.backward()
    assert moved.weight.grad.dtype == dtype and torch.isfinite(moved.weight.grad).all()
    # and back: the moved head's state loads into an fp32 head
    back = HEADS[name]()
    back.load_state_dict(_roundtrip(moved.state_dict()))
    assert back.weight.dtype == torch.float32
    assert torch.equal(back.weight, moved.weight.float())
