"""The learned rewards (reward.py) on tiny random checkpoints saved in their real transformers formats
(tests/tiny_models.py) and loaded through build_reward, as a user's folder is. Each reward matches
an independent computation written here with transformers; batch size and repeats change nothing;
GenEval's plumbing (boxes, colours, crops) feeds geneval's rules; every --reward mistake is a
ValueError naming the part, raised before any model loads."""
import math
import re
import time

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (AutoModelForImageTextToText, AutoModelForZeroShotObjectDetection, AutoProcessor,
                          CLIPModel)

import geneval
import reward
from prompts import Prompt
from tiny_models import save_tiny_clip, save_tiny_geneval, save_tiny_vlm

LONG = "a photo of " + " and ".join(["a red cat with a blue dog"] * 12)  # > 77 CLIP tokens
TWO = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}],
       "prompt": "a photo of a cat and a dog"}
RED_CUP = {"tag": "color_attr", "include": [{"class": "cup", "count": 1, "color": "red"}],
           "exclude": [{"class": "bench", "count": 1}], "prompt": "a photo of a red cup"}
PROMPTS = [Prompt(TWO["prompt"], TWO), Prompt(TWO["prompt"], TWO), "a photo of a cow", Prompt(LONG, RED_CUP)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny models' ops are too small to split, and on a loaded 2-core
    machine each thread-pool barrier costs milliseconds (40x slower in all)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("rewards")
    return {"clip": save_tiny_clip(root / "clip"), "vlm": save_tiny_vlm(root / "vlm"),
            "geneval": save_tiny_geneval(root / "geneval"),
            "geneval_gd": save_tiny_geneval(root / "geneval_gd", detector="grounding-dino")}


@pytest.fixture(scope="module")
def images():
    """Four non-square images, (4, 3, 40, 48) in [0, 1]."""
    return torch.rand(len(PROMPTS), 3, 40, 48, generator=torch.Generator().manual_seed(0))


def pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy())


def texts_of(prompts):
    return [p if isinstance(p, str) else p.text for p in prompts]


# ---- ClipScore, PickScore, VLMJudge against transformers ---------------------------------------------

@pytest.mark.parametrize("kind", ["clip", "pickscore"])
def test_clip_rewards_match_clip_forward(folders, images, kind):
    """ClipScore = 100 max(cos, 0) and PickScore = logits_per_image (exp(logit_scale) cos) of
    CLIPModel's own forward, one image-text pair at a time, texts truncated to 77 tokens."""
    model = reward.build_reward(f"{kind}:{folders['clip']}")
    assert type(model) is {"clip": reward.ClipScore, "pickscore": reward.PickScore}[kind]
    processor = AutoProcessor.from_pretrained(folders["clip"], local_files_only=True)
    clip = CLIPModel.from_pretrained(folders["clip"], local_files_only=True).eval()
    cos, logits = [], []
    with torch.no_grad():
        for image, text in zip(images, texts_of(PROMPTS)):
            inputs = processor(text=[text], images=[pil(image)], return_tensors="pt", truncation=True,
                               max_length=77)
            out = clip(**inputs)
            cos.append((out.image_embeds * out.text_embeds).sum())
            logits.append(out.logits_per_image[0, 0])
    cos, logits = torch.stack(cos), torch.stack(logits)
    assert (cos < 0).any() and (cos > 0).any()  # both sides of CLIPScore's max(., 0)
    expected = 100 * cos.clamp(min=0) if kind == "clip" else logits
    torch.testing.assert_close(model(images, PROMPTS), expected, rtol=1e-5, atol=1e-5)


