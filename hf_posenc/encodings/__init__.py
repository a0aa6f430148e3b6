"""One module per encoding family, each behind the small `PositionModule` interface."""

from .alibi import AlibiBias, alibi_slopes
from .base import PositionModule
from .cope import CoPE
from .rope import RotaryPosition
from .t5_bias import T5Bias, relative_position_bucket

__all__ = [
    "AlibiBias",
    "CoPE",
    "PositionModule",
    "RotaryPosition",
    "T5Bias",
    "alibi_slopes",
    "relative_position_bucket",
]
