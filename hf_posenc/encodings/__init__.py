"""One module per encoding family, each behind the small `PositionModule` interface.

Importing a module registers its kind (``hf_posenc.registry``). The built-in kinds are imported first, in
the order of ``hf_posenc.KINDS`` (CLI choices, README columns, test ids); every other module of this
package is imported after them, in name order, so a new kind needs no line here.
"""

import importlib
import pkgutil

from .rope import RopeConfig, RotaryPosition  # noqa: I001  (registration order)
from .nope import NopeConfig
from .alibi import AlibiBias, AlibiConfig, alibi_slopes
from .t5_bias import T5Bias, T5BiasConfig, relative_position_bucket
from .cope import CoPE, CopeConfig
from .self_extend import SelfExtend, SelfExtendConfig
from .rerope import ReRoPE, ReRopeConfig
from .base import PositionModule

for _module in sorted(info.name for info in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = [
    "AlibiBias",
    "AlibiConfig",
    "CoPE",
    "CopeConfig",
    "NopeConfig",
    "PositionModule",
    "ReRoPE",
    "ReRopeConfig",
    "RopeConfig",
    "RotaryPosition",
    "SelfExtend",
    "SelfExtendConfig",
    "T5Bias",
    "T5BiasConfig",
    "alibi_slopes",
    "relative_position_bucket",
]
