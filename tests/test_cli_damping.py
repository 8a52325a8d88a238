"""--damping reaches the ranking as well as the refit, through the command line (prune, its
rounds, the sweep), on the tiny BERT of test_cli."""

import pytest

from test_cli import run, tiny_dir  # noqa: F401 - fixtures

pytest.importorskip("transformers")


@pytest.mark.parametrize("command, extra", [("prune", []), ("prune", ["--steps", "2"]), ("sweep", [])])
def test_prune_ranks_by_the_refit_of_its_damping(run, tmp_path, tiny_dir, monkeypatch, command, extra):
    """--damping sets the refit the heads are removed with and the one the reconstruction
    score ranks by: one round or several, and every recipe of the sweep."""
    import headprune.ranking.units as units

    real, seen = units.reconstruction_score, []

    def spy(scores, gqa="query", damping=None):
        seen.append(damping)
        return real(scores, gqa, damping)

    monkeypatch.setattr(units, "reconstruction_score", spy)
    options = (["--ratio", "0.3", "--score", "reconstruction", "--scope", "per_layer"] if command == "prune" else
               ["--ratios", "0.3"])
    code, err = run([command, tiny_dir, *options, "--samples", "4", "--seq-len", "16", "--quiet", "--damping", "0.25",
                     "--out", tmp_path / "o", *extra])
    assert code == 0, err
    assert seen and set(seen) == {0.25}
