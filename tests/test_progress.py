"""Progress reports: stages report how far they have come; the CLI draws one bar per stage while a call runs."""

from __future__ import annotations

from genre_batch import cli, progress
from genre_batch.progress import Report


def test_listeners_hear_every_stage_while_listening_only() -> None:
    """A listener hears the reports of every stage made inside its block, none after it."""
    heard: list[Report] = []
    with progress.listening(heard.append):
        progress.report(Report("extract", 3, 10, errors=1))
        progress.report(Report("fit", 1, 6, note="fold 1/5 done"))
    progress.report(Report("fit", 2, 6, note="fold 2/5 done"))
    assert heard == [Report("extract", 3, 10, 1, ""), Report("fit", 1, 6, 0, "fold 1/5 done")]


def test_bars_name_their_stage_and_what_it_counts() -> None:
    """Extraction's bar counts files and errors; the training sample's bar counts batches read; tagging's counts tracks,
    publishing's its steps (naming the one in work); training's counts fits and shows the latest step."""
    assert cli.progress_text(Report("extract", 3, 10, errors=1)) == ("extracting", "files, 1 errors")
    assert cli.progress_text(Report("read", 2, 7, note="127560 windows of 63780 sampled tracks")) == (
        "reading sample", "batches; 127560 windows of 63780 sampled tracks")
    assert cli.progress_text(Report("tag", 40, 100)) == ("tagging", "tracks")
    assert cli.progress_text(Report("publish", 3, 5, note="similar build")) == ("publishing", "steps; similar build")
    assert cli.progress_text(Report("fit", 2, 6, note="fold 3/5: round 120, validation log-loss 0.6120")) == (
        "fitting", "fits; fold 3/5: round 120, validation log-loss 0.6120")


def test_a_call_with_progress_returns_its_result_and_stops_listening() -> None:
    """`with_progress` returns the call's result (drawing nothing where stderr is no terminal) and stops listening."""
    def call() -> str:
        progress.report(Report("extract", 1, 2))
        progress.report(Report("fit", 0, 6, note="6 fits started on the workers"))
        return "done"

    assert cli.with_progress(call) == "done"
    assert progress._listeners == []
