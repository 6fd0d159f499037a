"""Train a byte-level BPE tokenizer of ``--vocab`` tokens on a jsonl corpus (for benchmarks needing a given vocab).

    python benchmarks/make_tokenizer.py --corpus FILE.jsonl --vocab 32000 --out DIR
"""

import argparse
import json

from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--corpus", required=True)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator((json.loads(line)["text"] for line in open(a.corpus)), vocab_size=a.vocab,
                            special_tokens=["<unk>", "<s>", "</s>"])
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(a.out)


if __name__ == "__main__":
    main()