def test_vlm_matches_chat_template_forward(folders, images):
    """P(yes) / (P(yes) + P(no)) at the last position of the model's forward on the processor's
    chat-template input, one sample at a time."""
    judge = reward.build_reward(f"vlm:{folders['vlm']}")
    assert isinstance(judge, reward.VLMJudge)
    processor = AutoProcessor.from_pretrained(folders["vlm"], local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(folders["vlm"], local_files_only=True).eval()
    yes, no = processor.tokenizer.convert_tokens_to_ids(["yes", "no"])
    assert reward.answer_token_ids(processor.tokenizer) == {"yes": [yes], "no": [no]}
    expected = []
    with torch.no_grad():
        for image, text in zip(images, texts_of(PROMPTS)):
            question = f'Does this image match the description "{text}"? Answer yes or no.'
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            chat = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            assert chat.startswith("USER: <image>\n") and chat.endswith("ASSISTANT:")
            logits = model(**processor(images=[pil(image)], text=[chat], return_tensors="pt")).logits[0, -1]
            expected.append(logits[[yes, no]].softmax(-1)[0])
    torch.testing.assert_close(judge(images, PROMPTS), torch.stack(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["clip", "pickscore", "vlm"])
def test_batch_size_repeats_shape(folders, images, kind):
    """Batch size 1 and 3 agree; a repeat is bitwise equal; (R,) float32 on the CPU."""
    folder = folders["vlm" if kind == "vlm" else "clip"]
    one = reward.build_reward(f"{kind}:{folder}", batch_size=1)
    three = reward.build_reward(f"{kind}:{folder}", batch_size=3)
    r = three(images, PROMPTS)
    assert r.shape == (len(PROMPTS),) and r.dtype == torch.float32 and r.device.type == "cpu"
    torch.testing.assert_close(one(images, PROMPTS), r, rtol=1e-5, atol=1e-6)
    assert torch.equal(three(images, PROMPTS), r)


def test_vlm_batches_only_equal_lengths(folders, images):
    """The judge batches samples of equal token length (the group of one prompt), so no padding
    enters the model: batches of at most 3 here are [0, 1], [2], [3]."""
    judge = reward.build_reward(f"vlm:{folders['vlm']}", batch_size=3)
    forward, seen = judge.model.forward, []

    def recording(**inputs):
        seen.append((len(inputs["input_ids"]), bool(inputs["attention_mask"].all())))
        return forward(**inputs)

    judge.model.forward = recording
    judge(images, PROMPTS)
    assert seen == [(2, True), (1, True), (1, True)]


def test_answer_token_ids_rule(folders):
    """Every single-token spelling counts (here yes/Yes/" yes" all lowercase to one id); a tokenizer
    with no single token for an answer, or only its unknown token, is refused by name."""
    processor = AutoProcessor.from_pretrained(folders["vlm"], local_files_only=True)
    tokenizer = processor.tokenizer
    assert len(reward.answer_token_ids(tokenizer)["yes"]) == 1

    class Characters:  # every character a token: "yes" is three
        unk_token_id = None

        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

    with pytest.raises(ValueError, match="no single token for 'yes'"):
        reward.answer_token_ids(Characters())

    class Unknown(Characters):  # "yes" maps to the unknown token only
        unk_token_id = 0

        def encode(self, text, add_special_tokens=False):
            return [0] if text.strip().lower() == "yes" else [1]

    with pytest.raises(ValueError, match="'yes'"):
        reward.answer_token_ids(Unknown())


def test_weighted_sum_and_single_spec(folders, images):
    """One part of weight 1 is the model itself; otherwise sum_k w_k r_k."""
    clip = folders["clip"]
    assert isinstance(reward.build_reward(f"clip:{clip}@1"), reward.ClipScore)
    assert isinstance(reward.build_reward(f"clip:{clip}@3"), reward.WeightedSum)
    both = reward.build_reward(f"clip:{clip}@0.5, pickscore:{clip}@-2")
    assert isinstance(both, reward.WeightedSum) and [w for w, _ in both.parts] == [0.5, -2.0]
    expected = (0.5 * reward.build_reward(f"clip:{clip}")(images, PROMPTS)
                - 2 * reward.build_reward(f"pickscore:{clip}")(images, PROMPTS))
    torch.testing.assert_close(both(images, PROMPTS), expected, rtol=1e-6, atol=1e-6)


# ---- GenEval -----------------------------------------------------------------------------------------

def raw_boxes(folder, image: Image.Image, classes, joint: bool):
    """Independent detections: the model's pred_boxes (cx, cy, w, h in [0, 1]) in pixels, clipped,
    and sigmoid of the best logit per box; OWL with all queries at once, Grounding DINO per class."""
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    model = AutoModelForZeroShotObjectDetection.from_pretrained(folder, local_files_only=True).eval()
    template = "a photo of a {}" if joint else "{}"
    w, h = image.size
    found = []
    with torch.no_grad():
        for names in [classes] if joint else [[c] for c in classes]:
            queries = [template.format(c) for c in names]
            out = model(**processor(text=[queries], images=[image], return_tensors="pt"))
            cx, cy, bw, bh = out.pred_boxes[0].unbind(-1)
            side = max(w, h) if model.config.model_type == "owlv2" else None  # OWLv2 pads to a square
            scale = torch.tensor([side or w, side or h] * 2)
            boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1) * scale
            boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([w, h, w, h]))
            best = out.logits[0].max(-1)
            for box, score, label in zip(boxes, best.values.sigmoid(), best.indices):
                found.append((names[int(label)] if joint else names[0], box.tolist(), float(score)))
    return found


