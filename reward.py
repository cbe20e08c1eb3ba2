"""The reward interface: images and their prompts in, one float per image out. A reward scores
only the final image (UniGRPO's sparse terminal reward); it knows no model of ours and no RL.

    reward_fn(images (R, 3, H, W) in [0, 1], prompts (R,)) -> rewards (R,) float32 on the CPU

The toy world's exact verifier is toy.ToyReward. GenEval's prompt metadata (its six categories,
which the toy world's prompts share) is read here, for the GenEval-style rewards and evaluation of
the Bagel path.

The learned rewards of the Bagel path, each loaded from a local folder in its ordinary transformers
format and named on the command line as `--reward=kind:folder[@weight],...`:

    clip       ClipScore      100 * max(cos(image, text), 0)            (torchmetrics' CLIPScore)
    pickscore  PickScore      exp(logit_scale) * cos(image, text)        (PickScore's own scoring)
    vlm        VLMJudge       P(yes) / (P(yes) + P(no)) of a chat VLM asked whether the image fits
    geneval    GenEvalReward  GenEval's rules (geneval.py) on a zero-shot detector + CLIP colours;
                              reward = the mean of the exam points (TA-style), `scores` also says
                              GenEval's correct

Conventions shared by all of them: a prompt is an object with `.text` and `.metadata` or a plain
string (text, no metadata); images go to the processors as 8-bit RGB PIL images (round(255 x)), as a
saved PNG would; the models run in eval mode under torch.no_grad() in batches of `batch_size`, in the
dtype their folder was saved in, and the same inputs give bitwise the same rewards.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from PIL import Image

import prompts as prompt_files

# GenEval's tags
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


@runtime_checkable
class RewardModel(Protocol):
    """What every reward model implements: images (R, 3, H, W) in [0, 1] and their R prompts in,
    one float reward per image out, shape (R,). The toy world's is toy.ToyReward; real ones
    (GenEval-style checkers, learned scorers) for the Bagel path load their weights in __init__ and
    implement the same call."""

    def __call__(self, images: torch.Tensor, prompts: Sequence[Any]) -> torch.Tensor: ...


def load_geneval(path: str | Path) -> list[dict]:
    """GenEval's evaluation_metadata.jsonl: one dict per non-blank line with tag, include,
    exclude ([] when absent) and prompt."""
    path = Path(path)
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = prompt_files.json_object(f"{path}:{line_no}", line)
            for key in ("tag", "include", "prompt"):
                if key not in row:
                    raise ValueError(f"{path}:{line_no}: missing key {key!r}")
            if row["tag"] not in CATEGORIES:
                raise ValueError(f"{path}:{line_no}: unknown tag {row['tag']!r}")
            rows.append({"tag": row["tag"], "include": row["include"],
                         "exclude": row.get("exclude", []), "prompt": row["prompt"]})
    return rows


def summarize(per_image: dict[str, torch.Tensor], rows: Sequence[Any]) -> dict[str, float]:
    """Each per-image metric per category ("<metric>/<category>", a row's `.category`, GenEval's tags
    in CATEGORIES order first) and overall: the unweighted mean of the category means, as GenEval's
    overall score (the plain mean when no row has a category)."""
    cats = [getattr(p, "category", "") for p in rows]
    known = {c: i for i, c in enumerate(CATEGORIES)}
    order = sorted({c for c in cats if c}, key=lambda c: (known.get(c, len(known)), c))
    out: dict[str, float] = {}
    for name, values in per_image.items():
        if len(values) != len(rows):
            raise ValueError(f"{name}: {len(values)} values but {len(rows)} rows")
        means = []
        for c in order:
            out[f"{name}/{c}"] = values[torch.tensor([x == c for x in cats])].float().mean().item()
            means.append(out[f"{name}/{c}"])
        out[name] = sum(means) / len(means) if means else values.float().mean().item()
    return out


# ---- images, prompts, batches ----------------------------------------------------------------------

def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(R, 3, H, W) floats in [0, 1] -> R RGB PIL images, 8 bits per channel (round(255 x))."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (R, 3, H, W), got {tuple(images.shape)}")
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    return [Image.fromarray(x.numpy(), "RGB") for x in pixels]


def split_prompts(prompts: Sequence[Any]) -> tuple[list[str], list[dict]]:
    """Texts and metadata of R prompts: objects with .text and .metadata, or plain strings ({})."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of prompts, got a single string")
    texts = [p if isinstance(p, str) else p.text for p in prompts]
    metadata = [{} if isinstance(p, str) else dict(getattr(p, "metadata", None) or {}) for p in prompts]
    return texts, metadata


