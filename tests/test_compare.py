"""analysis.compare: several models' analysis.json side by side in one table."""
import numpy as np
import pytest

from geocap.analysis.compare import comparison_table


def analysis(entropy, accuracy, spearman, *, se=0.01, trend="falls"):
    layers = len(entropy)
    change = entropy[-1] - entropy[0] if None not in entropy else None
    unc = {"se": [se] * layers, "units": 10, "trend": trend, "change": change, "change_se": se}
    return {"entropy": {"per_layer": {"encoder_self": entropy, "decoder_self": None, "cross": entropy},
                        "per_layer_uncertainty": {"encoder_self": unc, "cross": unc},
                        "unavailable": {"decoder_self": "no decoder_self maps"}},
            "proximity": {"spearman_distance": spearman},
            "grounding": {"accuracy": accuracy, "chance": 0.125, "tokens": 40,
                          "uncertainty": {"accuracy": dict(unc, change=accuracy[-1] - accuracy[0], trend="rises")}}}


def test_models_of_different_depths_share_one_table():
    table = comparison_table({"ort": analysis([0.9, 0.8, 0.7], [0.1, 0.2, 0.3], [-0.3, -0.2, -0.1]),
                              "vit": analysis([0.5, 0.6], [0.05, 0.04], [-0.5, -0.4], trend="rises")})
    lines = table.splitlines()
    assert lines[0] == "| measure | model | layer 1 | layer 2 | layer 3 | first -> last layer / verdict |"
    row = next(line for line in lines if line.startswith("| entropy, encoder self | vit |"))
    assert row == "| entropy, encoder self | vit | 0.500 ± 0.010 | 0.600 ± 0.010 |  | +0.100 ± 0.010: rises |"
    row = next(line for line in lines if line.startswith("| grounding accuracy | ort |"))
    assert "10.0% ± 1.0%" in row and "30.0% ± 1.0%" in row and "+20.0% ± 1.0%: rises" in row
    row = next(line for line in lines if line.startswith("| proximity: Spearman(attention, distance) | ort |"))
    assert row.endswith("| +0.200 (no standard error) |")
    row = next(line for line in lines if line.startswith("| entropy, decoder self | ort |"))
    assert "not measured: no decoder_self maps" in row
    assert "ort: chance 12.5% over 40 grounded tokens" in table


def test_a_wrong_layer_order_shows():
    table = comparison_table({"m": analysis([0.9, 0.1], [0.1, 0.2], [0.0, 0.1])})
    row = next(line for line in table.splitlines() if line.startswith("| entropy, cross | m |"))
    assert row.index("0.900") < row.index("0.100")
    assert "-0.800" in row


@pytest.mark.parametrize("bad", [float("nan"), None])
def test_missing_values_read_n_a(bad):
    table = comparison_table({"m": analysis([0.9, bad], [0.1, 0.2], [0.0, 0.1])})
    assert "n/a" in next(line for line in table.splitlines() if line.startswith("| entropy, cross | m |"))


def test_figure_draws_every_model(tmp_path):
    from matplotlib.image import imread

    from geocap.analysis.compare import comparison_figure
    path = tmp_path / "compare.png"
    comparison_figure({"ort": analysis([0.9, 0.8, 0.7], [0.1, 0.2, 0.3], [-0.3, -0.2, -0.1]),
                       "vit": analysis([0.5, 0.6], [0.05, 0.04], [-0.5, -0.4])}, path)
    pixels = imread(path)
    assert pixels.shape[1] > 4 * pixels.shape[0] / 2          # one panel per measure, side by side
    blue, orange = np.array([0.12, 0.47, 0.71]), np.array([1.0, 0.5, 0.05])   # C0, C1
    rgb = pixels[..., :3].reshape(-1, 3)
    for colour in (blue, orange):
        assert (np.abs(rgb - colour).max(axis=1) < 0.05).sum() > 200, colour


