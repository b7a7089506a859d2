"""The DEV benchmarks' metrics: VQA accuracy (official normalisation), CIDEr, top-1, ROC-AUC, Overall.

All scores are percentages (CIDEr x 100, as the paper reports COCO 143.3).
"""

from __future__ import annotations

import itertools
import logging
import re
import shutil
from collections import Counter
from typing import Mapping, Sequence

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- VQA answer normalisation
# After the official VQA evaluation script (vqaEval.py, Antol et al. 2015 / VQAv2).

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # a full stop not inside a number ("2.5" keeps it)
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")  # a thousands comma ("1,000")


def _process_punctuation(text: str) -> str:
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """The official VQA normalisation: punctuation, number words -> digits, articles, contractions."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    return _process_digit_article(_process_punctuation(answer))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers (usually 10), in [0, 1].

    For each human, min(#other humans who gave the prediction / 3, 1); averaged over the humans
    (= over the 10-choose-9 subsets of annotators). The prediction is normalised as the official
    script (vqaEval.py) normalises it. Where this differs from that script:

    - Every human answer gets the same full normalisation as the prediction. The official script only
      strips punctuation from them (``processPunctuation``), and only when the humans disagree, so it
      keeps case, number words and articles. The embedded world needs the full normalisation: its count
      answers are number words ("two"), which the official script would never match to a normalised
      prediction ("2"). The two give the same scores whenever the human answers are already in normalised
      form, as those of the real VQAv2 annotation files are; on unnormalised answers this one is more
      lenient (official: "The dog" x10 never matches any prediction; here "dog" scores 1).
    - One accepted answer (``len(answers) == 1``) is an exact match after normalisation; the official
      script, finding no other human to agree, would give 0.

    A prediction that normalises to "" (empty, or only articles / punctuation) scores 0, as in the
    official script, even where a human answer also normalises to "" (e.g. "a", "the", "?").
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    pred = normalize_answer(prediction)
    if not pred:  # full normalisation also empties some human answers ("the", "?"): saying nothing is never right
        return 0.0
    gts = [normalize_answer(a) for a in answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        accs.append(min(1.0, sum(a == pred for a in others) / 3.0))
    return sum(accs) / len(accs)


def vqa_score(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Mean VQA accuracy, in percent."""
    _same_length(predictions, answers)
    _require_items(predictions, "vqa_score")
    return 100.0 * sum(vqa_accuracy(p, a) for p, a in zip(predictions, answers)) / len(predictions)


def most_common_answer(answers: Sequence[str]) -> str:
    """The answer most humans gave (after normalisation; ties: the first given)."""
    counts = Counter(normalize_answer(a) for a in answers)
    best = max(counts.values())
    return next(a for a in answers if counts[normalize_answer(a)] == best)


# ---------------------------------------------------------------- top-1 (video QA)


def top1_score(predictions: Sequence[str], targets: Sequence[str]) -> float:
    """Exact-match accuracy in percent, both sides with the VQA answer normalisation (``normalize_answer``).

    A deliberate leniency over a strict string match: case, punctuation, articles and number words do not
    count, so "Two." matches "2" and "a man" matches "man"; a strict top-1 would score those 0.
    """
    _same_length(predictions, targets)
    _require_items(predictions, "top1_score")
    hits = sum(normalize_answer(p) == normalize_answer(t) for p, t in zip(predictions, targets))
    return 100.0 * hits / len(predictions)


# ---------------------------------------------------------------- CIDEr


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (line breaks included) made one space.

    PTBTokenizer writes one caption a line and reads the Java tokenizer's output back by line number,
    but it only replaces "\\n": the Java tokenizer also ends a line at "\\r", "\\v", "\\f", "\\u2028" and
    "\\u2029", so one such caption would shift every later caption onto another item's id.
    """
    return " ".join(text.split())


def cider_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
                 ) -> tuple[float, dict[str, float]]:
    """Corpus CIDEr-D (pycocoevalcap's Cider scorer after its PTBTokenizer) and each item's own, times 100.

    ``predictions`` id -> caption; ``references`` id -> reference captions. The IDF comes from the
    references of all the items given, as in the COCO evaluation server; the corpus score is the mean
    of the items' scores, so the mean over a subset of items is that subset's score in the same units.
    """
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if set(predictions) != set(references):
        raise ValueError("predictions and references must have the same ids")
    _require_items(predictions, "cider_score")
    if shutil.which("java") is None:
        raise RuntimeError("CIDEr's PTBTokenizer needs java: install a JRE (apt-get install default-jre-headless)")
    keys = [str(k) for k in predictions]
    tok = PTBTokenizer()
    gts = tok.tokenize({str(k): [{"caption": one_line(c)} for c in references[k]] for k in predictions})
    res = tok.tokenize({str(k): [{"caption": one_line(predictions[k] or "")}] for k in predictions})
    res = {k: v if v and v[0] else [""] for k, v in res.items()}
    score, per_item = Cider().compute_score({k: gts[k] for k in keys}, {k: res[k] for k in keys})  # in keys' order
    return 100.0 * float(score), {k: 100.0 * float(s) for k, s in zip(keys, per_item)}


def cider_score(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> float:
    """Corpus CIDEr-D times 100 (see ``cider_scores``)."""
    return cider_scores(predictions, references)[0]


# ---------------------------------------------------------------- ROC-AUC (binary classification)


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve (Mann-Whitney U, ties count half); None if one class is absent."""
    pos = [s for y, s in zip(labels, scores) if y]
    neg = [s for y, s in zip(labels, scores) if not y]
    if not pos or not neg:
        return None
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


# ---------------------------------------------------------------- Overall


def overall_tasks_used(tasks: Sequence[str], references: Mapping[str, float | None]) -> list[str]:
    """The tasks of ``tasks`` the Overall can average: those with a reference (None or 0 gives no ratio)."""
    return [t for t in tasks if references.get(t)]


def overall_score(scores: Mapping[str, float], references: Mapping[str, float | None]) -> float | None:
    """Mean over tasks of score / reference, in percent (the paper's Overall); None if no task has a reference.

    A task whose reference is None or 0 is left out of the mean with a warning, since the Overall then
    averages fewer tasks than asked (``overall_tasks_used`` says which remain).
    """
    used = overall_tasks_used(list(scores), references)
    for t in scores:
        if t not in used:
            log.warning("Overall leaves out task %r: its reference is %r, so score / reference is undefined "
                        "(an oracle reference is None when the oracle scores 0 on the task's test items)",
                        t, references.get(t))
    ratios = [scores[t] / references[t] for t in used]
    return 100.0 * sum(ratios) / len(ratios) if ratios else None


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"got {len(a)} predictions for {len(b)} references")


def _require_items(predictions, metric: str) -> None:
    # a mean over no items is no score: 0 would pass for a model that got everything wrong
    if len(predictions) == 0:
        raise ValueError(f"{metric}: the task has no test items to score. Check that its test shards hold "
                         "samples and that eval.max_items (or eval.task_max_items.<task>) is at least 1")
