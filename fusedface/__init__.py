"""fusedface: fused margin-softmax losses for face recognition, without the [batch × classes] matrix.

``import fusedface`` gives the heads (``fusedface.ArcFace`` …), the functional API
(``fusedface.functional``), the materialised references (``fusedface.reference``), the margin
sources (``fusedface.margins``) and the OTFace transport term (``fusedface.otface``).
"""
from . import functional, margins, optim, otface, reference
from .backends import available_backends
from ._validate import set_input_checks
from .modules import (AdaFace, ArcFace, CombinedMargin, CosFace, CurricularFace, ElasticArcFace, ElasticCosFace,
                      KappaFace, MagFace, MarginSoftmaxHead, MVSoftmax, NPT, OTFace, SphereFace, SubCenterArcFace,
                      SVSoftmax)

__version__ = "0.1.0"

__all__ = [
    "functional", "reference", "margins", "optim", "otface", "available_backends", "set_input_checks", "__version__",
    "MarginSoftmaxHead", "ArcFace", "CosFace", "CombinedMargin", "SphereFace", "ElasticArcFace",
    "ElasticCosFace", "KappaFace", "SVSoftmax", "MVSoftmax", "NPT", "OTFace", "AdaFace", "CurricularFace", "MagFace",
    "SubCenterArcFace",
]
