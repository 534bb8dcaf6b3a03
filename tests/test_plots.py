"""The run's PNG plots: written by every run, and robust to missing averaged values."""

from __future__ import annotations

from pathlib import Path

from conftest import TINY, compose_config

from swa_research.tracking.plots import PLOT_FILES, plot_history, read_history
from swa_research.training.build import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_every_run_writes_its_plots(tmp_path: Path) -> None:
    train(compose_config(["experiment=smoke", *TINY]), tmp_path)
    for name in PLOT_FILES:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert not list(tmp_path.glob(".*.tmp*"))


def test_history_round_trip_and_rows_without_average(tmp_path: Path) -> None:
    (tmp_path / "history.csv").write_text(
        "epoch,iteration,lr,train_loss,train_acc,sgd_val_loss,sgd_val_acc,sgd_test_loss,"
        "sgd_test_acc,swa_val_loss,swa_val_acc,swa_test_loss,swa_test_acc,swa_n_averaged\n"
        "1,10,0.1,2.0,0.2,1.9,0.3,1.8,0.31,,,,,0\n"
        "2,20,0.1,1.5,0.4,1.4,0.5,1.3,0.52,1.2,0.55,1.1,0.57,3\n")
    rows = read_history(tmp_path / "history.csv")
    assert rows[0]["swa_test_acc"] is None and rows[1]["swa_test_acc"] == 0.57
    written = plot_history(rows, tmp_path, title="t")
    assert [p.name for p in written] == list(PLOT_FILES)
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in written)


def test_plot_titles_name_the_overrides_and_epoch_ticks_are_whole(
        tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    import swa_research.tracking.plots as plots

    figures = []
    real = plots.save_figure

    def keep(fig, path):  # noqa: ANN001, ANN202
        if Path(path).name not in PLOT_FILES:  # the reliability diagram
            return real(fig, path)
        ax = fig.axes[0]
        ax.set_xlim(0.6, 2.4)  # a short run: matplotlib would put ticks at 1.0, 1.5, 2.0, ...
        figures.append((ax.get_title(), list(ax.get_xticks())))
        return real(fig, path)

    monkeypatch.setattr(plots, "save_figure", keep)
    train(compose_config(["experiment=smoke", *TINY]), tmp_path, run_name="swa.lr=0.001,seed=3")
    assert len(figures) == len(PLOT_FILES)
    assert all(title.endswith("swa.lr=0.001,seed=3") for title, _ in figures)
    assert all(float(t).is_integer() for _, ticks in figures for t in ticks)