def _check_batch(images: torch.Tensor, prompts: Sequence[Any]) -> None:
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")


def _batches(keys: Sequence, batch_size: int) -> list[list[int]]:
    """Indices grouped by equal key (first-seen order), each group cut into runs of batch_size, so a
    batch never mixes keys: equal-length VLM inputs need no padding, one query set serves a batch."""
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return [idx[k:k + batch_size] for idx in groups.values() for k in range(0, len(idx), batch_size)]


def _load(auto_class, folder, device):
    """A model from a local folder, in eval mode on `device`."""
    return auto_class.from_pretrained(str(folder), local_files_only=True).to(device).eval()


def _to_model(inputs, model):
    """Processor outputs on the model's device, floating tensors (pixels) in its dtype."""
    return {k: (v.to(model.device, model.dtype) if torch.is_floating_point(v) else v.to(model.device))
            if torch.is_tensor(v) else v for k, v in inputs.items()}


def _processor(folder):
    from transformers import AutoProcessor
    return AutoProcessor.from_pretrained(str(folder), local_files_only=True)


# ---- CLIP: ClipScore, PickScore ---------------------------------------------------------------------

class ClipEmbedder:
    """A CLIPModel and its processor from a local folder: L2-normalised image and text embeddings.
    Texts are truncated to the text tower's positions (77 for OpenAI's CLIP)."""

    def __init__(self, folder, device="cpu", batch_size: int = 16):
        from transformers import CLIPModel
        self.processor = _processor(folder)
        self.model = _load(CLIPModel, folder, device)
        self.batch_size = batch_size
        self.max_length = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def _embed(self, items: list, features) -> torch.Tensor:
        """Unit vectors of `features(batch)` (a CLIP get_*_features call) over batches of items."""
        parts = []
        for k in range(0, len(items), self.batch_size):
            out = features(items[k:k + self.batch_size])
            parts.append(getattr(out, "pooler_output", out).float().cpu())
        return torch.nn.functional.normalize(torch.cat(parts), dim=-1)

    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """(R, D) unit vectors."""
        def features(batch):
            pixels = self.processor.image_processor(images=batch, return_tensors="pt")
            return self.model.get_image_features(**_to_model(pixels, self.model))
        return self._embed(images, features)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """(T, D) unit vectors."""
        def features(batch):
            tokens = self.processor.tokenizer(batch, padding=True, truncation=True,
                                              max_length=self.max_length, return_tensors="pt")
            return self.model.get_text_features(**_to_model(tokens, self.model))
        return self._embed(texts, features)

    def cosine(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """cos(image_i, text_i), (R,); each distinct text is embedded once."""
        unique = list(dict.fromkeys(texts))
        text_emb = self.embed_texts(unique)[[unique.index(t) for t in texts]]
        return (self.embed_images(to_pil(images)) * text_emb).sum(-1)


class ClipScore:
    """CLIPScore: 100 * max(cos(E_image, E_text), 0), scaled as torchmetrics' CLIPScore (Hessel et
    al. 2021 with w = 100), from a CLIPModel folder (e.g. openai/clip-vit-large-patch14)."""

    def __init__(self, folder, device="cpu", batch_size: int = 16):
        self.clip = ClipEmbedder(folder, device, batch_size)

    def scale(self, cos: torch.Tensor) -> torch.Tensor:
        return 100 * cos.clamp(min=0)

    def __call__(self, images: torch.Tensor, prompts: Sequence[Any]) -> torch.Tensor:
        _check_batch(images, prompts)
        return self.scale(self.clip.cosine(images, split_prompts(prompts)[0]))


class PickScore(ClipScore):
    """PickScore (Kirstain et al. 2023): exp(logit_scale) * cos(E_image, E_text), as its authors
    score, from its CLIP-H checkpoint in CLIPModel format (yuvalkirstain/PickScore_v1; the processor
    of laion/CLIP-ViT-H-14-laion2B-s32B-b79K saved beside it)."""

    def scale(self, cos: torch.Tensor) -> torch.Tensor:
        return self.clip.model.logit_scale.detach().exp().float().cpu() * cos


# ---- VLM judge --------------------------------------------------------------------------------------

DEFAULT_QUESTION = 'Does this image match the description "{prompt}"? Answer yes or no.'
# spellings whose single-token encodings count as each answer
ANSWER_SPELLINGS = {"yes": ("yes", "Yes", " yes", " Yes"), "no": ("no", "No", " no", " No")}


def answer_token_ids(tokenizer) -> dict[str, list[int]]:
    """{"yes": ids, "no": ids}: for each answer, the distinct ids of those spellings in
    ANSWER_SPELLINGS that the tokenizer encodes (without special tokens) to exactly one token other
    than its unknown token. A spelling that takes several tokens is skipped; an answer with no
    single-token spelling, or ids shared by both answers, is a ValueError."""
    ids, unknown = {}, getattr(tokenizer, "unk_token_id", None)
    for answer, spellings in ANSWER_SPELLINGS.items():
        encoded = [tokenizer.encode(s, add_special_tokens=False) for s in spellings]
        ids[answer] = sorted({e[0] for e in encoded if len(e) == 1 and e[0] != unknown})
        if not ids[answer]:
            raise ValueError(f"the VLM's tokenizer has no single token for {answer!r} (tried "
                             f"{', '.join(map(repr, spellings))}: {encoded}); P({answer}) is undefined")
    if set(ids["yes"]) & set(ids["no"]):
        raise ValueError(f"the VLM's tokenizer maps yes and no to shared ids {ids}")
    return ids


class VLMJudge:
    """A chat VLM asked whether the image matches the prompt: r = P(yes) / (P(yes) + P(no)) from the
    next-token logits at the last position, where P(yes) sums the probabilities of the ids
    in answer_token_ids()["yes"] (likewise no), i.e. a softmax over just those logits.

    The input is one user message holding the image and `question` (with "{prompt}" replaced by the
    prompt text), rendered by the processor's chat template with add_generation_prompt=True. Samples
    are batched only with others of the same token length (a group of G images of one prompt always
    is), so no padding enters the model and the batch size cannot change a reward."""

    def __init__(self, folder, device="cpu", batch_size: int = 4, question: str = DEFAULT_QUESTION):
        from transformers import AutoModelForImageTextToText
        if "{prompt}" not in question:
            raise ValueError(f"question must contain {{prompt}}, got {question!r}")
        self.processor = _processor(folder)
        if getattr(self.processor, "chat_template", None) is None:
            raise ValueError(f"{folder}: the processor has no chat template")
        self.model = _load(AutoModelForImageTextToText, folder, device)
        self.answer_ids = answer_token_ids(self.processor.tokenizer)
        self.batch_size, self.question = batch_size, question

    def chat_text(self, text: str) -> str:
        """The templated input for one prompt text (the image stands as the template's image slot)."""
        question = self.question.replace("{prompt}", text)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _inputs(self, images: list[Image.Image], texts: list[str]):
        return self.processor(images=images, text=texts, return_tensors="pt", padding=True)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[Any]) -> torch.Tensor:
        _check_batch(images, prompts)
        pil = to_pil(images)
        texts = [self.chat_text(t) for t in split_prompts(prompts)[0]]
        lengths = [self._inputs([im], [t])["input_ids"].shape[1] for im, t in zip(pil, texts)]
        ids = self.answer_ids["yes"] + self.answer_ids["no"]
        n_yes = len(self.answer_ids["yes"])
        rewards = torch.empty(len(pil), dtype=torch.float32)
        for idx in _batches(lengths, self.batch_size):
            inputs = self._inputs([pil[i] for i in idx], [texts[i] for i in idx])
            logits = self.model(**_to_model(inputs, self.model)).logits[:, -1, ids].float()
            rewards[idx] = logits.softmax(-1)[:, :n_yes].sum(-1).cpu()
        return rewards


