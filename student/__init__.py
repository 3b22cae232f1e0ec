"""Students: small bi-encoders distilled from the teacher, trained online on CPU.

Importing the package registers the built-in students with ``Student.load``.
"""

from student.asym import AsymmetricBowStudent, StoreCandidates
from student.base import BatchScores, CandidateSource, Student, register_student, score_embeddings
from student.bow import BowConfig, BowStudent
from student.export import onnx_export
from student.losses import IPWClickLoss, ListwiseKDLoss, MarginMSELoss, OnlineLoss, OnlineLossParts
from student.tokenised import TokenisedTexts
from student.tokenizer import SubwordTokenizer, split_identifiers

__all__ = [
    "AsymmetricBowStudent",
    "BatchScores",
    "BowConfig",
    "BowStudent",
    "CandidateSource",
    "IPWClickLoss",
    "ListwiseKDLoss",
    "MarginMSELoss",
    "OnlineLoss",
    "OnlineLossParts",
    "StoreCandidates",
    "Student",
    "SubwordTokenizer",
    "TokenisedTexts",
    "onnx_export",
    "register_student",
    "score_embeddings",
    "split_identifiers",
]
