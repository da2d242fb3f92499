"""posemb.plots and ``posemb plot``: every picture is written, and the data behind it is checked
against independent references (plain-Python loops, the V2 vector of rope_scaling.md, closed forms)."""
from __future__ import annotations

import cmath
import math

import pytest
import torch

from posemb import plots
from posemb.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    data = path.read_bytes()
    return data.startswith(PNG_SIGNATURE) and len(data) > 5000


# ---- the command line -------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["cosine", "--head-dim", "64", "--length", "128"],
    ["cosine", "--pairs", "0", "31", "--head-dim", "64"],
    ["llama3"],
    ["schedules", "--head-dim", "64", "--factor", "4"],
    ["decay", "--bases", "10000", "500000", "--max-distance", "100"],
])
def test_cli_writes_each_picture(tmp_path, argv, capsys):
    out = tmp_path / "sub" / f"{argv[0]}.png"
    assert main(["plot", *argv, "--out", str(out)]) == 0
    assert _is_png(out)
    assert str(out) in capsys.readouterr().out


def test_cli_all_writes_four_pictures(tmp_path):
    assert main(["plot", "all", "--out-dir", str(tmp_path), "--dpi", "50"]) == 0
    for name in plots.PLOT_NAMES:
        assert _is_png(tmp_path / f"{name}.png")


def test_cli_bad_input_is_one_clear_line(tmp_path, capsys):
    assert main(["plot", "cosine", "--out", str(tmp_path / "x.txt")]) == 2
    assert "out suffix must be one of" in capsys.readouterr().err
    assert main(["plot", "cosine", "--head-dim", "7", "--out", str(tmp_path / "x.png")]) == 2
    assert "head_dim must be even" in capsys.readouterr().err
    assert main(["plot", "cosine", "--pairs", "99", "--head-dim", "64", "--out", str(tmp_path / "x.png")]) == 2
    assert "pairs[] must be <= 31" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(SystemExit):  # argparse: unknown picture
        main(["plot", "nonsense", "--out", str(tmp_path / "x.png")])


def test_functions_return_figures_and_save(tmp_path):
    from matplotlib.figure import Figure

    for name, make in (("cosine", plots.plot_cosine), ("llama3", plots.plot_llama3),
                       ("schedules", plots.plot_schedules), ("decay", plots.plot_decay)):
        figure = make()
        assert isinstance(figure, Figure)
        assert _is_png(plots.save_figure(figure, tmp_path / f"{name}.png", dpi=60))


# ---- (a) cosine -------------------------------------------------------------------------------
def test_cosine_curves_match_naive_formula():
    positions, curves = plots.cosine_curves(base=10000.0, head_dim=128, length=300)
    assert sorted(curves) == [0, 8, 16, 32, 48, 63]
    for j, curve in curves.items():
        for m in (0, 1, 7, 299):
            assert curve[m].item() == pytest.approx(math.cos(m * 10000.0 ** (-2 * j / 128)), abs=1e-12)
    # the study notes' point: neighbours differ a lot in the fast pair, barely in the slow one
    assert curves[0].diff().abs().mean() > 0.5
    assert curves[63].diff().abs().max() < 1e-3


def test_cosine_figure_plots_the_curves():
    figure = plots.plot_cosine(head_dim=64, length=100, pairs=[3, 30])
    (axis,) = figure.axes
    _, curves = plots.cosine_curves(head_dim=64, length=100, pairs=[3, 30])
    for line, j in zip(axis.get_lines(), [3, 30]):
        assert torch.allclose(torch.as_tensor(line.get_ydata()), curves[j])


# ---- (b) llama3 -------------------------------------------------------------------------------
def test_llama3_bands_match_reference_v2():
    """rope_scaling.md V2 (θ 500000, d 128, factor 8, low 1, high 4, orig 8192): pairs 0..28 kept,
    29..34 smoothed, 35..63 divided by 8."""
    data = plots.llama3_data()
    assert data["ranges"] == {"high": [(0, 28)], "medium": [(29, 34)], "low": [(35, 63)]}
    assert (data["high_wavelength"], data["low_wavelength"]) == (2048.0, 8192.0)
    scaled_inv_freq = 2 * math.pi / data["scaled"]
    for j, expected in ((29, 2.166571e-3), (31, 8.567514e-4), (34, 1.785078e-4),
                        (60, 5.677088e-7), (61, 4.624654e-7), (62, 3.767323e-7), (63, 3.068926e-7)):
        assert scaled_inv_freq[j].item() == pytest.approx(expected, rel=2e-6)
    assert data["original"][29].item() == pytest.approx(2401.7, abs=0.05)
    ratio = data["scaled"] / data["original"]
    assert torch.all(ratio[:29] == 1) and torch.allclose(ratio[35:], torch.full((29,), 8.0, dtype=torch.float64))
    # Llama 3.2 1B/3B (d 64, factor 32): the smoothed indices are 15..17 (rope_scaling.md)
    assert plots.llama3_data(head_dim=64, factor=32.0)["ranges"]["medium"] == [(15, 17)]


