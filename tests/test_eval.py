"""The zero-shot engine on tiny random models and real rows of every task (tests/fixtures/eval/<task>/docs.jsonl)."""

import gc
import json
import math
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from torch import nn
from transformers import LlamaConfig

from chop.cli import main
from chop.eval.engine import Scorer, rolling_windows
from chop.eval.suite import evaluate, requests_of
from chop.eval.tasks import TASKS, get, load_docs
from chop.models.loading import load_model, load_tokenizer

FIX = Path(__file__).parent / "fixtures" / "eval"
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # its tokenizer: real BPE on real text (the offline copy)
MC = [t for t in TASKS.values() if t.kind == "multiple_choice"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(SMOL)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return load_model(config=dict(TINY["llama"], vocab_size=len(tokenizer), max_position_embeddings=512),
                      attn_implementation="eager").eval()


def all_requests():
    out = []
    for task in TASKS.values():
        if task.kind in ("perplexity", "blocks"):
            continue
        for doc in load_docs(task, str(FIX)):
            out += requests_of(task, doc)
    return out


def reference(model, scorer, context, continuation):
    """One request alone, through the model's own forward and full logits."""
    ctx, cont = scorer.encoder.encode_pair(context, continuation)
    full = (ctx + cont)[-(scorer.max_len + 1):]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([full[:-1]])).logits[0].float(), -1)
    pos = torch.arange(len(full) - 1 - len(cont), len(full) - 1)
    target = torch.tensor(cont)
    return logp[pos, target].sum().item(), bool((logp[pos].argmax(-1) == target).all())


def test_batched_scores_equal_one_request_at_a_time(model, tokenizer):
    requests = all_requests()
    assert len(requests) > 150
    scorer = Scorer(model, tokenizer, batch_size=7)
    batched = scorer.loglikelihood(requests)
    for (c, x), (ll, greedy) in zip(requests, batched):
        ref_ll, ref_greedy = reference(model, scorer, c, x)
        assert ll == pytest.approx(ref_ll, abs=1e-4), (c[-40:], x)
        assert greedy == ref_greedy


def test_scores_do_not_depend_on_batch_size_or_order(model, tokenizer):
    requests = all_requests()
    base = Scorer(model, tokenizer, batch_size=1).loglikelihood(requests)
    for size in (3, 64, "auto"):
        other = Scorer(model, tokenizer, batch_size=size).loglikelihood(requests)
        assert [g for _, g in other] == [g for _, g in base]
        assert max(abs(a[0] - b[0]) for a, b in zip(other, base)) < 1e-4
    perm = list(range(len(requests)))
    random.Random(0).shuffle(perm)
    shuffled = Scorer(model, tokenizer, batch_size=5).loglikelihood([requests[i] for i in perm])
    for k, i in enumerate(perm):
        assert shuffled[k][0] == pytest.approx(base[i][0], abs=1e-4)


def test_tokenisation_moves_trailing_spaces_and_splits_like_lm_eval(model, tokenizer):
    scorer = Scorer(model, tokenizer)
    ctx, cont = scorer.encoder.encode_pair("Question: is it?\nAnswer: ", "yes")
    assert tokenizer.decode(ctx) == "Question: is it?\nAnswer:" and tokenizer.decode(cont) == " yes"
    ctx, cont = scorer.encoder.encode_pair("", " hello")
    assert ctx == [scorer.encoder.prefix_id] and tokenizer.decode(cont) == " hello"
    whole = tokenizer.encode("The cat sat on the mat")
    ctx, cont = scorer.encoder.encode_pair("The cat sat", " on the mat")
    assert ctx + cont == whole


class Rigged(nn.Module):
    """A 'language model' that puts all its probability on the next token of some gold (context + continuation)."""

    def __init__(self, golds, vocab):
        super().__init__()
        self.next = {tuple(g[:i]): g[i] for g in golds for i in range(1, len(g))}
        self.vocab = vocab
        self.config = LlamaConfig(vocab_size=vocab, max_position_embeddings=4096)
        self.dummy = nn.Parameter(torch.zeros(1))
        self.base_model = self._body

    def _body(self, input_ids, use_cache=False, attention_mask=None, position_ids=None):
        # A token's history is what the attention mask lets it see (shared-context rows hold several continuations).
        out = torch.full((*input_ids.shape, self.vocab), -20.0)
        for b, row in enumerate(input_ids.tolist()):
            for t in range(len(row)):
                seen = range(t + 1) if attention_mask is None else (attention_mask[b, 0, t] == 0).nonzero()[:, 0]
                nxt = self.next.get(tuple(row[k] for k in seen))
                if nxt is not None:
                    out[b, t, nxt] = 20.0
        return SimpleNamespace(last_hidden_state=out)

    def get_output_embeddings(self):
        return nn.Identity()