# ---- GenEval ----------------------------------------------------------------------------------------

# query text per supported zero-shot detector (OWL's own examples; Grounding DINO's lowercase phrases)
DETECTOR_QUERIES = {"owlvit": "a photo of a {cls}", "owlv2": "a photo of a {cls}",
                    "grounding-dino": "{cls}", "mm-grounding-dino": "{cls}"}
# detectors whose post-processing labels each box with its best query; the others are run once per
# class, since Grounding DINO's labels are decoded phrases rather than query indices
JOINT_QUERY_DETECTORS = ("owlvit", "owlv2")
# GenEval's colour prompts, each filled with a PALETTE colour c and the class cls
COLOUR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")


def colour_crop(image: Image.Image, detection, bgcolor: str = "#999", crop: bool = True) -> Image.Image:
    """GenEval's colour crop: where the detection has a mask (H, W), the image is composited onto a
    plain `bgcolor` background first ("original": no change); then its box is cut out, corners
    rounded as PIL does. A box under a pixel wide is widened to one pixel (GenEval would fail)."""
    if detection.mask is not None:
        mask = np.asarray(detection.mask, dtype=bool)
        if mask.shape != (image.height, image.width):
            raise ValueError(f"mask {mask.shape} does not match the image ({image.height}, {image.width})")
        blank = image.copy() if bgcolor == "original" else Image.new("RGB", image.size, bgcolor)
        image = Image.composite(image, blank, Image.fromarray(mask))
    if not crop:
        return image
    x0, y0, x1, y1 = (int(round(v)) for v in detection.box)
    return image.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))