def test_llama3_figure_draws_the_data():
    figure = plots.plot_llama3()
    (axis,) = figure.axes
    data = plots.llama3_data()
    ydata = [torch.as_tensor(line.get_ydata(), dtype=torch.float64) for line in axis.get_lines()]
    assert any(y.shape == (64,) and torch.allclose(y, data["original"]) for y in ydata)
    assert any(y.shape == (64,) and torch.allclose(y, data["scaled"]) for y in ydata)
    thresholds = {float(y[0]) for y in ydata if len(y) == 2}
    assert thresholds == {2048.0, 8192.0}
    assert len(axis.patches) == 3  # one shaded span per band


# ---- (c) schedules ----------------------------------------------------------------------------
def test_schedule_data_closed_forms():
    data = plots.schedule_data(head_dim=128, base=10000.0, factor=8.0, original_max_position_embeddings=4096)
    by_type = {row["rope_type"]: row for row in data.values()}
    assert set(by_type) == {"default", "linear", "ntk", "dynamic", "yarn", "longrope", "llama3"}
    assert torch.allclose(by_type["default"]["stretch"], torch.ones(64, dtype=torch.float64))
    assert torch.allclose(by_type["linear"]["stretch"], torch.full((64,), 8.0, dtype=torch.float64))
    # NTK-aware: the highest frequency kept, the lowest scaled exactly as PI (YaRN App. A.1)
    assert by_type["ntk"]["stretch"][0].item() == pytest.approx(1.0)
    assert by_type["ntk"]["stretch"][-1].item() == pytest.approx(8.0)
    # dynamic at seq_len = 8 * 4096: base * (8*8 - 7)^(d/(d-2))
    expected = 2 * math.pi * (10000.0 * 57 ** (128 / 126)) ** (126 / 128)
    assert by_type["dynamic"]["wavelength"][-1].item() == pytest.approx(expected, rel=1e-9)
    assert by_type["yarn"]["attention_scale"] == pytest.approx(0.1 * math.log(8) + 1)
    assert by_type["longrope"]["attention_scale"] == pytest.approx(math.sqrt(1 + math.log(8) / math.log(4096)))
    assert by_type["llama3"]["stretch"][0].item() == 1.0 and by_type["llama3"]["stretch"][-1].item() == pytest.approx(8.0)
    for row in data.values():
        assert torch.allclose(row["wavelength"], 2 * math.pi / row["inv_freq"])


# ---- (d) decay --------------------------------------------------------------------------------
def _naive_decay(distance: int, head_dim: int, base: float) -> float:
    half = head_dim // 2
    theta = [base ** (-2 * k / head_dim) for k in range(half)]
    total, partial = 0.0, 0j
    for j in range(half):  # S_{j+1} = sum_{k <= j} e^{i r theta_k}
        partial += cmath.exp(1j * distance * theta[j])
        total += abs(partial)
    return total / half


def test_decay_matches_naive_sum_and_decays():
    distances = torch.arange(251)
    bound = plots.rope_decay_bound(distances, head_dim=128, base=10000.0)
    assert bound.shape == (251,) and bound.dtype == torch.float64
    assert bound[0].item() == pytest.approx((64 + 1) / 2)
    for r in (1, 17, 100, 250):
        assert bound[r].item() == pytest.approx(_naive_decay(r, 128, 10000.0), rel=1e-10)
    # decreasing on average (Su et al. Fig. 2): each 50-token window below the previous one's mean
    window_means = bound[1:].reshape(5, 50).mean(dim=1)
    assert torch.all(window_means[1:] < window_means[:-1])
    assert bound[200:].max() < bound[0] / 2
    assert torch.equal(plots.rope_decay_bound(250), bound)  # an int means 0..250


def test_decay_figure_one_curve_per_base():
    figure = plots.plot_decay(bases=(10000.0, 500000.0), max_distance=50)
    (axis,) = figure.axes
    lines = axis.get_lines()
    assert len(lines) == 2
    for line, base in zip(lines, (10000.0, 500000.0)):
        expected = plots.rope_decay_bound(50, base=base)
        assert torch.allclose(torch.as_tensor(line.get_ydata(), dtype=torch.float64), expected)
    with pytest.raises(ValueError, match="bases"):
        plots.plot_decay(bases=())
