"""--verify's inputs differ per iteration (hostagent.inputs.shifted), so a
result replayed from an earlier iteration fails the check."""
import numpy as np

from hostagent import inputs


def test_a_replayed_result_fails_the_next_iterations_check():
    for dtype in ("int32", "float32"):
        xs = [inputs.make_input(3, r, 2000, dtype) for r in range(4)]
        first = np.sum([x.astype(np.float64) for x in xs], axis=0).astype(dtype)
        assert inputs.check_sum(first, xs, 800)[0]
        later = [inputs.shifted(x, 1) for x in xs]
        assert not inputs.check_sum(first, later, 800)[0]
        assert inputs.check_sum(np.sum([x.astype(np.float64) for x in later], axis=0).astype(dtype), later, 800)[0]
        assert inputs.shifted(xs[0], 0) is xs[0] and inputs.shifted(xs[0], 5).dtype == xs[0].dtype
