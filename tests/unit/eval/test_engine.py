"""The zero-shot scoring engine (chop/eval/engine.py) on tiny random models and real rows of every task
(tests/fixtures/eval/<task>/docs.jsonl): batching, tokenisation, rolling windows, shared contexts, bf16 bits."""

import gc
import random

import pytest
import torch
import torch.nn.functional as F
from helpers import EVAL_FIX, TINY

from chop.eval.engine import Scorer, rolling_windows
from chop.eval.suite import evaluate, requests_of, scored_pairs
from chop.eval.tasks import TASKS, load_docs
from chop.models.loading import load_model


def all_requests():
    return scored_pairs(list(TASKS.values()), lambda task: load_docs(task, str(EVAL_FIX)))


def reference(eval_model, scorer, context, continuation):
    """One request alone, through the model's own forward and full logits."""
    ctx, cont = scorer.encoder.encode_pair(context, continuation)
    full = (ctx + cont)[-(scorer.max_len + 1):]
    with torch.no_grad():
        logp = F.log_softmax(eval_model(torch.tensor([full[:-1]])).logits[0].float(), -1)
    pos = torch.arange(len(full) - 1 - len(cont), len(full) - 1)
    target = torch.tensor(cont)
    return logp[pos, target].sum().item(), bool((logp[pos].argmax(-1) == target).all())


def lm_eval_reference(eval_model, scorer, context, continuation):
    """One request alone, computed as lm-eval's HF backend computes it: full logits and their log-softmax in the
    model's dtype, the continuation's log-probabilities summed in that dtype."""
    ctx, cont = scorer.encoder.encode_pair(context, continuation)
    full = (ctx + cont)[-(scorer.max_len + 1):]
    with torch.no_grad():
        logp = F.log_softmax(eval_model(torch.tensor([full[:-1]])).logits[0], -1)[-len(cont):]
    target = torch.tensor(cont)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def test_batched_scores_equal_one_request_at_a_time(eval_model, eval_tokenizer):
    requests = all_requests()
    assert len(requests) > 150
    scorer = Scorer(eval_model, eval_tokenizer, batch_size=7)
    batched = scorer.loglikelihood(requests)
    for (c, x), (ll, greedy) in zip(requests, batched):
        ref_ll, ref_greedy = reference(eval_model, scorer, c, x)
        assert ll == pytest.approx(ref_ll, abs=1e-4), (c[-40:], x)
        assert greedy == ref_greedy


def test_scores_do_not_depend_on_batch_size_or_order(eval_model, eval_tokenizer):
    requests = all_requests()
    base = Scorer(eval_model, eval_tokenizer, batch_size=1).loglikelihood(requests)
    for size in (3, 64, "auto"):
        other = Scorer(eval_model, eval_tokenizer, batch_size=size).loglikelihood(requests)
        assert [g for _, g in other] == [g for _, g in base]
        assert max(abs(a[0] - b[0]) for a, b in zip(other, base)) < 1e-4
    perm = list(range(len(requests)))
    random.Random(0).shuffle(perm)
    shuffled = Scorer(eval_model, eval_tokenizer, batch_size=5).loglikelihood([requests[i] for i in perm])
    for k, i in enumerate(perm):
        assert shuffled[k][0] == pytest.approx(base[i][0], abs=1e-4)


def test_tokenisation_moves_trailing_spaces_and_splits_like_lm_eval(eval_model, eval_tokenizer):
    scorer = Scorer(eval_model, eval_tokenizer)
    ctx, cont = scorer.encoder.encode_pair("Question: is it?\nAnswer: ", "yes")
    assert eval_tokenizer.decode(ctx) == "Question: is it?\nAnswer:" and eval_tokenizer.decode(cont) == " yes"
    ctx, cont = scorer.encoder.encode_pair("", " hello")
    assert ctx == [scorer.encoder.prefix_id] and eval_tokenizer.decode(cont) == " hello"
    whole = eval_tokenizer.encode("The cat sat on the mat")
    ctx, cont = scorer.encoder.encode_pair("The cat sat", " on the mat")
    assert ctx + cont == whole


def test_rolling_windows_predict_every_token_once_with_the_most_context():
    tokens = list(range(100, 123))
    windows = list(rolling_windows(tokens, prefix=1, max_len=8))
    assert [t for _, cont in windows for t in cont] == tokens
    assert windows[0] == ([1], tokens[:8])
    for ctx, cont in windows[1:]:
        assert len(ctx + cont) == 9 or ctx + cont == [1] + tokens[:len(ctx + cont) - 1]  # a full window of context
        assert ctx + cont == tokens[tokens.index(ctx[0]):tokens.index(cont[-1]) + 1]


