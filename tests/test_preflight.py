"""The checks a run makes before any work (what the DAGs' `plan` task calls)."""

import pytest

from recap_tasks.errors import RecapError
from recap_tasks.preflight import check_run


@pytest.mark.parametrize("source", ["", "   ", [], ["", " "]])
def test_a_run_without_a_source_fails_in_one_line(tmp_path, source):
    """The trigger form's Source may be left empty (it has no minLength, so the form does not flag
    its empty default before anything is typed): the run then fails at once, saying why."""
    with pytest.raises(RecapError, match=r"^no source given: .*Source field") as err:
        check_run(source=source, lake=str(tmp_path / "lake"), model=None)
    assert "\n" not in str(err.value)


def test_a_source_with_shards_passes(tmp_path, sample_shards):
    assert check_run(source=str(sample_shards), lake=str(tmp_path / "lake"), model=None) == 2
