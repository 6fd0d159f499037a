"""The task registry and its data (chop/eval/tasks.py): unknown tasks, missing fields, unreachable data, detokenizers."""

import json

import pytest
from helpers import EVAL_FIX

from chop.eval.tasks import TASKS, get, load_docs


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown task 'piqaa'; known: piqa, hellaswag, .*mmlu, c4, wikitext"):
        get("piqa,piqaa")


def test_files_that_lack_a_field_are_named(tmp_path):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "docs.jsonl").write_text(json.dumps({"question": "q", "sol1": "a", "sol2": "b", "label": 0}))
    with pytest.raises(ValueError, match="task 'piqa': documents from .* lack the field 'goal'"):
        load_docs(TASKS["piqa"], str(tmp_path))
    with pytest.raises(FileNotFoundError, match="task 'copa': no folder"):
        load_docs(TASKS["copa"], str(tmp_path))


def test_unreachable_data_names_the_task_the_dataset_and_the_way_out(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="task 'wikitext': dataset 'EleutherAI/wikitext_document_level'.*cannot load "
                                           "it from the Hugging Face Hub \\(HF_HUB_OFFLINE=1\\) and chop has no offline "
                                           "copy.*--data_dir DIR with DIR/wikitext/\\*.jsonl"):
        load_docs(TASKS["wikitext"])


def test_wikitext_detokenizer_matches_lm_eval():
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    from chop.eval.tasks import wikitext_detokenize

    pages = [" = = Early life = = \n He was born in 1 @,@ 000 B.C. ( in Rome ) , and \" quoted \" the N @-@ year "
             "@.@ 5 ° C . It 's the players ' ball ; [ 1 ] { x } ! ? : done . \n = = = A = = = \n",
             *[d["page"] for d in load_docs(TASKS["wikitext"], str(EVAL_FIX))]]
    for page in pages:
        assert wikitext_detokenize(page) == wikitext_detokenizer({"page": page})