def test_rolling_loglikelihood_equals_the_sum_over_tokens(eval_model, eval_tokenizer):
    scorer = Scorer(eval_model, eval_tokenizer, batch_size=4, max_len=16)
    text = load_docs(TASKS["wikitext"], str(EVAL_FIX))[0]["page"][:400]
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
            logp = F.log_softmax(eval_model(torch.tensor([full[:-1]])).logits[0].float(), -1)
        expected += sum(logp[len(full) - 1 - len(cont) + k, t].item() for k, t in enumerate(cont))
    assert total == pytest.approx(expected, abs=1e-3)
    assert len(seq) - 1 == sum(len(c) for _, c in windows)


def test_scoring_runs_with_the_collector_off_and_restores_it(eval_model, eval_tokenizer, monkeypatch):
    seen = []
    real = Scorer.score_tokens
    monkeypatch.setattr(Scorer, "score_tokens", lambda self, pairs: seen.append(gc.isenabled()) or real(self, pairs))
    assert gc.isenabled()
    evaluate(eval_model, eval_tokenizer, "copa", data_dir=str(EVAL_FIX), batch_size=4)
    assert seen == [False] and gc.isenabled()
    gc.disable()
    try:  # a caller that had it off keeps it off
        evaluate(eval_model, eval_tokenizer, "copa", data_dir=str(EVAL_FIX), batch_size=4)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_batch_that_runs_out_of_memory_is_halved_and_the_scores_stay(eval_model, eval_tokenizer, monkeypatch,
                                                                        caplog):
    """Halved, and said: a batch size given as lm-eval's that had to be lowered no longer gives lm-eval's batches."""
    requests = all_requests()[:60]
    base = Scorer(eval_model, eval_tokenizer, batch_size=64).loglikelihood(requests)
    real, sizes = Scorer._score_batch, []

    def small_gpu(self, batch):
        tokens = sum(self.row_width(*row) for row in batch)
        if tokens > 120:
            raise torch.cuda.OutOfMemoryError("pretend")
        sizes.append(tokens)
        return real(self, batch)

    monkeypatch.setattr(Scorer, "_score_batch", small_gpu)
    scorer = Scorer(eval_model, eval_tokenizer, batch_size=64)
    with caplog.at_level("WARNING", logger="chop.eval.engine"):
        halved = scorer.loglikelihood(requests)
    assert max(sizes) <= 120 and len(sizes) > 3
    assert scorer.lowered is not None and scorer.lowered < 64 and "batch_size 64: out of GPU memory" in caplog.text
    assert max(abs(a[0] - b[0]) for a, b in zip(halved, base)) < 1e-4


def test_fast_mode_keeps_cudnn_attention_out_of_every_batch_and_exact_mode_leaves_pytorch_s_choice(eval_tokenizer,
                                                                                                   monkeypatch):
    """cuDNN's attention builds a plan for every new shape, seconds over a suite's many batch shapes: fast mode runs
    every batch, masked (choices of several tokens) or not (one-token choices, as MMLU's), with it disabled; exact
    mode runs PyTorch's own choice, as lm-eval's forward does (its bits)."""
    torch.manual_seed(0)
    model = load_model(config=dict(TINY["llama"], vocab_size=len(eval_tokenizer), max_position_embeddings=512),
                       attn_implementation="sdpa").eval()
    seen = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **kw: seen.append(torch.backends.cuda.cudnn_sdp_enabled()) or real(*a, **kw))
    one_token = [("Question: which? Answer:", f" {c}") for c in "ABCD"]
    several = [("The cat sat on the", " mat today"), ("The cat sat on the", " warm stone floor")]
    outside = torch.backends.cuda.cudnn_sdp_enabled()
    for fast, requests in ((True, one_token), (True, several), (False, one_token)):
        seen.clear()
        Scorer(model, eval_tokenizer, share_contexts=fast).loglikelihood(requests)
        assert seen and set(seen) == ({False} if fast else {outside}), (fast, requests[0])
    assert torch.backends.cuda.cudnn_sdp_enabled() == outside


