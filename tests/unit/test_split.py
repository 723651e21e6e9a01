import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.split import split_even


@given(st.integers(0, 60), st.integers(1, 12))
def test_split_even_is_numpy_array_split(n, parts):
    items = [f"x{i}" for i in range(n)]
    got = split_even(items, parts)
    assert got == [list(a) for a in np.array_split(np.array(items, dtype=object), parts)]
    assert [x for part in got for x in part] == items


def test_split_even_needs_a_part():
    with pytest.raises(ValueError, match="parts"):
        split_even([1, 2], 0)
