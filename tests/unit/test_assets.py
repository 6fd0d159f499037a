"""chop's one rule for the Hub and its offline copies (``assets.hub_or_offline``)."""

import logging

import pytest

from chop import assets


def test_the_hub_first_then_the_offline_copy_then_a_clear_error(monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert assets.hub_or_offline("model 'm'", lambda: "hub", lambda: "copy", "") == "hub"

    def unreachable():
        raise ConnectionError("no route to host")

    with caplog.at_level(logging.WARNING):
        assert assets.hub_or_offline("model 'm'", unreachable, lambda: "copy", "") == "copy"
    assert "model 'm'" in caplog.text and "ConnectionError: no route to host" in caplog.text
    with pytest.raises(RuntimeError, match="task 't': cannot load it from the Hugging Face Hub \\(ConnectionError: no "
                                           "route to host\\) and chop has no offline copy of it; give files"):
        assets.hub_or_offline("task 't'", unreachable, None, "give files")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the Hub is not asked at all
    assert assets.hub_or_offline("model 'm'", lambda: pytest.fail("asked the Hub"), lambda: "copy", "") == "copy"