def test_a_model_rigged_to_prefer_the_gold_scores_100_percent(tokenizer):
    probe = Scorer(load_model(config=dict(TINY["llama"], vocab_size=len(tokenizer))), tokenizer)
    golds = []
    for task in MC:
        for doc in load_docs(task, str(FIX)):
            choices = task.choices(doc)
            gold = task.text(doc) if task.multiple_input else task.target(doc)
            c, x = requests_of(task, doc)[choices.index(gold) if isinstance(gold, str) else int(gold)]
            golds.append(sum(probe.encoder.encode_pair(c, x), []))
    rigged = Rigged(golds, len(tokenizer))
    results = evaluate(rigged, tokenizer, [t.name for t in MC], data_dir=str(FIX), batch_size=4)
    for name, r in results.items():
        assert r.n >= 6
        for metric, value in r.metrics.items():
            assert value == 1.0, (name, metric)


def test_rolling_windows_predict_every_token_once_with_the_most_context():
    tokens = list(range(100, 123))
    windows = list(rolling_windows(tokens, prefix=1, max_len=8))
    assert [t for _, cont in windows for t in cont] == tokens
    assert windows[0] == ([1], tokens[:8])
    for ctx, cont in windows[1:]:
        assert len(ctx + cont) == 9 or ctx + cont == [1] + tokens[:len(ctx + cont) - 1]  # a full window of context
        assert ctx + cont == tokens[tokens.index(ctx[0]):tokens.index(cont[-1]) + 1]


def test_rolling_loglikelihood_equals_the_sum_over_tokens(model, tokenizer):
    scorer = Scorer(model, tokenizer, batch_size=4, max_len=16)
    text = load_docs(TASKS["wikitext"], str(FIX))[0]["page"][:400]
    ids = scorer.encoder.encode(text)
    assert len(ids) > 40  # several windows
    (total,) = scorer.loglikelihood_rolling([text])
    # Brute force: each token scored with the max_len tokens before it (the prefix token before the first).
    seq = [scorer.encoder.prefix_id] + ids
    expected = 0.0
    windows = list(rolling_windows(ids, scorer.encoder.prefix_id, 16))
    for ctx, cont in windows:
        full = (ctx + cont)[-17:]
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([full[:-1]])).logits[0].float(), -1)
        expected += sum(logp[len(full) - 1 - len(cont) + k, t].item() for k, t in enumerate(cont))
    assert total == pytest.approx(expected, abs=1e-3)
    assert len(seq) - 1 == sum(len(c) for _, c in windows)


def test_perplexity_task_reports_word_and_byte_perplexity(model, tokenizer):
    r = evaluate(model, tokenizer, "wikitext", data_dir=str(FIX), batch_size=4)["wikitext"]
    docs = load_docs(TASKS["wikitext"], str(FIX))
    n_bytes = sum(len(d["page"].encode()) for d in docs)
    ll = sum(s["ll"] for s in r.samples)
    assert r.metrics["byte_perplexity"] == pytest.approx(math.exp(-ll / n_bytes))
    assert r.metrics["bits_per_byte"] == pytest.approx(-ll / n_bytes / math.log(2))
    assert r.metrics["word_perplexity"] > r.metrics["byte_perplexity"] > 1


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


def test_chop_eval_prints_a_table_and_writes_json(tmp_path, capsys, model, tokenizer):
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    out = tmp_path / "r.json"
    main(["eval", "--model", str(tmp_path / "m"), "--tasks", "piqa,copa,lambada_openai", "--data_dir", str(FIX),
          "--output", str(out), "--batch_size", "8"])
    printed = capsys.readouterr().out
    assert "|piqa|6|acc|" in printed and "|lambada_openai|6|perplexity|" in printed
    saved = json.loads(out.read_text())
    assert set(saved["results"]) == {"piqa", "copa", "lambada_openai"} and 0 <= saved["results"]["piqa"]["acc"] <= 1
    with pytest.raises(FileExistsError, match="--output: .* exists"):
        main(["eval", "--model", str(tmp_path / "m"), "--tasks", "piqa", "--data_dir", str(FIX), "--output", str(out)])


