from pipeline import metrics_log


def test_a_resumed_training_drops_what_its_killed_run_logged_after_the_checkpoint(tmp_path):
    log = tmp_path / "logs" / "metrics.jsonl"
    for nb, step in (("a", 0), ("a", 10), ("b", 10), ("a", 20), ("a", 30)):
        metrics_log.append(log, {"nb": nb, "step": step})
    with open(log, "a") as f:
        f.write('{"nb": "a", "step": 3')  # a write cut by the kill
    assert [r["step"] for r in metrics_log.read(log)] == [0, 10, 10, 20, 30]  # the cut line is skipped
    assert metrics_log.drop_after(log, "a", 10) == 3
    assert metrics_log.read(log) == [{"nb": "a", "step": 0}, {"nb": "a", "step": 10}, {"nb": "b", "step": 10}]
    assert metrics_log.drop_after(log, "a", -1) == 2  # started over: none of its rows stay
    assert metrics_log.read(log) == [{"nb": "b", "step": 10}]
