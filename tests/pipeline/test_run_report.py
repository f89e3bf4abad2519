from pipeline import explore, report
from pipeline import run as run_stage
from pipeline.config import resolve_config
from pipeline.workspace import Workspace
from tests.conftest import SMALL_SETS, TRAIN_SETS


def test_run_with_zero_rounds_stops_after_the_nucleus(small_run_copy):
    ws = Workspace(small_run_copy)
    cfg = resolve_config(ws.stored_config(), None, [*SMALL_SETS, *TRAIN_SETS, "train.nucleus_steps=4",
                                                    "explore.rounds=0"])
    result = run_stage.run(cfg, ws)
    assert result.index["steps_run"] == [] and result.explore is None  # the index was already there
    assert ws.is_complete("train") and not (small_run_copy / "ledger.sqlite").exists()
    assert (small_run_copy / "reports" / "report.html").is_file()


def test_report_plots_what_the_ledger_holds(trained_run_copy):
    ws = Workspace(trained_run_copy)
    cfg = resolve_config(ws.stored_config(), None, ["explore.rounds=1", "explore.per_round=2", "explore.k=0",
                                                    "lora.steps=4"])
    explore.run(cfg, ws)
    result = report.run(cfg, ws)
    page = (trained_run_copy / "reports" / "report.html").read_text()
    assert set(result.plots) == {"topic_graph.png", "learning_curves.png", "topic_perplexity.png", "curiosity.png",
                                 "adapters.png"}
    for name in result.plots:
        png = trained_run_copy / "reports" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f'src="{name}"' in page
    neighbourhoods, holes = page.split("<h2>Rabbit holes</h2>")
    assert neighbourhoods.count("<tr><td>") == 2  # one table row per trained neighbourhood
    holes = holes.split("<h2>Plots</h2>")[0]  # one walk probe and one generative hole (the defaults)
    assert holes.count("<tr><td>") == 2 and "<td>walk</td>" in holes and "<td>generative</td>" in holes
