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


def test_html_prose_keeps_the_main_text_and_leaves_out_code_and_navigation():
    page = """<html><head><title>t</title><script>var x;</script></head><body>
      <div class="sphinxsidebar"><ul><li>Contents</li></ul></div>
      <div class="body" role="main"><h1>Memory<a class="headerlink">\u00b6</a></h1>
        <p>The kernel   keeps
           pages.</p><pre>int x = 0;</pre><ul><li>One item</li></ul><div><p>Nested &amp; kept.</p></div>
      </div><div class="footer"><p>Footer text</p></div></body></html>"""
    assert assets.html_prose(page) == "Memory\n\nThe kernel keeps pages.\n\nOne item\n\nNested & kept."
    # A page without a main element (DocBook): its whole body.
    assert assets.html_prose("<body><h2>Intro</h2><p>First para.</p><pre>$ ls</pre></body>") == "Intro\n\nFirst para."


def test_english_mix_holds_both_corpora_and_validates_on_english_passages(tmp_path, monkeypatch):
    parts = {}
    for name, docs in (("english-passages", ["p1", "p2", "p3"]), ("debian-docs", ["d1", "d2"])):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "train.jsonl").write_text("".join(f'{{"text": "{d}"}}\n' for d in docs))
        (folder / "val.jsonl").write_text(f'{{"text": "{name} val"}}\n')
        (folder / "SOURCE.json").write_text('{"packages": {}}')
        parts[name] = folder
    monkeypatch.setenv("CHOP_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(assets, "english_passages", lambda: parts["english-passages"])
    monkeypatch.setattr(assets, "debian_docs", lambda: parts["debian-docs"])
    mix = assets.english_mix()
    train = (mix / "train.jsonl").read_text().splitlines()
    assert sorted(train) == sorted(f'{{"text": "{d}"}}' for d in ["p1", "p2", "p3", "d1", "d2"])
    assert (mix / "val.jsonl").read_text() == '{"text": "english-passages val"}\n'


def test_debian_docs_without_apt_says_what_it_needs(tmp_path, monkeypatch):
    monkeypatch.setenv("CHOP_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get, no dpkg-deb
    with pytest.raises(RuntimeError, match="corpus 'debian-docs': `apt-cache depends linux-doc` failed.*apt-get and "
                                           "dpkg-deb.*data.train_files"):
        assets.debian_docs()
    assert not (tmp_path / "corpus" / "debian-docs").exists()  # nothing half-built
