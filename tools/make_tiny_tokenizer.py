"""Writes the tiny CLIP tokenizer of `runtime/tiny.py` (`runtime/tokenizer/`), deterministically.

A small but complete byte-level BPE vocabulary in the format of OpenAI's CLIP tokenizer, read
by `transformers.CLIPTokenizer`:

- ids 0–255: the 256 byte-unicode symbols (GPT-2's `bytes_to_unicode`, in CLIP's order),
- ids 256–511: the same symbols with the end-of-word suffix `</w>`,
- then one id per merge, in merge order,
- then `<|startoftext|>` and `<|endoftext|>` (the last two ids, as in CLIP).

The merges are learned here by plain BPE (most frequent adjacent pair first, ties broken by
the pair's text) on a list of a few hundred common caption words, until each of them is a
single token. Any other text still tokenizes: it falls back to smaller pieces, at worst to
single bytes, which are all in the vocabulary.

    python tools/make_tiny_tokenizer.py           # (re)write runtime/tokenizer/
    python tools/make_tiny_tokenizer.py --check   # exit 1 if the committed files differ

Only the standard library is needed to write the files; `--check` also loads them with
`transformers.CLIPTokenizer` (when installed) and asserts every listed word is one token.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "runtime" / "tokenizer"
MAX_BYTES = 100_000
SUFFIX = "</w>"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77  # text positions of SD 1.x

# Caption words that must each be one token: the templates of the training recipe, subjects
# and supercategories, adjectives, colours, shapes, materials, places, positions, styles.
WORDS = """
a an the of in on at with and or to for from by as is are its it this that these some one two
three four five six seven eight nine ten many few several no not very up down out over under
photo photograph picture image painting drawing sketch render rendering illustration portrait
close closeup view shot pic snapshot style art artwork poster cartoon anime sculpture statue
figure toy doll plush plushie stuffed teddy bear dog puppy cat kitten bird fish horse cow sheep
pig rabbit bunny duck lion tiger elephant monkey mouse fox wolf owl frog turtle animal pet
person man woman boy girl child kid baby people face head hand hands eye eyes hair body friend
car truck bus bike bicycle boat ship train plane airplane house building home room kitchen
table chair sofa couch bed lamp window door wall floor roof garden park street road city town
village tree trees flower flowers grass leaf leaves plant forest mountain mountains hill river
lake sea ocean beach sand snow rain sky cloud clouds sun moon night day morning evening sunset
sunrise light shadow water fire ice rock stone wood metal glass plastic paper cloth fabric
mug cup bottle vase bowl plate glasses hat shoe shoes bag backpack box book clock phone
computer camera ball guitar teapot pot candle backpack jacket shirt dress sunglasses robot
red blue green yellow orange purple pink brown black white gray grey gold golden silver dark
beige cyan medium
bright colorful colourful pale light shiny wooden metallic
big small large tiny little huge old new young cute happy sad funny beautiful pretty ugly
clean dirty wet dry hot cold soft hard round square flat tall short long wide thin thick
circle circles square squares star stars triangle triangles heart hearts shape shapes dot dots
line lines stripe stripes stripes pattern background foreground plain simple solid
crescent arrow ring diamond cross pentagon hexagon pointed pointing opening striped dotted fat
left right top bottom center centre middle front back side above below behind near next
beside between inside outside around corner edge
sitting standing lying sleeping running walking jumping flying swimming playing eating
holding wearing looking smiling floating hanging riding reading
sits stands lies sleeps runs walks jumps flies swims plays eats holds wears looks
oil watercolor pencil digital realistic detailed vintage retro modern abstract cinematic
studio lighting high quality resolution render rendered cubism impressionism pixel
's 't 're 've 'm 'll 'd
"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
    chars = list(visible)
    extra = 0
    for byte in range(256):
        if byte not in visible:
            visible.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(visible, map(chr, chars), strict=True))


def words() -> list[str]:
    """The listed words, once each, in first-seen order."""
    return list(dict.fromkeys(WORDS.split()))


def symbols(word: str, table: dict[int, str]) -> tuple[str, ...]:
    """A word as byte-unicode symbols, the last one carrying `</w>`."""
    chars = [table[b] for b in word.encode("utf-8")]
    return (*chars[:-1], chars[-1] + SUFFIX)


def merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """`word` with every (left-to-right, non-overlapping) occurrence of `pair` joined."""
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def learn_merges(corpus: list[tuple[str, ...]]) -> list[tuple[str, str]]:
    """Plain BPE: join the most frequent adjacent pair until every word is one symbol."""
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(pair for w in corpus if len(w) > 1 for pair in pairwise(w))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        corpus = [merge_pair(w, best) for w in corpus]


def build() -> dict[str, str]:
    """{file name: text} of the tokenizer folder."""
    table = bytes_to_unicode()
    base = list(table.values())
    merges = learn_merges([symbols(w, table) for w in words()])
    # Two merges may make the same symbol ("ab"+"c", "a"+"bc"): it keeps its first id.
    tokens = dict.fromkeys([*base, *(s + SUFFIX for s in base), *(a + b for a, b in merges)])
    vocab = {token: i for i, token in enumerate([*tokens, BOS, EOS])}
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MODEL_MAX_LENGTH,
              "do_lower_case": True, "errors": "replace", "add_prefix_space": False,
              "clean_up_tokenization_spaces": False, **special}
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False, separators=(",", ":")) + "\n",
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
    }


def verify(folder: Path) -> list[str]:
    """Problems found by loading `folder` with transformers' CLIPTokenizer (if installed)."""
    try:
        from transformers import CLIPTokenizer  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return []
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    problems = [f"{w!r} is {len(ids)} tokens" for w in words()
                if len(ids := tokenizer(w, add_special_tokens=False).input_ids) != 1]
    if tokenizer.model_max_length != MODEL_MAX_LENGTH:
        problems.append(f"model_max_length is {tokenizer.model_max_length}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    files = build()
    size = sum(len(text.encode("utf-8")) for text in files.values())
    if size > MAX_BYTES:
        print(f"tokenizer files are {size} bytes, over {MAX_BYTES}", file=sys.stderr)
        return 1
    if args.check:
        stale = [name for name, text in files.items()
                 if not (ROOT / name).is_file() or (ROOT / name).read_text("utf-8") != text]
        problems = [f"{name} differs from the generator" for name in stale] + verify(ROOT)
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    ROOT.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (ROOT / name).write_text(text, encoding="utf-8", newline="\n")
    print(f"wrote {len(files)} files ({size} bytes) to {ROOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
