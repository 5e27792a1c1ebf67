"""The element types layoutc knows: their names, byte sizes and numpy dtypes.

One table for every stage. The planner needs only names and sizes, so importing this
module imports nothing outside the standard library; the numpy dtype of a name is looked
up when first asked for, and ``ml_dtypes`` (which gives numpy its bfloat16 and float8
types) is imported only for those, not for an fp32 or integer tensor.

Refused: a name not in :data:`BYTES` (``KeyError`` from :func:`np_dtype`), and a numpy
dtype with no layoutc name (``KeyError`` from :func:`dtype_name`; :func:`name_of` returns
``None`` instead).
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

BYTES: dict[str, int] = {
    "fp64": 8,
    "fp32": 4,
    "fp16": 2,
    "bf16": 2,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}
NAMES = tuple(BYTES)

# numpy's own types, by the name numpy gives them
_NUMPY: dict[str, str] = {
    "fp64": "float64",
    "fp32": "float32",
    "fp16": "float16",
    "int64": "int64",
    "int32": "int32",
    "int16": "int16",
    "int8": "int8",
    "uint8": "uint8",
    "bool": "bool",
}
# the types ml_dtypes adds to numpy, by their attribute of ml_dtypes
_ML_DTYPES: dict[str, str] = {
    "bf16": "bfloat16",
    "fp8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
}


@cache
def np_dtype(name: str) -> np.dtype:
    """The numpy dtype of layoutc's dtype ``name``."""
    import numpy as np  # lazy: the dtype table is read by planning, which never loads numpy

    if name in _ML_DTYPES:
        import ml_dtypes  # lazy: as numpy, and only for bf16 and the fp8 types

        return np.dtype(getattr(ml_dtypes, _ML_DTYPES[name]))
    return np.dtype(_NUMPY[name])


def name_of(dtype: np.dtype) -> str | None:
    """The layoutc name of a numpy dtype (:func:`np_dtype`'s inverse), or None."""
    for table in (_NUMPY, _ML_DTYPES):  # ml_dtypes imported only for a dtype not numpy's own
        name = next((k for k in table if np_dtype(k) == dtype), None)
        if name is not None:
            return name
    return None


def dtype_name(dtype: np.dtype) -> str:
    """The layoutc name of a numpy dtype (:func:`np_dtype`'s inverse)."""
    name = name_of(dtype)
    if name is None:
        raise KeyError(f"numpy dtype {dtype} has no layoutc name")
    return name