def test_controlled_measures_come_first_with_intervals_and_verdicts():
    def entry(mean, half):
        return {"mean": mean, "ci95": [mean - half, mean + half], "images": 50}

    ort = analysis([0.9, 0.8], [0.1, 0.2], [-0.3, -0.2])
    ort["proximity"]["per_image"] = {"distance_given_similarity": [entry(-0.2, 0.05), entry(-0.01, 0.05)]}
    ort["grounding"]["referent_effect"] = [entry(0.02, 0.05), entry(0.3, 0.1)]
    old = analysis([0.9, 0.8], [0.1, 0.2], [-0.3, -0.2])             # an analysis.json from before the controls
    old["proximity"]["unavailable"] = {}
    lines = comparison_table({"ort": ort, "old": old}).splitlines()
    rows = [line for line in lines if "controlled" in line]
    assert lines.index(rows[0]) == 2                                  # before every naive measure
    prox = next(line for line in rows if line.startswith("| proximity, controlled") and "| ort |" in line)
    assert "-0.200 [-0.250, -0.150]" in prox and prox.endswith("| negative in layer 1; inconclusive in layer 2 |")
    ground = next(line for line in rows if line.startswith("| grounding, controlled") and "| ort |" in line)
    assert "+30.0% [+20.0%, +40.0%]" in ground and "positive in layer 2" in ground
    assert all("not measured" in line for line in rows if "| old |" in line)


# -- geocap compare: its inputs must be analyses, and --out never overwrites one -----------------


def _report(folder, data):
    import json
    folder.mkdir()
    (folder / "analysis.json").write_text(json.dumps(data))
    (folder / "report.md").write_text("the report")
    return folder


@pytest.fixture
def two_reports(tmp_path):
    a = _report(tmp_path / "a", analysis([0.9, 0.8], [0.1, 0.2], [-0.3, -0.2]))
    b = _report(tmp_path / "b", analysis([0.5, 0.6], [0.05, 0.04], [-0.5, -0.4]))
    return a, b


def _snapshot(*folders):
    return {p: p.read_bytes() for f in folders for p in sorted(f.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("target, message", [
    ("a/analysis.json", "would overwrite"), ("a/report.md", "would overwrite"), ("b/table.md", "would overwrite"),
    ("fig.png", "both the table and its figure"), ("a", "is a folder"), ("missing/dir/t.md", "does not exist"),
])
def test_compare_out_never_overwrites_an_input(tmp_path, two_reports, capsys, target, message):
    from geocap.cli import main

    before = _snapshot(*two_reports)
    assert main(["compare", f"a={two_reports[0]}", f"b={two_reports[1] / 'analysis.json'}",
                 "--out", str(tmp_path / target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("geocap: error: --out: ") and err.count("\n") == 1 and message in err
    assert _snapshot(*two_reports) == before
    assert not (tmp_path / "fig.png").exists() and not (tmp_path / "missing").exists()


def test_compare_out_writes_table_and_figure_beside_each_other(tmp_path, two_reports):
    from geocap.cli import main

    assert main(["compare", f"a={two_reports[0]}", f"b={two_reports[1]}", "--out", str(tmp_path / "t.md")]) == 0
    assert (tmp_path / "t.md").read_text().startswith("| measure | model |")
    assert (tmp_path / "t.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("content, message", [
    ([1, 2, 3], "holds a JSON list"), ("hello", "holds a JSON str"),
    ({"format": "geocap-dump", "shards": []}, "has none of the sections"),
    ({"entropy": {"per_layer": {"cross": "0.5"}}}, "'entropy.per_layer.cross' is not a list of numbers"),
    ({"entropy": {"per_layer": {"cross": [0.5, "x"]}}}, "'entropy.per_layer.cross' is not a list of numbers"),
    ({"entropy": {"per_layer": {"cross": [0.5]}, "per_layer_uncertainty": {"cross": {"se": "big"}}}},
     "'entropy.per_layer_uncertainty.cross.se' is not a list of numbers"),
    ({"grounding": {"accuracy": [0.1], "chance": "1/8"}}, "'grounding.chance' or 'grounding.tokens'"),
    ({"grounding": [0.1]}, "'grounding' is not an object"),
])
def test_compare_refuses_what_is_not_an_analysis_naming_the_file(tmp_path, capsys, content, message):
    import json

    from geocap.cli import main

    good = _report(tmp_path / "good", analysis([0.9, 0.8], [0.1, 0.2], [-0.3, -0.2]))
    bad = tmp_path / "odd.json"
    bad.write_text(json.dumps(content))
    assert main(["compare", f"good={good}", f"odd={bad}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}: not a geocap analysis" in err and message in err, err
