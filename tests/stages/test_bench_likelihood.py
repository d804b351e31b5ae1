"""bench --what nll-settings at toy size: every setting scored on the same points, the old default
agrees with itself, a looser tolerance costs fewer evaluations, and the table lists every row."""

from __future__ import annotations

from click.testing import CliRunner

from geopipe.stages.bench_likelihood import OLD_DEFAULT, bench_likelihood_settings, format_likelihood_table


def test_settings_against_the_old_default(tmp_path):
    from tiny_models import tiny_store, untrained_checkpoint

    store = tiny_store(tmp_path / "s.zarr", n=12)
    ckpt = untrained_checkpoint(tmp_path / "m", "rfm")
    settings = (("dopri5 1e-3", {"rtol": 1e-3, "atol": 1e-3, "method": "dopri5"}, None),
                ("bosh3 1e-4, batch 4", {"rtol": 1e-4, "atol": 1e-4, "method": "bosh3"}, 4))
    res = bench_likelihood_settings(ckpt, store, records=8, samples=4, batch=8, settings=settings, reference=False)
    rows = {(r["points"], r["setting"]): r for r in res["rows"]}
    assert {s for _, s in rows} == {OLD_DEFAULT[0], OLD_DEFAULT[0] + " again", "dopri5 1e-3", "bosh3 1e-4, batch 4"}
    for what in ("truth", "samples"):
        old, again = rows[(what, OLD_DEFAULT[0])], rows[(what, OLD_DEFAULT[0] + " again")]
        assert old["n"] == 8 and old["max_abs_vs_old"] == 0 and again["max_abs_vs_old"] < 1e-9
        assert rows[(what, "dopri5 1e-3")]["evaluations"] < old["evaluations"]
        assert rows[(what, "bosh3 1e-4, batch 4")]["max_abs_vs_old"] < 0.05
    table = format_likelihood_table(res).splitlines()
    assert len(table) == 2 + len(res["rows"]) and "max |Δ| old" in table[0]


def test_cli_needs_a_model_and_a_store():
    from geopipe.flows.cli import cli

    res = CliRunner().invoke(cli, ["bench", "--what", "nll-settings"])
    assert res.exit_code == 1 and "--checkpoint MODEL and --store STORE" in res.output