@pytest.mark.parametrize("arch", sorted(TINY))
def test_shared_context_rows_equal_separate_requests_on_every_architecture(arch, eval_tokenizer, monkeypatch):
    """Choices that share a context are scored in one row (a segment mask); the scores equal each request alone."""
    torch.manual_seed(0)
    cfg = dict(TINY[arch], vocab_size=len(eval_tokenizer))
    cfg["n_positions" if arch == "gpt2" else "max_position_embeddings"] = 512
    model = load_model(config=cfg).eval()
    requests = [r for name in ("hellaswag", "arc_easy", "piqa") for d in load_docs(TASKS[name], str(EVAL_FIX))[:3]
                for r in requests_of(TASKS[name], d)]
    masks = []
    real = Scorer._segment_mask
    monkeypatch.setattr(Scorer, "_segment_mask", lambda self, seg: masks.append(seg) or real(self, seg))
    scorer = Scorer(model, eval_tokenizer, batch_size=4, share_contexts=True)
    batched = scorer.loglikelihood(requests)
    for (c, x), (ll, greedy) in zip(requests, batched):
        ref_ll, ref_greedy = reference(model, scorer, c, x)
        assert ll == pytest.approx(ref_ll, abs=1e-4) and greedy == ref_greedy
    assert bool(masks) == scorer.share == (arch not in ("mistral", "qwen2", "gemma2", "gemma3_text", "bloom"))


def test_bf16_scores_are_lm_eval_s_bit_for_bit(eval_tokenizer):
    """In bf16 lm-eval rounds each log-probability and their sum to bf16; chop's rows, batches and arithmetic give
    the same bits (with shared contexts they would not: a masked row runs other kernels)."""
    torch.manual_seed(0)
    model = load_model(config=dict(TINY["llama"], vocab_size=len(eval_tokenizer), max_position_embeddings=512),
                       dtype="bfloat16").eval()
    requests = all_requests()
    scorer = Scorer(model, eval_tokenizer, batch_size=16)
    got = scorer.loglikelihood(requests)
    want = [lm_eval_reference(model, scorer, c, x) for c, x in requests]
    assert got == want
    assert len({ll for ll, _ in got}) > 40  # not a degenerate model


def test_encoded_requests_are_cached_on_disk_per_tokenizer(eval_tokenizer, tmp_path, monkeypatch, caplog):
    """A second process with the same tokenizer reads the pairs instead of tokenising; a damaged cache is rebuilt;
    another tokenizer (here: another prefix token) gets its own file."""
    from chop.eval.engine import Encoder

    pairs = [("Question: is it? Answer:", " yes"), ("Question: is it? Answer:", " no"), ("", "hello world")]
    first = Encoder(eval_tokenizer, cache_dir=tmp_path)
    want = first.encode_pairs(pairs)
    first.save()
    assert len(list(tmp_path.glob("*.pkl"))) == 1
    second = Encoder(eval_tokenizer, cache_dir=tmp_path)
    monkeypatch.setattr(second, "_encode_many", lambda texts: pytest.fail(f"tokenised again: {texts}"))
    monkeypatch.setattr(second, "encode", lambda text: pytest.fail(f"tokenised again: {text}"))
    assert second.encode_pairs(pairs) == want
    monkeypatch.undo()

    next(tmp_path.glob("*.pkl")).write_bytes(b"not a pickle")
    third = Encoder(eval_tokenizer, cache_dir=tmp_path)
    assert "unreadable" in caplog.text and third.encode_pairs(pairs) == want
    other = Encoder(eval_tokenizer, cache_dir=tmp_path)
    other.prefix_id = -1  # what decides the tokens differs: another file
    assert other._cache_file(tmp_path) != third._cache_file(tmp_path)


# Boundaries where a tokenizer's pieces could run from the context into the continuation.
TRICKY = [("The year was 19", "99"), ("Answer:", " 12345"), ("Call 555", "1234 now"), ("He said hello", "world"),
          ("Question: what is it?\nAnswer:", " yes"), ("It is", "n't"), ("I", "'m here"), ("Price: $", "5.00"),
          ("Line one\n", "\nLine two"), ("Naïve café", " crème brûlée"), ("emoji 🙂", "🙂 more"),
          ("Trailing spaces   ", "x"), ("tabs\t", "\tand"), ("A text with <|endoftext|> inside", " ok"),
          ("<|endoftext|>starts with the prefix", " ok"), ("", " no context")]