@pytest.mark.parametrize("detector", ["geneval", "geneval_gd"])
def test_geneval_detections(folders, images, detector):
    """All boxes at threshold 0 for the prompt's classes (include + exclude), in the image's pixels
    within the image, as the model's own outputs say; batch size and repeats do not change them."""
    model = reward.build_reward(f"geneval:{folders[detector]}", batch_size=3)
    images_pil = reward.to_pil(images[:3])
    classes = [["cat", "dog"], ["cat", "dog"], ["cup", "bench"]]
    found = model.detect(images_pil, classes)
    single = reward.GenEvalReward(folders[detector], batch_size=1).detect(images_pil, classes)
    for image, names, dets, dets_single in zip(images_pil, classes, found, single):
        want = raw_boxes(folders[detector] / "detector", image, names, model.joint)
        assert [d.cls for d in dets] == [cls for cls, _, _ in want] and {d.cls for d in dets} <= set(names)
        for det, (_, box, score) in zip(dets, want):
            x0, y0, x1, y1 = det.box
            assert 0 <= x0 <= x1 <= image.width and 0 <= y0 <= y1 <= image.height
            np.testing.assert_allclose(det.box, box, rtol=1e-5, atol=1e-4)
            assert det.score == pytest.approx(score, rel=1e-5, abs=1e-7)
        np.testing.assert_allclose([d.box for d in dets_single], [d.box for d in dets], rtol=1e-5, atol=1e-4)
    assert len(found[0]) == (16 if model.joint else 2 * 10)  # OWL: one box a patch; DINO: 10 a class
    assert model.detect(images_pil, classes) == found
    points = model(images[:3], [PROMPTS[0], PROMPTS[1], PROMPTS[3]])
    assert points.shape == (3,) and points.dtype == torch.float32
    assert torch.equal(model(images[:3], [PROMPTS[0], PROMPTS[1], PROMPTS[3]]), points)


def test_geneval_scores_are_the_rules(folders, images, monkeypatch):
    """scores() is geneval.evaluate_metadata on the detections and colours: hand-made detections
    make a two_object prompt pass and fail, and a colour prompt fail on its colour and exclude."""
    model = reward.build_reward(f"geneval:{folders['geneval']}")
    D = geneval.Detection
    planted = [[D("cat", (1, 1, 20, 30), 0.8), D("dog", (25, 5, 47, 39), 0.7)],    # passes
               [D("cat", (1, 1, 20, 30), 0.8), D("dog", (25, 5, 47, 39), 0.2)],    # dog under 0.3
               [D("cup", (2, 3, 30, 20), 0.9), D("bench", (0, 0, 5, 5), 0.5)]]     # colour, exclude
    asked = []

    def detect(images_pil, classes):
        asked.append(classes)
        return planted

    monkeypatch.setattr(model, "detect", detect)
    monkeypatch.setattr(model, "classify_colours", lambda image, cls, candidates: ["blue"] * len(candidates))
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[3]]
    points, correct = model.scores(images[:3], prompts)
    assert asked == [[["cat", "dog"], ["cat", "dog"], ["cup", "bench"]]]
    verdicts = [geneval.evaluate_metadata(p.metadata, dets, lambda cls, c: ["blue"] * len(c))
                for p, dets in zip(prompts, planted)]
    assert points.tolist() == pytest.approx([v.ta for v in verdicts])
    assert correct.tolist() == [v.correct for v in verdicts] == [True, False, False]
    assert points.tolist() == pytest.approx([1.0, 0.5, 1 / 3])  # [count, colour, exclude] = [T, F, F]
    assert points.dtype == torch.float32 and correct.dtype == torch.bool
    assert torch.equal(model(images[:3], prompts), points)
    assert [v.reason for v in model.verdicts(images[:3], prompts)] == [v.reason for v in verdicts]


