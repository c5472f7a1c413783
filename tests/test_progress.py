import logging

from item_embeddings.progress import Progress


def test_log_lines_when_not_on_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="item_embeddings")
    with Progress(10, "embed-text", log_every_s=0.0, use_bar=False) as progress:
        progress.update(4)
        progress.update(6)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("embed-text: 4/10 items (40.0%)") and "items/s, ETA" in lines[0]
    assert lines[-1].startswith("embed-text: 10/10 items (100.0%)") and lines[-1].endswith("(done)")


def test_bar_on_a_terminal(capsys):
    with Progress(5, "embed-image", unit="image", use_bar=True) as progress:
        progress.update(5)
    err = capsys.readouterr().err
    assert "embed-image" in err and "5/5" in err and "image/s" in err
