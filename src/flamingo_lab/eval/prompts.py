"""Few-shot prompts: which support examples, in which order, in which words.

A k-shot prompt is k support examples, each ``<image>`` + its text + ``<|endofchunk|>``, then the
query's ``<image>`` and the text up to its answer; the model writes the answer and stops at
``<|endofchunk|>``. The 0-shot prompt is the paper's: two support examples as text only (no
image), then the query. Image-causal masking is the model's own: each text span attends to the
``<image>`` before it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from flamingo_lab.data.tokenizer import MEDIA_TOKEN

from .metrics import most_common_answer
from .tasks import Item, Task

ANSWER = "{answer}"


@dataclass
class Prompt:
    text: str
    images: list[list]  # per <image>: its frames (PIL), in the order the <image> tokens stand
    query: Item
    shown: tuple[str, ...] = ()  # the support examples' answers, in prompt order


def target_text(task: Task, item: Item) -> str:
    """What a support example shows as its answer: the first caption, or the most common answer."""
    if task.kind in ("caption", "video_caption"):
        if not item.captions:
            raise ValueError(f"task {task.name!r}: item {item.id} has no captions")
        return item.captions[0]
    if not item.answers:
        raise ValueError(f"task {task.name!r}: item {item.id} has no answers")
    return item.answers[0] if task.kind == "video_qa" else most_common_answer(item.answers)


def render(template: str, item: Item, answer: str | None, with_image: bool = True) -> str:
    """One example in the task's template; ``answer=None`` cuts the template before the answer (the query)."""
    if ANSWER not in template:
        raise ValueError(f"a prompt template needs {ANSWER}: {template!r}")
    if answer is None:
        template = template[: template.index(ANSWER)].rstrip()
    text = template.replace("{question}", item.question or "")
    text = text.replace(ANSWER, answer or "")
    if not with_image:
        text = text.replace(MEDIA_TOKEN, "")
    return text


def has_scene(item: Item) -> bool:
    """Whether the item carries the scene metadata the text-description control needs (embedded worlds)."""
    scene = item.meta.get("scene")
    return isinstance(scene, dict) and isinstance(scene.get("objects"), list)


def item_text(item: Item) -> str:
    """The words that stand for an item's image in the text-description control (its scene metadata,
    written by the embedded world)."""
    from flamingo_lab.data.world import scene_text

    scene = item.meta.get("scene")
    if not has_scene(item):
        raise ValueError(f"item {item.id} has no scene metadata: the text-description control needs an "
                         "embedded world (flamingo-data), not imported benchmark files")
    return scene_text(scene)


def build_prompt(template: str, task: Task, support: Sequence[Item], query: Item, *, text_only: bool = False,
                 describe: bool = False) -> Prompt:
    """Support examples (text only for 0-shot) then the query; images in the order they stand.

    ``describe``: the text-description control -- every ``<image>`` is replaced by the words for that
    image (``item_text``) and the prompt has no images, so a failure can be placed before (vision,
    cross-attention) or after (the LM) the point where the image enters.
    """
    def one(item: Item, answer: str | None, with_image: bool) -> str:
        text = render(template, item, answer, with_image=with_image)
        if describe and with_image:
            text = text.replace(MEDIA_TOKEN, item_text(item) + " ", 1)
        return text

    shown = tuple(target_text(task, s) for s in support)
    parts = [one(s, answer, not text_only) for s, answer in zip(support, shown)]
    parts.append(one(query, None, True))
    if describe:
        return Prompt("".join(parts), [], query, shown)
    images = [] if text_only else [s.images for s in support]
    return Prompt("".join(parts), images + [query.images], query, shown)


class SupportSampler:
    """Chooses each query's support examples: at random with a fixed seed, or by RICES.

    In-context tasks draw only from the query's episode. RICES (Yang et al. 2022, as in the
    paper's appendix) takes the support images nearest the query in frozen vision features, the
    nearest placed last (next to the query).
    """

    def __init__(self, task: Task, support: list[Item], *, method: str = "random", seed: int = 0,
                 features: torch.Tensor | None = None):
        if method not in ("random", "rices"):
            raise ValueError(f"eval.support must be 'random' or 'rices'; got {method!r}")
        if method == "rices" and features is None:
            raise ValueError("RICES needs the support items' vision features")
        self.task, self.support, self.method, self.seed = task, support, method, seed
        self.features = features  # (n_support, D), unit norm
        self.by_episode: dict = {}
        for i, s in enumerate(support):
            self.by_episode.setdefault(s.episode, []).append(i)

    def pool(self, query: Item) -> list[int]:
        pool = self.by_episode.get(query.episode, []) if self.task.in_context else range(len(self.support))
        return [i for i in pool if self.support[i].id != query.id]

    def sample(self, query: Item, k: int, query_features: torch.Tensor | None = None) -> list[Item]:
        pool = self.pool(query)
        k = min(k, len(pool))
        if k == 0:
            return []
        if self.method == "random" or query_features is None:
            rng = random.Random(f"{self.seed}/{self.task.name}/{k}/{query.id}")
            return [self.support[i] for i in rng.sample(pool, k)]
        sims = self.features[pool] @ query_features  # (n_pool,)
        nearest = sims.topk(k).indices.flip(0).tolist()  # least similar first, nearest last
        return [self.support[pool[i]] for i in nearest]


@torch.no_grad()
def vision_features(model, items: Sequence[Item], image_size: int, batch_size: int = 64) -> torch.Tensor:
    """Frozen vision features for RICES: mean over frames and patches, unit norm. ``(n, D_v)``."""
    from flamingo_lab.data.shards import image_to_tensor

    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        x = torch.stack([torch.stack([image_to_tensor(f, image_size) for f in it.images]) for it in chunk])
        feats = model.vision(x.unsqueeze(1))  # (b, 1, F, N, D_v)
        out.append(torch.nn.functional.normalize(feats.float().mean(dim=(1, 2, 3)), dim=-1))  # (b, D_v)
    return torch.cat(out) if out else torch.empty(0)


def templates_for(prompts: Mapping[str, str], task: Task) -> str:
    """The task's template: by task name, else by kind."""
    if task.name in prompts:
        return prompts[task.name]
    if task.kind in prompts:
        return prompts[task.kind]
    raise KeyError(f"no prompt for task {task.name!r} (kind {task.kind!r}) in eval.prompts: add one")
