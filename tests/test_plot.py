"""--plot / plot_divergence: the series it draws and the file it writes."""

import pytest

from equiv import compare_backends
from equiv.plot import divergence_series, plot_divergence

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def comparison():
    return compare_backends(steps=3)


def test_series_hold_the_worst_leaf_of_each_step(comparison):
    series = divergence_series(comparison.report)
    assert set(series) == {"loss", "grads", "params"}
    for stage, pairs in series.items():
        for pair, points in pairs.items():
            assert [p[0] for p in points] == [1, 2, 3]
            for step, worst_abs, worst_ratio in points:
                leaves = [
                    leaf
                    for leaf in comparison.report.leaves
                    if leaf.stage == stage
                    and leaf.step == step
                    and f"{leaf.actual} vs {leaf.expected}" == pair
                ]
                assert worst_abs == max(leaf.max_abs for leaf in leaves)
                assert worst_ratio == max(leaf.ratio for leaf in leaves)


def test_plot_writes_a_png_and_touches_no_global_state(comparison, tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    path = plot_divergence(comparison, str(tmp_path / "divergence.png"))
    with open(path, "rb") as png:
        assert png.read(8) == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["divergence.png"]  # no temp left
    assert matplotlib.get_backend() == backend


def test_the_suffix_names_the_format_and_one_matplotlib_lacks_is_refused(comparison, tmp_path):
    # Found in a user trial: --plot x.txt wrote a PNG under that name, silently.
    svg = plot_divergence(comparison, str(tmp_path / "divergence.svg"))
    with open(svg, "rb") as image:
        assert b"<svg" in image.read(2000)
    with pytest.raises(ValueError, match="matplotlib writes no 'txt' images; give a file ending"):
        plot_divergence(comparison, str(tmp_path / "divergence.txt"))
    assert [p.name for p in tmp_path.iterdir()] == ["divergence.svg"]


def test_plot_into_a_missing_folder_fails_and_leaves_nothing(comparison, tmp_path):
    with pytest.raises(OSError):
        plot_divergence(comparison, str(tmp_path / "missing" / "x.png"))
    assert list(tmp_path.iterdir()) == []


def test_the_png_gets_an_ordinary_files_mode(comparison, tmp_path):
    import os

    ordinary = tmp_path / "ordinary"
    ordinary.write_bytes(b"")  # the mode the umask gives any new file
    path = plot_divergence(comparison, str(tmp_path / "divergence.png"))
    assert os.stat(path).st_mode & 0o777 == os.stat(ordinary).st_mode & 0o777


def test_exact_zeros_sit_a_decade_below_the_smallest_difference():
    from equiv.plot import log_floor

    assert log_floor([0.0, 2e-7, 5e-3]) == pytest.approx(2e-8)
    assert log_floor([0.0, 0.0]) == 1e-20  # nothing positive: any decade will do