class GenEvalReward:
    """GenEval's verdict (Ghosh et al. 2023; the rules in geneval.py) on a zero-shot detector and CLIP
    colours. `folder` holds detector/ (an AutoModelForZeroShotObjectDetection: OWL-ViT, OWLv2,
    Grounding DINO) and clip/ (a CLIPModel). Per image: the classes of its prompt's include and
    exclude clauses are the queries; all boxes the processor's post-processing returns at threshold
    0, in the image's pixels, go to geneval.evaluate_metadata, which applies GenEval's thresholds;
    a candidate's colour is CLIP zero-shot over PALETTE on its colour_crop, with GenEval's three
    COLOUR_TEMPLATES (unit text embeddings averaged per colour, re-normalised; argmax of the dot
    product with the crop's unit embedding). Reward = the mean of the exam points (TA-style);
    `scores` also gives GenEval's correct (all points).

    Where ours differs from GenEval:
    - The detector is zero-shot (OWLv2 / Grounding DINO), not Mask2Former on COCO: no masks (crops
      are unmasked boxes, GenEval's no-mask path), and its scores are calibrated differently, so
      GenEval's thresholds (0.3, counting 0.9) are only defaults: set them through `options`.
    - Only the prompt's classes are queried (Mask2Former scores all 80 at once); OWL labels each box
      with its best query, Grounding DINO runs once per class. Queries: DETECTOR_QUERIES.
    - CLIP is transformers' (any CLIPModel folder) rather than open_clip's ViT-L-14, in the folder's
      dtype (fp32 when saved so) rather than under autocast; crops go through its processor.
    - Boxes are clipped to the image; a box under a pixel is widened to one for its crop.
    `options`: GenEval's (threshold, counting_threshold, max_objects, max_overlap, position_threshold,
    bgcolor, crop), as strings or numbers."""

    def __init__(self, folder, device="cpu", batch_size: int = 8, options: dict | None = None):
        import geneval
        from PIL import ImageColor
        from transformers import AutoModelForZeroShotObjectDetection
        folder = Path(folder)
        self.options = dict(options or {})
        geneval.filter_detections([], "single_object", self.options)  # bad option keys or values fail now
        self.bgcolor = str(self.options.get("bgcolor", "#999"))
        if self.bgcolor != "original":
            ImageColor.getrgb(self.bgcolor)
        self.crop = str(self.options.get("crop", "1")) == "1"
        self.processor = _processor(folder / "detector")
        self.detector = _load(AutoModelForZeroShotObjectDetection, folder / "detector", device)
        model_type = self.detector.config.model_type
        if model_type not in DETECTOR_QUERIES:
            raise ValueError(f"{folder / 'detector'}: detector {model_type!r} is not one of "
                             f"{', '.join(DETECTOR_QUERIES)}")
        self.query, self.joint = DETECTOR_QUERIES[model_type], model_type in JOINT_QUERY_DETECTORS
        self.clip = ClipEmbedder(folder / "clip", device, batch_size)
        self.batch_size = batch_size
        self._palettes: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def detect(self, images: list[Image.Image], classes: list[list[str]]) -> list[list]:
        """Each image's raw geneval.Detection list for its classes: every box at threshold 0, boxes
        (x1, y1, x2, y2) in the image's pixels, clipped to it."""
        import geneval
        if self.joint:
            jobs = [(i, tuple(names)) for i, names in enumerate(classes)]
        else:
            jobs = [(i, (name,)) for i, names in enumerate(classes) for name in names]
        found: list[list] = [[] for _ in images]
        for batch in _batches([names for _, names in jobs], self.batch_size):
            names = jobs[batch[0]][1]
            picked = [images[jobs[j][0]] for j in batch]
            queries = [self.query.format(cls=name) for name in names]
            inputs = self.processor(text=[queries] * len(batch), images=picked, return_tensors="pt",
                                    truncation=True)
            outputs = self.detector(**_to_model(inputs, self.detector))
            results = self.processor.post_process_grounded_object_detection(
                outputs, threshold=0.0, target_sizes=[(im.height, im.width) for im in picked])
            for j, image, result in zip(batch, picked, results):
                labels = result["labels"].tolist() if self.joint else [0] * len(result["scores"])
                limits = torch.tensor([image.width, image.height] * 2, dtype=torch.float32)
                boxes = torch.minimum(result["boxes"].float().cpu().clamp(min=0), limits)
                for box, score, label in zip(boxes.tolist(), result["scores"].tolist(), labels):
                    found[jobs[j][0]].append(geneval.Detection(names[label], box, score))
        return found

    def palette(self, cls: str) -> torch.Tensor:
        """(10, D) GenEval's colour classifier for a class: per PALETTE colour, the mean of its
        COLOUR_TEMPLATES' unit text embeddings, re-normalised (cached per class)."""
        import geneval
        if cls not in self._palettes:
            texts = [t.format(c=c, cls=cls) for c in geneval.PALETTE for t in COLOUR_TEMPLATES]
            emb = self.clip.embed_texts(texts).view(len(geneval.PALETTE), len(COLOUR_TEMPLATES), -1)
            self._palettes[cls] = torch.nn.functional.normalize(emb.mean(1), dim=-1)
        return self._palettes[cls]

    def classify_colours(self, image: Image.Image, cls: str, candidates: list) -> list[str]:
        """One PALETTE colour per candidate detection of class cls in image (GenEval's recipe)."""
        import geneval
        crops = [colour_crop(image, det, self.bgcolor, self.crop) for det in candidates]
        scores = self.clip.embed_images(crops) @ self.palette(cls).T
        return [geneval.PALETTE[k] for k in scores.argmax(1).tolist()]

    def verdicts(self, images: torch.Tensor, prompts: Sequence[Any]) -> list:
        """geneval.Verdict per image; every prompt needs GenEval metadata (checked before any model runs)."""
        import geneval
        _check_batch(images, prompts)
        texts, metadata = split_prompts(prompts)
        for i, (text, meta) in enumerate(zip(texts, metadata)):
            where = f"prompt {i} ({text!r})"
            if not meta:
                raise ValueError(f"{where}: no GenEval metadata (tag, include, exclude); the geneval reward "
                                 f"needs prompts from a GenEval-style JSONL")
            geneval.check_metadata(meta, where)
        pil = to_pil(images)
        classes = [list(dict.fromkeys(c["class"] for c in m["include"] + m.get("exclude", [])))
                   for m in metadata]
        detections = self.detect(pil, classes)
        verdicts = []
        for meta, found, image in zip(metadata, detections, pil):
            def colours(cls, candidates, image=image):
                return self.classify_colours(image, cls, candidates)
            verdicts.append(geneval.evaluate_metadata(meta, found, colours, self.options))
        return verdicts

    def scores(self, images: torch.Tensor, prompts: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(points (R,) float32: the mean of each verdict's exam points, correct (R,) bool)."""
        verdicts = self.verdicts(images, prompts)
        return (torch.tensor([v.ta for v in verdicts], dtype=torch.float32),
                torch.tensor([v.correct for v in verdicts], dtype=torch.bool))

    def __call__(self, images: torch.Tensor, prompts: Sequence[Any]) -> torch.Tensor:
        return self.scores(images, prompts)[0]


# ---- several rewards, and --reward ------------------------------------------------------------------

class WeightedSum:
    """sum_k w_k * r_k(images, prompts): several rewards as one, e.g. GenEval plus a CLIP term."""

    def __init__(self, parts: list[tuple[float, RewardModel]]):
        if not parts:
            raise ValueError("WeightedSum needs at least one (weight, model)")
        self.parts = [(float(weight), model) for weight, model in parts]

    def __call__(self, images: torch.Tensor, prompts: Sequence[Any]) -> torch.Tensor:
        total = torch.zeros(len(images), dtype=torch.float32)
        for weight, model in self.parts:
            total = total + weight * model(images, prompts)
        return total


class RewardSpec(NamedTuple):
    """One part of --reward: `kind:folder[@weight]`."""
    kind: str
    folder: str
    weight: float = 1.0


KINDS = {"clip": ClipScore, "pickscore": PickScore, "vlm": VLMJudge, "geneval": GenEvalReward}
EMPTY_SPEC = "--reward is empty: expected kind:folder[@weight],... with kind one of " + ", ".join(KINDS)


def parse_reward_spec(text: str) -> list[RewardSpec]:
    """`kind:folder[@weight],...` -> RewardSpecs (weight 1.0 when absent). A part's weight follows its
    last "@", so a folder whose name holds "@" needs an explicit weight. Syntax errors (no kind, a
    weight that is not a number, an empty part) are ValueErrors naming the part."""
    if not text or not text.strip():
        raise ValueError(EMPTY_SPEC)
    specs = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            raise ValueError(f"--reward={text!r}: an empty part (a doubled or trailing comma)")
        kind, colon, rest = part.partition(":")
        if not colon or not kind.strip():
            raise ValueError(f"--reward part {part!r}: expected kind:folder[@weight]")
        folder, weight = rest.rsplit("@", 1) if "@" in rest else (rest, "1")
        try:
            value = float(weight)
        except ValueError:
            raise ValueError(f"--reward part {part!r}: weight {weight!r} is not a number") from None
        specs.append(RewardSpec(kind.strip(), folder.strip(), value))
    return specs


def _check_dir(folder: Path, where: str) -> None:
    if not folder.exists():
        raise ValueError(f"{where}: folder {folder} does not exist")
    if not folder.is_dir():
        raise ValueError(f"{where}: {folder} is not a folder")


def _model_type(folder: Path, where: str) -> str | None:
    """config.json's model_type of a model folder; ValueError (naming `where`) when there is none."""
    _check_dir(folder, where)
    config = folder / "config.json"
    if not config.is_file():
        raise ValueError(f"{where}: {folder} has no config.json (not a transformers model folder)")
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{where}: {config} is not a readable JSON object ({e})") from None


def _expect(folder: Path, where: str, allowed, wanted: str) -> str:
    model_type = _model_type(folder, where)
    if model_type not in allowed:
        raise ValueError(f"{where}: {folder} holds model_type {model_type!r}, not {wanted}")
    return model_type


def check_reward_spec(specs: list[RewardSpec]) -> None:
    """Cheap checks before any model loads, each a ValueError naming the offending part: a known
    kind, a finite weight, and a folder whose config.json has the kind's model_type (clip, pickscore:
    "clip"; vlm: an image-text-to-text model; geneval: detector/ a supported zero-shot detector and
    clip/ "clip")."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    from transformers.utils import is_scipy_available, is_torchvision_available
    if not specs:
        raise ValueError(EMPTY_SPEC)
    for spec in specs:
        where = f"--reward part {spec.kind}:{spec.folder}"
        if spec.kind not in KINDS:
            raise ValueError(f"{where}: unknown kind {spec.kind!r}; kinds: {', '.join(KINDS)}")
        if not math.isfinite(spec.weight):
            raise ValueError(f"{where}: weight {spec.weight} is not a finite number")
        if not spec.folder:
            raise ValueError(f"{where}: no folder after {spec.kind}:")
        folder = Path(spec.folder)
        if spec.kind in ("clip", "pickscore"):
            _expect(folder, where, ("clip",), "'clip' (a CLIPModel)")
        elif spec.kind == "vlm":
            _expect(folder, where, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
                    "an image-text-to-text model (AutoModelForImageTextToText: llava, qwen2_5_vl, ...)")
        else:
            _check_dir(folder, where)
            detector = _expect(folder / "detector", where, DETECTOR_QUERIES,
                               "a zero-shot detector (" + ", ".join(DETECTOR_QUERIES) + ")")
            if detector == "owlv2" and not (is_scipy_available() or is_torchvision_available()):
                raise ValueError(f"{where}: OWLv2's image processor needs scipy or torchvision; install one")
            _expect(folder / "clip", where, ("clip",), "'clip' (a CLIPModel for the colours)")


def needs_metadata(specs: list[RewardSpec]) -> bool:
    """Whether the rewards read prompt metadata (geneval does), so prompts must come from JSONL."""
    return any(spec.kind == "geneval" for spec in specs)


def build_reward(text: str, device="cpu", batch_size: int = 16) -> RewardModel:
    """--reward text -> a reward model: parse, check (before loading anything), load. One part of
    weight 1 is returned as itself, otherwise a WeightedSum."""
    specs = parse_reward_spec(text)
    check_reward_spec(specs)
    parts = [(spec.weight, KINDS[spec.kind](spec.folder, device=device, batch_size=batch_size))
             for spec in specs]
    return parts[0][1] if len(parts) == 1 and parts[0][0] == 1 else WeightedSum(parts)