def test_chop_eval_starts_without_lightning():
    # Lightning's import costs seconds that an evaluation of an HF model never uses.
    code = "import sys, chop, chop.cli, chop.eval.eval_cli; assert 'lightning' not in sys.modules, 'imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_chop_eval_tokenises_in_threads_even_where_parallelism_is_off(tokenizer, monkeypatch):
    # TOKENIZERS_PARALLELISM=false (the Makefile's, and many users') makes batch encoding serial; chop eval's encoder
    # turns it on for its batches alone, with the same tokens.
    import os

    from chop.eval.engine import Encoder

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    rust, seen = tokenizer.backend_tokenizer, []

    class Spy:
        def encode_batch(self, texts, **kwargs):
            seen.append(os.environ["TOKENIZERS_PARALLELISM"])
            return rust.encode_batch(texts, **kwargs)

    monkeypatch.setattr(type(tokenizer), "backend_tokenizer", property(lambda self: Spy()))
    requests = [("The cat sat on the", " mat"), ("Paris is in", " France"), ("", " hello")]
    threaded = Encoder(tokenizer, threads=True).encode_pairs(requests)
    assert seen == ["true"] and os.environ["TOKENIZERS_PARALLELISM"] == "false"
    assert Encoder(tokenizer).encode_pairs(requests) == threaded and seen == ["true", "false"]


def test_scoring_runs_with_the_collector_off_and_restores_it(model, tokenizer, monkeypatch):
    seen = []
    real = Scorer.score_tokens
    monkeypatch.setattr(Scorer, "score_tokens", lambda self, pairs: seen.append(gc.isenabled()) or real(self, pairs))
    assert gc.isenabled()
    evaluate(model, tokenizer, "copa", data_dir=str(FIX), batch_size=4)
    assert seen == [False] and gc.isenabled()
    gc.disable()
    try:  # a caller that had it off keeps it off
        evaluate(model, tokenizer, "copa", data_dir=str(FIX), batch_size=4)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_callback_evaluates_during_training_logs_and_writes_json(tmp_path):
    from conftest import scalars
    from test_training import args

    from chop.training.cli import cli_main

    cb = ("chop.ZeroShotEvalCallback", {"tasks": "piqa,copa,lambada_openai", "every_n_steps": 2,
                                             "data_dir": str(FIX), "batch_size": 8})
    cli_main(args(tmp_path, "--trainer.max_steps=4", callbacks=[cb]))
    tb = scalars(tmp_path / "tiny_cpu")
    assert len(tb["eval/piqa/acc"]) == 2 and len(tb["eval/lambada_openai/perplexity"]) == 2  # steps 2 and 4
    assert all(0 <= a <= 1 for a in tb["eval/average"])
    run = tmp_path / "tiny_cpu" / "checkpoints"
    saved = json.loads((run / "eval-step=4.json").read_text())
    assert saved["step"] == 4 and saved["results"]["copa"]["n"] == 6
    assert (run / "eval-step=2.json").exists() and not (run / "eval-step=4-v1.json").exists()  # once per step
    # `chop eval` of the step-4 checkpoint (its weights and the tokenizer it records) gives the callback's numbers
    out = tmp_path / "ckpt.json"
    main(["eval", "--model", str(run / "last.ckpt"), "--tasks", "piqa,copa,lambada_openai", "--data_dir", str(FIX),
          "--batch_size", "8", "--output", str(out)])
    assert json.loads(out.read_text())["results"] == saved["results"]


def test_callback_refuses_an_unknown_task_when_the_config_is_read():
    from chop import ZeroShotEvalCallback

    with pytest.raises(ValueError, match="unknown task 'pika'"):
        ZeroShotEvalCallback(tasks="pika")


def test_wikitext_detokenizer_matches_lm_eval():
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    from chop.eval.tasks import wikitext_detokenize

    pages = [" = = Early life = = \n He was born in 1 @,@ 000 B.C. ( in Rome ) , and \" quoted \" the N @-@ year "
             "@.@ 5 ° C . It 's the players ' ball ; [ 1 ] { x } ! ? : done . \n = = = A = = = \n",
             *[d["page"] for d in load_docs(TASKS["wikitext"], str(FIX))]]
    for page in pages:
        assert wikitext_detokenize(page) == wikitext_detokenizer({"page": page})


