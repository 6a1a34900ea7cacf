"""fusedface: fused margin-softmax losses for face recognition, without the [batch × classes] matrix.

``import fusedface`` gives the heads (``fusedface.ArcFace`` …), the functional API
(``fusedface.functional``) and the materialised references (``fusedface.reference``).
"""
from . import functional, reference
from ._backends import available_backends
from ._validate import set_input_checks
from .modules import (ArcFace, CombinedMargin, CosFace, ElasticArcFace, ElasticCosFace, KappaFace,
                      MarginSoftmaxHead, MVSoftmax, NPT, OTFace, SphereFace, SVSoftmax)

__version__ = "0.1.0"

__all__ = [
    "functional", "reference", "available_backends", "set_input_checks", "__version__",
    "MarginSoftmaxHead", "ArcFace", "CosFace", "CombinedMargin", "SphereFace", "ElasticArcFace",
    "ElasticCosFace", "KappaFace", "SVSoftmax", "MVSoftmax", "NPT", "OTFace",
]