def test_each_context_is_encoded_once_and_the_pairs_are_those_of_encoding_each_whole(eval_tokenizer, monkeypatch):
    """SmolLM2's byte-level BPE encodes text piece by piece, so the Encoder encodes each context once and then the
    rest of context + continuation from the context's last piece on: the tokens are those of encoding every pair
    whole, lm-eval's way, at tricky boundaries and on every task's real rows."""
    from chop.eval.engine import Encoder

    pairs = TRICKY + all_requests()
    whole = Encoder(eval_tokenizer, shortcut=False)
    want = whole.encode_pairs(pairs)
    by_tails = Encoder(eval_tokenizer)
    assert by_tails.shortcut
    encoded_whole = []
    real = by_tails._encode_many
    monkeypatch.setattr(by_tails, "_encode_many", lambda texts: encoded_whole.extend(texts) or real(texts))
    assert by_tails.encode_pairs(pairs) == want
    # encoded whole: the checked sample (64 pairs) and the three pairs with a special token's text (context and
    # context + continuation each); the other 150-odd pairs' texts would be twice as many again
    assert len(encoded_whole) <= 64 + 2 * 3


def test_the_shortcut_holds_where_a_post_processor_trims_the_offsets(caplog):
    """A byte-level post-processor that trims offsets (RoBERTa's kind; a converted SmolLM2 may carry one) leaves the
    leading space out of a piece's characters; the Encoder finds where the last piece starts from the text before it
    instead, and still takes the shortcut with lm-eval's tokens."""
    from helpers import SMOL
    from tokenizers import processors

    from chop.eval.engine import Encoder
    from chop.models.loading import load_tokenizer

    tok = load_tokenizer(SMOL)
    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    assert tok.backend_tokenizer.encode("He said hello").offsets[2] == (8, 13)  # ' hello' without its space
    pairs = TRICKY + all_requests()
    whole = Encoder(tok, shortcut=False)
    by_tails = Encoder(tok)
    assert by_tails.encode_pairs(pairs) == whole.encode_pairs(pairs)
    assert by_tails.shortcut and "whole" not in caplog.text


def _bpe(pre_tokenizer, normalizer=None, dropout=None):
    from tokenizers import Tokenizer, decoders, models, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(dropout=dropout, unk_token="<unk>"))
    tok.pre_tokenizer, tok.normalizer, tok.decoder = pre_tokenizer, normalizer, decoders.ByteLevel()
    text = [" ".join(f"word{i} {i * 7}, thing and the café's thing" for i in range(j, j + 20)) for j in range(50)]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def test_tokenizers_whose_pieces_depend_on_the_text_before_them_encode_each_pair_whole():
    from tokenizers import Regex, normalizers, pre_tokenizers

    from chop.eval.engine import Encoder, splits_locally

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bytes_only = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)  # after a Split of one's own

    def split_by(pattern):
        return _bpe(pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), "isolated"), bytes_only]))

    assert Encoder(_bpe(byte_level)).shortcut
    assert Encoder(_bpe(byte_level, normalizers.Sequence([]))).shortcut  # as transformers' GGUF conversion writes it
    assert Encoder(split_by(r" ?\p{L}+| ?\p{N}{1,3}|[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")).shortcut  # Llama 3's kind
    refused = {
        "a normaliser": _bpe(byte_level, normalizers.NFKC()),
        "a sequence of one": _bpe(byte_level, normalizers.Sequence([normalizers.Lowercase()])),
        "a prefix space": _bpe(pre_tokenizers.ByteLevel(add_prefix_space=True)),
        "lookbehind": split_by(r"(?<=\d)\s|\w+"),
        "an anchor": split_by(r"^\s+|\w+"),
        "a word boundary": split_by(r"\b\w+"),
        "SentencePiece's metaspace": _bpe(pre_tokenizers.Metaspace()),
        "BPE dropout": _bpe(byte_level, dropout=0.1),
    }
    assert [k for k, tok in refused.items() if splits_locally(tok.backend_tokenizer.to_str())] == []


def test_a_tokenizer_that_does_not_split_locally_after_all_is_caught_by_the_sample_and_encoded_whole(caplog):
    """The sample check: a pre-tokenizer whose rule looks behind a piece's start (a word takes its space only after
    "x,"), made to take the shortcut, splits the rest of a pair otherwise than the whole text; the Encoder notices,
    says so, and encodes every pair whole."""
    from tokenizers import Regex, pre_tokenizers

    from chop.eval.engine import Encoder

    rule = pre_tokenizers.Split(Regex(r"(?<=\w,) ?\w+|\w+|[^\w\s]|\s+"), "isolated")
    tok = _bpe(pre_tokenizers.Sequence([rule, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))
    pairs = [(f"word{i} and {i * 7},", f" thing {i}") for i in range(200)]
    whole = Encoder(tok)
    assert not whole.shortcut
    forced = Encoder(tok)
    forced.shortcut = True  # as if the tokenizer had passed splits_locally
    assert forced.encode_pairs(pairs) == whole.encode_pairs(pairs)
    assert "encoding every pair whole" in caplog.text and not forced.shortcut
