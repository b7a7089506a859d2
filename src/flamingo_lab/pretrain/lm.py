"""LM pretraining stage: causal-LM training of any Hugging Face architecture on the world's text corpus.

The frozen LM of the paper is pretrained (Chinchilla); at the embedded scale this stage gives the
Flamingo an LM that knows the world's words and facts. Its log checks that it learned something
real: held-out perplexity far below a random model's, and text-only recall of the world's facts.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from flamingo_lab.models.config import LMConfig
from flamingo_lab.models.lm import build_lm

log = logging.getLogger(__name__)

#: Fact probes: (template that ends where the answer goes, fact table in world.json).
FACT_PROBES = {
    "fruit_of_colour": "which fruit is {key}? the",
    "thing_of_shape": "which thing has the shape of a {key}? the",
}


def _blocks(tokenizer, paragraphs: list[str], seq_len: int) -> torch.Tensor:
    """Pack paragraphs (each <s> ... </s>) into a (n_blocks, seq_len) tensor of token ids."""
    ids: list[int] = []
    for p in paragraphs:
        ids += tokenizer(p, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"the corpus has {len(ids)} tokens, fewer than one block of seq_len={seq_len}")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


@torch.no_grad()
def perplexity(lm, blocks: torch.Tensor, batch_size: int = 64) -> float:
    lm.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        b = blocks[i : i + batch_size]
        loss = lm(input_ids=b, labels=b).loss
        total += float(loss) * b.numel()
        count += b.numel()
    return math.exp(total / count)


@torch.no_grad()
def fact_recall(lm, tokenizer, facts: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Greedy next word after each fact's question, text only: the share answered right."""
    lm.eval()
    right, items = 0, []
    for table, template in FACT_PROBES.items():
        for key, answer in facts.get(table, {}).items():
            ids = torch.tensor([tokenizer(template.format(key=key), add_special_tokens=True)["input_ids"]])
            pred = tokenizer.convert_ids_to_tokens(int(lm(input_ids=ids).logits[0, -1].argmax()))
            right += pred == answer
            items.append({"question": template.format(key=key), "answer": answer, "predicted": pred})
    return {"recall": right / max(len(items), 1), "n": len(items), "items": items}


@torch.no_grad()
def game_copy(lm, tokenizer, world_config: dict | None, template: str | None = None, n: int = 200,
              shots: int = 4, bare: bool = False) -> dict[str, Any] | None:
    """The colour-renaming game in words (the in-context task without images): ``shots`` described objects,
    each answered with its colour's fresh word, then a query whose colour was shown, all in the evaluation's
    ``template`` with the scene's words in place of the image (the text-description control's prompt). The
    share of greedy next words that copy the right word, against a uniform guess among the words shown.
    Flamingo's in-context ability is the frozen LM's: an LM that cannot do this cannot do it with images.
    ``bare``: each item names its colour with one word where the image stands, and nothing else (what a
    cross-attention layer would have to write there; an LM that copies only from whole captions fails it).
    None for worlds without a generator config (imported data)."""
    from flamingo_lab.data.tokenizer import EOC_TOKEN, MEDIA_TOKEN
    from flamingo_lab.data.world import NONSENSE, VQA_FORMAT, WorldConfig, caption, sample_scene

    if not world_config:
        return None
    cfg = WorldConfig(**world_config)
    template = (template or MEDIA_TOKEN + VQA_FORMAT + EOC_TOKEN).replace("{question}", "what colour is it?")
    rng = random.Random(f"{cfg.seed}/lm-game-probe" + ("/bare" if bare else ""))

    def item(colour: str, answer: str | None) -> str:
        text = template.replace("{answer}", answer) if answer else template[: template.index("{answer}")].rstrip()
        scene = sample_scene(rng, cfg, n=1, target={"colour": colour})
        return text.replace(MEDIA_TOKEN, (colour if bare else caption(scene)) + " ", 1)

    lm.eval()
    right, guess = 0, 0.0
    for _ in range(n):
        mapping = dict(zip(cfg.colours, rng.sample(NONSENSE, len(cfg.colours))))
        shown = [rng.choice(cfg.colours) for _ in range(shots)]
        query = rng.choice(shown)
        prompt = "".join(item(c, mapping[c]) for c in shown) + item(query, None)
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=True)["input_ids"]])
        pred = tokenizer.convert_ids_to_tokens(int(lm(input_ids=ids).logits[0, -1].argmax()))
        right += pred == mapping[query]
        guess += 1 / len(set(shown))
    return {"copy": right / n, "guess_among_shown": guess / n, "n": n, "shots": shots, "template": template,
            "form": "bare colour word" if bare else "caption"}


def pretrain_lm(arch: dict, world: dict, settings: dict, out_dir: Path, progress: bool = True) -> dict:
    """Train, check and save (``save_pretrained`` + tokenizer) into ``out_dir``; return the report."""
    from transformers import AutoTokenizer

    started = time.perf_counter()
    seed = int(settings.get("seed", 0))
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(world["tokenizer"])
    root = Path(world["root"])
    text = {s: (root / p).read_text().splitlines() for s, p in world["corpus"].items()}
    seq_len, batch = int(settings["seq_len"]), int(settings["batch_size"])
    train, val = _blocks(tokenizer, text["train"], seq_len), _blocks(tokenizer, text["val"], seq_len)

    lm = build_lm(LMConfig(arch=dict(arch)), tokenizer)  # exactly how the Flamingo builds it from arch
    random_ppl = perplexity(lm, val)
    steps, warmup = int(settings["steps"]), int(settings.get("warmup", 50))
    decay = [p for n, p in lm.named_parameters() if p.ndim >= 2 and "embed" not in n and "wte" not in n]
    other = [p for n, p in lm.named_parameters() if not (p.ndim >= 2 and "embed" not in n and "wte" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=float(settings["lr"]), betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))))
    rng = random.Random(seed)
    lm.train()
    losses = []
    bar = tqdm(range(steps), desc="pretrain LM", disable=not progress, mininterval=1.0)
    for step in bar:
        idx = torch.tensor([rng.randrange(len(train)) for _ in range(batch)])
        b = train[idx]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(settings.get("bf16", False))):
            loss = lm(input_ids=b, labels=b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
    train_s = time.perf_counter() - started

    report = {
        "stage": "lm",
        "arch": arch,
        "settings": settings,
        "steps": steps,
        "train_seconds": round(train_s, 1),
        "final_train_loss": sum(losses[-50:]) / len(losses[-50:]),
        "val_perplexity": perplexity(lm, val),
        "random_val_perplexity": random_ppl,
        "facts": fact_recall(lm, tokenizer, world.get("facts", {})),
        "game": game_copy(lm, tokenizer, world.get("config"), world.get("prompts", {}).get("vqa")),
        "game_bare": game_copy(lm, tokenizer, world.get("config"), world.get("prompts", {}).get("vqa"), bare=True),
        "parameters": sum(p.numel() for p in lm.parameters()),
    }
    lm.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    report["seconds"] = round(time.perf_counter() - started, 1)
    game, bare = report["game"] or {}, report["game_bare"] or {}
    log.info("LM pretraining: val perplexity %.2f (random %.1f), fact recall %.2f, renaming game in words %s, "
             "with one bare colour word where the image stands %s, %.0f s",
             report["val_perplexity"], random_ppl, report["facts"]["recall"],
             f"{game['copy']:.2f} (guess {game['guess_among_shown']:.2f})" if game else "n/a",
             f"{bare['copy']:.2f} (guess {bare['guess_among_shown']:.2f})" if bare else "n/a", report["seconds"])
    return report
