"""Word-level tokenizer for the embedded world, saved as a Hugging Face tokenizer folder.

The special tokens are Flamingo's: ``<image>`` marks where an image stands in the text and
``<|endofchunk|>`` (the paper's <EOC>) ends the text that belongs to an image.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable

MEDIA_TOKEN = "<image>"
EOC_TOKEN = "<|endofchunk|>"
PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, MEDIA_TOKEN, EOC_TOKEN]


def train_word_tokenizer(texts: Iterable[str], out_dir: str | Path, min_frequency: int = 1):
    """Train a lower-cased word-level tokenizer on ``texts`` and save it to ``out_dir``.

    The ids are a pure function of the texts (the same corpus gives the same tokenizer.json). Returns the
    ``PreTrainedTokenizerFast``; ``AutoTokenizer.from_pretrained(out_dir)`` loads it again.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    # The vocabulary is counted here, not by ``trainers.WordLevelTrainer``: that one breaks ties between
    # equally frequent words in hash order, so the same corpus gave different ids from run to run.
    # Here: the special tokens, then words by falling count, ties alphabetically.
    counts: Counter[str] = Counter()
    for text in texts:
        for special in SPECIAL_TOKENS:  # the special tokens are whole tokens, never counted as words
            text = text.replace(special, " ")
        counts.update(w for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)))
    words = sorted((w for w, c in counts.items() if c >= min_frequency and w not in SPECIAL_TOKENS),
                   key=lambda w: (-counts[w], w))
    vocab = {w: i for i, w in enumerate([*SPECIAL_TOKENS, *words])}
    tok.model = models.WordLevel(vocab, unk_token=UNK_TOKEN)
    tok.add_special_tokens(SPECIAL_TOKENS)
    bos, eos = tok.token_to_id(BOS_TOKEN), tok.token_to_id(EOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", special_tokens=[(BOS_TOKEN, bos), (EOS_TOKEN, eos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[MEDIA_TOKEN, EOC_TOKEN],
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast
