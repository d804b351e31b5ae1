"""Progress helper: plain lines on a non-terminal, a bar on a terminal, nothing when disabled."""

import io

from geopipe.pipeline.core.progress import Progress


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_on_a_non_terminal_carry_counts_rate_and_eta():
    out = io.StringIO()
    with Progress(200, "predict", "rec", every_s=0.0, stream=out) as bar:
        bar.update(50)
        bar.set_postfix(rejects=0)
        bar.update(150)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("predict: 50/200 rec [") and "rec/s" in lines[0] and "<" in lines[0]
    assert lines[-1].startswith("predict: 200/200 rec [") and lines[-1].endswith("rejects=0]")
    assert "\r" not in out.getvalue() and len(lines) == 2  # no bar redraws, no repeated last line


def test_plain_lines_are_throttled_and_the_last_one_always_printed():
    out = io.StringIO()
    with Progress(None, "extract", "img", every_s=3600, stream=out) as bar:
        for _ in range(1000):
            bar.update(1)
        bar.total = 1000
    assert out.getvalue().splitlines() == [out.getvalue().strip()]
    assert out.getvalue().startswith("extract: 1000/1000 img")


def test_disabled_prints_nothing_and_still_counts():
    for stream in (io.StringIO(), _Tty()):
        with Progress(10, "map", "point", enabled=False, every_s=0.0, stream=stream) as bar:
            bar.update(10)
        assert stream.getvalue() == "" and bar.n == 10


def test_a_terminal_gets_a_tqdm_bar():
    out = _Tty()
    with Progress(4, "train", "step", initial=1, stream=out) as bar:
        bar.update(3)
    assert "4/4" in out.getvalue() and "\r" in out.getvalue()
