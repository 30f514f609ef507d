"""geocap.progress: a bar on a terminal, whole lines at an interval in a log, nothing when off."""
import io

import pytest

from geocap.progress import DEFAULT_INTERVAL_S, log_interval, progress_bar


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_whole_lines_without_carriage_returns(monkeypatch):
    monkeypatch.setenv("GEOCAP_PROGRESS_INTERVAL", "0")
    log = io.StringIO()
    assert list(progress_bar(range(5), stream=log, desc="work", unit="img")) == [0, 1, 2, 3, 4]
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert len(lines) >= 2 and all(line.startswith("work:") for line in lines)
    assert "5/5" in lines[-1]


def test_a_log_is_written_at_most_once_per_interval(monkeypatch):
    monkeypatch.delenv("GEOCAP_PROGRESS_INTERVAL", raising=False)
    assert log_interval() == DEFAULT_INTERVAL_S
    log = io.StringIO()
    bar = progress_bar(total=1000, stream=log, desc="train")
    for _ in range(1000):
        bar.update(1)
        bar.set_postfix_str("loss 1.0", refresh=False)
    bar.close()
    lines = log.getvalue().splitlines()
    assert 1 <= len(lines) <= 3 and "1000/1000" in lines[-1] and "loss 1.0" in lines[-1]


def test_a_log_gets_no_cursor_movements_from_nested_bars(monkeypatch):
    """An outer bar (geocap study's models) open while inner ones run (each model's training):
    tqdm stacks them with cursor movements, which a log cannot show; it gets whole lines only."""
    monkeypatch.setenv("GEOCAP_PROGRESS_INTERVAL", "0")
    log = io.StringIO()
    outer = progress_bar(total=2, stream=log, desc="study")
    for _ in range(2):
        for _ in progress_bar(range(3), stream=log, desc="train"):
            pass
        outer.update(1)
    outer.close()
    lines = log.getvalue().splitlines()
    assert "\x1b" not in log.getvalue()
    assert lines and all(line.startswith(("study:", "train:")) for line in lines), lines
    assert "2/2" in [line for line in lines if line.startswith("study:")][-1]


def test_a_terminal_gets_a_bar_redrawn_in_place():
    term = _Terminal()
    for _ in progress_bar(range(3), stream=term, desc="work"):
        pass
    assert "\r" in term.getvalue() and "3/3" in term.getvalue()


def test_disabled_writes_nothing_and_keeps_the_bar_methods():
    log = io.StringIO()
    assert list(progress_bar(range(3), enabled=False, stream=log)) == [0, 1, 2]
    with progress_bar(enabled=False, total=3, stream=log) as bar:
        bar.update(2)
        bar.set_postfix_str("x", refresh=False)
    bar.close()
    assert log.getvalue() == ""


@pytest.mark.parametrize("raw", ["soon", "-1", "nan"])
def test_a_bad_interval_is_named(monkeypatch, raw):
    monkeypatch.setenv("GEOCAP_PROGRESS_INTERVAL", raw)
    with pytest.raises(ValueError, match="GEOCAP_PROGRESS_INTERVAL must be a number of seconds >= 0"):
        log_interval()
