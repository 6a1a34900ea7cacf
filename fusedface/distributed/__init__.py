"""Class-sharded heads over ``torch.distributed`` (SPEC §8, docs/distributed.md).

When ``W [C, D]`` does not fit one device, each of the ``R`` ranks holds the contiguous balanced
shard ``W[lo:hi]`` (``C // R + (r < C % R)`` classes). Per step the embeddings and labels are
all-gathered (O(B·D)), each rank runs the fused pass of any backend on its shard, the per-row
log-sum-exp, target value, arg-max and NPT top-k are merged with O(B) collectives, and the
embedding gradient is reduce-scattered back (O(B·D)). No ``[B, C]`` tensor and no class gradient
ever crosses the wire. The loss and every gradient equal single-process training on the global
batch. Partial FC sampling (``sample_rate``) composes with it.

::

    import torch.distributed as dist
    from fusedface.distributed import ShardedArcFace
    dist.init_process_group("nccl")          # torchrun sets rank and world size
    head = ShardedArcFace(512, 10_000_000, device="cuda")
    loss = head(backbone(images), labels)    # this rank's rows; the global loss on every rank
    loss.backward()

Also: :func:`margin_softmax_loss` / :func:`npt_loss` (functional, on a shard you hold),
:mod:`~fusedface.distributed.checkpoint` (save / load across world sizes),
:func:`record_communication` (what each collective sent).
"""
from ._comm import Comm, CommRecord, record_communication, shard_range, shard_sizes
from ._functions import (GlobalBatch, MarginSoftmaxShardFunction, NPTShardFunction, gather_batch, margin_softmax_loss,
                         npt_loss, sample_classes)
from .checkpoint import consolidate, full_state_dict, load_full_state_dict, load_sharded, save_sharded
from .heads import (ShardedAdaFace, ShardedArcFace, ShardedCombinedMargin, ShardedCosFace, ShardedCurricularFace,
                    ShardedElasticArcFace, ShardedElasticCosFace, ShardedHead, ShardedKappaFace, ShardedMagFace,
                    ShardedMarginSoftmaxHead, ShardedMVSoftmax, ShardedNPT, ShardedOTFace, ShardedSphereFace,
                    ShardedSubCenterArcFace, ShardedSVSoftmax)

__all__ = [
    "ShardedHead", "ShardedMarginSoftmaxHead", "ShardedArcFace", "ShardedCosFace", "ShardedCombinedMargin",
    "ShardedSphereFace", "ShardedElasticArcFace", "ShardedElasticCosFace", "ShardedKappaFace", "ShardedSVSoftmax",
    "ShardedMVSoftmax", "ShardedNPT", "ShardedOTFace", "ShardedAdaFace", "ShardedCurricularFace", "ShardedMagFace",
    "ShardedSubCenterArcFace",
    "margin_softmax_loss", "npt_loss", "sample_classes", "gather_batch", "GlobalBatch",
    "MarginSoftmaxShardFunction", "NPTShardFunction",
    "save_sharded", "load_sharded", "consolidate", "full_state_dict", "load_full_state_dict",
    "Comm", "CommRecord", "record_communication", "shard_range", "shard_sizes",
]