def test_geneval_colour_is_clip_zero_shot(folders):
    """A candidate's colour: CLIP's unit crop embedding against, per colour, the re-normalised mean
    of the three templates' unit text embeddings (CLIPModel's forward here), argmax."""
    model = reward.build_reward(f"geneval:{folders['geneval']}")
    pixels = np.zeros((40, 48, 3), np.uint8)
    pixels[:, :24] = (220, 20, 20)
    pixels[:, 24:] = (30, 40, 200)
    pixels[30:, :] = (240, 240, 240)
    image = Image.fromarray(pixels)
    dets = [geneval.Detection("cup", box, 0.9) for box in [(0, 0, 24, 30), (24, 0, 48, 30), (5, 25, 40, 40)]]
    processor = AutoProcessor.from_pretrained(folders["geneval"] / "clip", local_files_only=True)
    clip = CLIPModel.from_pretrained(folders["geneval"] / "clip", local_files_only=True).eval()
    texts = [t.format(c=c, cls="cup") for c in geneval.PALETTE
             for t in ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")]
    crops = [image.crop(d.box) for d in dets]
    with torch.no_grad():
        out = clip(**processor(text=texts, images=crops, return_tensors="pt", padding=True))
    palette = torch.nn.functional.normalize(out.text_embeds.view(10, 3, -1).mean(1), dim=-1)
    torch.testing.assert_close(model.palette("cup"), palette, rtol=1e-5, atol=1e-6)
    scores = out.image_embeds @ palette.T
    assert model.classify_colours(image, "cup", dets) == [geneval.PALETTE[k] for k in scores.argmax(1)]
    torch.testing.assert_close(model.clip.embed_images(crops), out.image_embeds, rtol=1e-5, atol=1e-6)


def test_colour_crop_composites_mask_onto_grey():
    """With a mask, pixels outside it become #999 (153, 153, 153) before the box is cut; "original"
    keeps them; crop=False keeps the whole image; a sub-pixel box still yields one pixel."""
    image = Image.fromarray(np.full((10, 12, 3), (200, 10, 10), np.uint8))
    mask = np.zeros((10, 12), bool)
    mask[2:6, 3:9] = True
    det = geneval.Detection("cup", (2, 1, 10, 8), 0.9, mask=mask)
    crop = np.asarray(reward.colour_crop(image, det))
    assert crop.shape == (7, 8, 3)
    inside = mask[1:8, 2:10]
    assert (crop[inside] == (200, 10, 10)).all() and (crop[~inside] == (153, 153, 153)).all()
    assert (np.asarray(reward.colour_crop(image, det, bgcolor="original")) == (200, 10, 10)).all()
    assert reward.colour_crop(image, det, crop=False).size == (12, 10)
    assert reward.colour_crop(image, geneval.Detection("cup", (3.2, 4, 3.3, 4.1), 0.9)).size == (1, 1)
    with pytest.raises(ValueError, match="does not match"):
        reward.colour_crop(image, geneval.Detection("cup", (0, 0, 5, 5), 0.9, mask=mask[:5]))


def test_geneval_needs_metadata(folders, images):
    model = reward.build_reward(f"geneval:{folders['geneval']}")
    with pytest.raises(ValueError, match=re.escape("prompt 1 ('a photo of a cow'): no GenEval metadata")):
        model(images[:2], [PROMPTS[0], "a photo of a cow"])
    with pytest.raises(ValueError, match=re.escape("prompt 0 ('x')") + ".*unknown tag"):
        model(images[:1], [Prompt("x", {"tag": "nope", "include": []})])
    with pytest.raises(ValueError, match="options: unknown key 'treshold'"):
        reward.GenEvalReward(folders["geneval"], options={"treshold": 0.5})
    assert reward.needs_metadata(reward.parse_reward_spec("clip:/a,geneval:/b@2"))
    assert not reward.needs_metadata(reward.parse_reward_spec("clip:/a,vlm:/b"))


# ---- --reward: errors before anything loads ----------------------------------------------------------

def test_spec_parsing():
    assert reward.parse_reward_spec("clip:/a@0.5, vlm:/b") == [reward.RewardSpec("clip", "/a", 0.5),
                                                                reward.RewardSpec("vlm", "/b", 1.0)]
    assert reward.parse_reward_spec("geneval:/x@y@2") == [reward.RewardSpec("geneval", "/x@y", 2.0)]


def test_spec_errors_name_the_part(folders, tmp_path, no_model_loading):
    clip, vlm, gen = folders["clip"], folders["vlm"], folders["geneval"]
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{")
    swapped = tmp_path / "swapped"  # a GenEval folder whose detector is a CLIP
    swapped.mkdir()
    (swapped / "detector").symlink_to(clip)
    (swapped / "clip").symlink_to(clip)
    cases = [("", "--reward is empty"),
             (" , ", "an empty part"),
             (f"clip:{clip},,vlm:{vlm}", "an empty part"),
             ("clip", "'clip': expected kind:folder"),
             (f"nope:{clip}", f"nope:{clip}: unknown kind 'nope'; kinds: clip, pickscore, vlm, geneval"),
             ("clip:", "clip:: no folder"),
             (f"clip:{tmp_path}/missing", f"{tmp_path}/missing does not exist"),
             (f"clip:{tmp_path}/file", f"{tmp_path}/file is not a folder"),
             (f"clip:{tmp_path}/empty", f"{tmp_path}/empty has no config.json"),
             (f"clip:{tmp_path}/badjson", "config.json is not a readable JSON"),
             (f"clip:{clip},vlm:{clip}", f"vlm:{clip}: {clip} holds model_type 'clip', not an image-text"),
             (f"clip:{vlm}", f"clip:{vlm}: {vlm} holds model_type 'llava', not 'clip'"),
             (f"pickscore:{vlm}", f"pickscore:{vlm}: {vlm} holds model_type 'llava'"),
             (f"geneval:{clip}", f"geneval:{clip}: folder {clip}/detector does not exist"),
             (f"geneval:{swapped}", "holds model_type 'clip', not a zero-shot detector"),
             (f"vlm:{gen}/detector", "holds model_type 'owlvit', not an image-text"),
             (f"clip:{clip}@abc", f"'clip:{clip}@abc': weight 'abc' is not a number"),
             (f"clip:{clip}@nan", f"clip:{clip}: weight nan is not a finite number"),
             (f"clip:{clip}@-inf", "weight -inf is not a finite number")]
    start = time.perf_counter()
    for text, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            reward.build_reward(text)
    assert time.perf_counter() - start < 2


def test_owlv2_needs_scipy_or_torchvision(folders, tmp_path, no_model_loading, monkeypatch):
    """OWLv2's image processor cannot run without scipy or torchvision: said before loading."""
    import transformers.utils
    folder = tmp_path / "geneval"
    (folder / "detector").mkdir(parents=True)
    (folder / "detector" / "config.json").write_text('{"model_type": "owlv2"}')
    (folder / "clip").symlink_to(folders["clip"])
    specs = reward.parse_reward_spec(f"geneval:{folder}")
    reward.check_reward_spec(specs)                          # requirements.txt pins scipy
    monkeypatch.setattr(transformers.utils, "is_scipy_available", lambda: False)
    monkeypatch.setattr(transformers.utils, "is_torchvision_available", lambda: False)
    with pytest.raises(ValueError, match="OWLv2's image processor needs scipy or torchvision"):
        reward.check_reward_spec(specs)


def test_owlv2_detector(tmp_path, images):
    """OWLv2 (boxes on its padded square) end to end."""
    folder = save_tiny_geneval(tmp_path / "geneval", detector="owlv2")
    model = reward.build_reward(f"geneval:{folder}")
    image = reward.to_pil(images[:1])[0]
    dets = model.detect([image], [["cat", "dog"]])[0]
    want = raw_boxes(folder / "detector", image, ["cat", "dog"], joint=True)
    np.testing.assert_allclose([d.box for d in dets], [box for _, box, _ in want], rtol=1e-5, atol=1e-4)
    assert math.isfinite(float(model(images[:1], PROMPTS[:1])[0]))