def test_a_batch_that_runs_out_of_memory_is_halved_and_the_scores_stay(model, tokenizer, monkeypatch):
    requests = all_requests()[:60]
    base = Scorer(model, tokenizer, batch_size=64).loglikelihood(requests)
    real, sizes = Scorer._score_batch, []

    def small_gpu(self, batch):
        tokens = sum(self.row_width(*row) for row in batch)
        if tokens > 120:
            raise torch.cuda.OutOfMemoryError("pretend")
        sizes.append(tokens)
        return real(self, batch)

    monkeypatch.setattr(Scorer, "_score_batch", small_gpu)
    halved = Scorer(model, tokenizer, batch_size=64).loglikelihood(requests)
    assert max(sizes) <= 120 and len(sizes) > 3
    assert max(abs(a[0] - b[0]) for a, b in zip(halved, base)) < 1e-4


def test_c4_perplexity_is_token_perplexity_over_packed_blocks(model, tokenizer):
    from chop.data.text import pack_blocks
    from chop.eval.tasks import stream_texts

    scorer = Scorer(model, tokenizer, batch_size=2, max_len=64)
    r = evaluate(model, tokenizer, "c4", data_dir=str(FIX), limit=5, scorer=scorer)["c4"]
    blocks = pack_blocks(stream_texts(TASKS["c4"], str(FIX)), tokenizer, 65, 5)
    assert r.n == 5 and len(blocks) == 5 and all(len(b) == 65 for b in blocks)
    total = 0.0
    with torch.no_grad():
        for b in blocks:
            logp = F.log_softmax(model(b[None, :-1]).logits[0].float(), -1)
            total += logp.gather(1, b[1:, None]).sum().item()
    assert r.metrics["perplexity"] == pytest.approx(math.exp(-total / (5 * 64)), rel=1e-5)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_shared_context_rows_equal_separate_requests_on_every_architecture(arch, tokenizer, monkeypatch):
    """Choices that share a context are scored in one row (a segment mask); the scores equal each request alone."""
    torch.manual_seed(0)
    cfg = dict(TINY[arch], vocab_size=len(tokenizer))
    cfg["n_positions" if arch == "gpt2" else "max_position_embeddings"] = 512
    model = load_model(config=cfg).eval()
    requests = [r for name in ("hellaswag", "arc_easy", "piqa") for d in load_docs(TASKS[name], str(FIX))[:3]
                for r in requests_of(TASKS[name], d)]
    masks = []
    real = Scorer._segment_mask
    monkeypatch.setattr(Scorer, "_segment_mask", lambda self, seg: masks.append(seg) or real(self, seg))
    scorer = Scorer(model, tokenizer, batch_size=4, share_contexts=True)
    batched = scorer.loglikelihood(requests)
    for (c, x), (ll, greedy) in zip(requests, batched):
        ref_ll, ref_greedy = reference(model, scorer, c, x)
        assert ll == pytest.approx(ref_ll, abs=1e-4) and greedy == ref_greedy
    assert bool(masks) == scorer.share == (arch not in ("mistral", "qwen2", "gemma2", "gemma3_text", "bloom"))


def lm_eval_reference(model, scorer, context, continuation):
    """One request alone, computed as lm-eval's HF backend computes it: full logits and their log-softmax in the
    model's dtype, the continuation's log-probabilities summed in that dtype."""
    ctx, cont = scorer.encoder.encode_pair(context, continuation)
    full = (ctx + cont)[-(scorer.max_len + 1):]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([full[:-1]])).logits[0], -1)[-len(cont):]
    target = torch.tensor(cont)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def test_bf16_scores_are_lm_eval_s_bit_for_bit(tokenizer):
    """In bf16 lm-eval rounds each log-probability and their sum to bf16; chop's rows, batches and arithmetic give
    the same bits (with shared contexts they would not: a masked row runs other kernels)."""
    torch.manual_seed(0)
    model = load_model(config=dict(TINY["llama"], vocab_size=len(tokenizer), max_position_embeddings=512),
                       dtype="bfloat16").eval()
    requests = all_requests()
    scorer = Scorer(model, tokenizer, batch_size=16)
    got = scorer.loglikelihood(requests)
    want = [lm_eval_reference(model, scorer, c, x) for c, x in requests]
    assert got == want
    assert len({ll for ll, _ in got}) > 40  # not a degenerate model
