"""How experiments/data/ was made (provenance; not run by the quickstart).

kjv_genesis_ruth.txt: Genesis through Ruth of the King James Version (public domain: the translation was
published in 1611), from Debian's `bible-kjv-text` package (bible.data, read with the `bible` program of
the `bible-kjv` package, which prints one verse per line as "Ge1:1 In the beginning ...").

    apt-get download bible-kjv bible-kjv-text && dpkg -x bible-kjv_*.deb x && dpkg -x bible-kjv-text_*.deb x
    x/usr/bin/bible -p x/usr/lib -f gen1:1-rev22:21 > kjv_verses.txt
    python experiments/data/make_corpus.py kjv_verses.txt

The excerpt has one document per chapter ("Genesis 1" then one verse per line), documents separated by a
blank line. kjv_bpe.json is a byte-level BPE tokenizer (vocab 2048, DeepSeek special tokens first)
trained on it.
"""

import re
import sys

BOOKS = {"Ge": "Genesis", "Exo": "Exodus", "Lev": "Leviticus", "Num": "Numbers", "Deu": "Deuteronomy",
         "Josh": "Joshua", "Jdgs": "Judges", "Ruth": "Ruth"}
SPECIAL = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]


def main(src: str, out_dir: str = "experiments/data") -> None:
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in open(src, encoding="utf-8"):
        m = re.match(r"(\d?[A-Za-z]+)(\d+):(\d+) (.*)", line.rstrip("\n"))
        if m and m.group(1) in BOOKS:
            chapters.setdefault((BOOKS[m.group(1)], int(m.group(2))), []).append(m.group(4).strip())
    docs = [f"{book} {ch}\n" + "\n".join(verses) for (book, ch), verses in chapters.items()]
    with open(f"{out_dir}/kjv_genesis_ruth.txt", "w", encoding="utf-8") as f:
        f.write("\n\n".join(docs) + "\n")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    tok.save(f"{out_dir}/kjv_bpe.json")


if __name__ == "__main__":
    main(*sys.argv[1:])
