"""One module per encoding family, each behind the small `PositionModule` interface."""

from .alibi import AlibiBias, alibi_slopes
from .base import PositionModule
from .cope import CoPE
from .rerope import ReRoPE
from .rope import RotaryPosition
from .self_extend import SelfExtend
from .t5_bias import T5Bias, relative_position_bucket

__all__ = [
    "AlibiBias",
    "CoPE",
    "PositionModule",
    "ReRoPE",
    "RotaryPosition",
    "SelfExtend",
    "T5Bias",
    "alibi_slopes",
    "relative_position_bucket",
]
