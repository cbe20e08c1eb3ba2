"""Tiny random reward models in their real transformers formats, for tests that go through the same
local-folder loading a user's checkpoint does (no hub, no network).

Each builder seeds torch, builds a small model (widths 16-64, images 32 px; Grounding DINO 64 px),
writes it and its processor with `save_pretrained` and returns the folder. The tokenizers are built
offline: CLIP's (also OWL's) as a byte-level BPE over the 256 byte characters, their end-of-word
forms and whole-word merges for WORDS; the VLM's word-level, so that "yes" and "no" are single
tokens; Grounding DINO's as a WordPiece vocabulary of WORDS and letters.

    save_tiny_clip(folder)       CLIPModel              clip, pickscore, and geneval's clip/
    save_tiny_vlm(folder)        Llava (CLIP + Llama)   vlm
    save_tiny_owlvit(folder)     OWL-ViT                geneval's detector/ (PIL-only processing)
    save_tiny_owlv2(folder)      OWLv2                  its processor needs scipy or torchvision
    save_tiny_grounding_dino(folder)                    a detector run once per class
    save_tiny_geneval(folder, detector="owlvit")        detector/ + clip/
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (BertConfig, BertTokenizer, CLIPConfig, CLIPImageProcessorPil, CLIPModel,
                          CLIPProcessor, CLIPTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                          GroundingDinoImageProcessorPil, GroundingDinoProcessor, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor, Owlv2Config, Owlv2ForObjectDetection,
                          Owlv2ImageProcessorPil, Owlv2Processor, OwlViTConfig, OwlViTForObjectDetection,
                          OwlViTImageProcessorPil, OwlViTProcessor, PreTrainedTokenizerFast, SwinConfig)

# words that tokenize whole (prompts, GenEval's templates and colours, a few class names)
WORDS = tuple("a photo of an the and with two three four is on to left right above below next".split()
              + "red orange yellow green blue purple pink brown black white colored object".split()
              + "cat dog cow bench clock cup car bird person apple banana pizza".split())
IMAGE_SIZE = 32
PATCH = 8
# Llava-1.5's chat template: the images first, then the text, then "ASSISTANT:"
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
    "{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def _clip_tokenizer(max_length: int) -> CLIPTokenizer:
    """CLIP's byte-level BPE over the 256 byte characters with whole-word merges for WORDS."""
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab[token] = len(vocab)
    merges = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            if (left, right) not in merges:
                merges.append((left, right))
            left = left + right
            vocab.setdefault(left, len(vocab))
    # special tokens last, as in CLIP: OWL reads a query whose first id is 0 as padding
    for token in ("<|startoftext|>", "<|endoftext|>"):
        vocab[token] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def _clip_config(seq_len: int, tokenizer: CLIPTokenizer) -> dict:
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=seq_len,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=PATCH)
    return dict(text_config=text, vision_config=vision, projection_dim=32)  # OWL needs = text width


def _image_processor(cls):
    return cls(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def save_tiny_clip(folder, seed: int = 0) -> Path:
    """A tiny CLIPModel + CLIPProcessor (77-token texts, 32 px images), as a CLIP/PickScore folder."""
    folder = Path(folder)
    tokenizer = _clip_tokenizer(77)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(**_clip_config(77, tokenizer)))
    model.save_pretrained(folder)
    processor = CLIPProcessor(image_processor=_image_processor(CLIPImageProcessorPil), tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def _save_owl(folder, seed: int, config_class, model_class, image_processor_class,
              processor_class) -> Path:
    """An OWL-ViT or OWLv2 detector over the tiny CLIP towers (32-token queries, as OWL's 16 are
    too few for a character-level tokenizer)."""
    folder = Path(folder)
    tokenizer = _clip_tokenizer(32)
    torch.manual_seed(seed)
    model_class(config_class(**_clip_config(32, tokenizer))).save_pretrained(folder)
    image_processor = image_processor_class(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor_class(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def save_tiny_owlv2(folder, seed: int = 0) -> Path:
    """A tiny Owlv2ForObjectDetection + Owlv2Processor (16 image patches, so 16 boxes per image).
    OWLv2's image processor needs scipy or torchvision to run."""
    return _save_owl(folder, seed, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessorPil,
                     Owlv2Processor)


def save_tiny_owlvit(folder, seed: int = 0) -> Path:
    """A tiny OwlViTForObjectDetection + OwlViTProcessor (16 boxes per image; PIL-only processing)."""
    return _save_owl(folder, seed, OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessorPil,
                     OwlViTProcessor)


def save_tiny_grounding_dino(folder, seed: int = 0) -> Path:
    """A tiny GroundingDinoForObjectDetection (Swin backbone, BERT text tower, 10 queries) +
    GroundingDinoProcessor with a WordPiece vocabulary of WORDS and single letters."""
    folder = Path(folder)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    tokens = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."] + list(WORDS) + letters
              + ["##" + c for c in letters])
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(dict.fromkeys(tokens))})
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                          num_heads=[1, 1, 1, 1], window_size=2, out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64)
    # two decoder layers: Grounding DINO ties the box heads of layers 1.. to layer 0's
    config = GroundingDinoConfig(backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1,
                                 decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                 encoder_attention_heads=2, decoder_attention_heads=2, num_queries=10,
                                 num_feature_levels=3, encoder_n_points=2, decoder_n_points=2,
                                 max_text_len=32)
    torch.manual_seed(seed)
    GroundingDinoForObjectDetection(config).save_pretrained(folder)
    image_processor = GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 64})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


DETECTORS = {"owlvit": save_tiny_owlvit, "owlv2": save_tiny_owlv2,
             "grounding-dino": save_tiny_grounding_dino}


def save_tiny_geneval(folder, seed: int = 0, detector: str = "owlvit") -> Path:
    """A GenEval reward folder: detector/ (a tiny detector from DETECTORS) and clip/ (tiny CLIP for
    the colours). OWL-ViT is the default because OWLv2's processor needs scipy or torchvision, which
    the pinned requirements do not have."""
    folder = Path(folder)
    DETECTORS[detector](folder / "detector", seed)
    save_tiny_clip(folder / "clip", seed + 1)
    return folder


def _vlm_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: lowercased words and punctuation; "yes" and "no" are single tokens."""
    words = sorted(set(WORDS + ("yes", "no", "does", "this", "image", "match", "description", "answer",
                                "or", "user", "assistant", "system")))
    punctuation = list("?.,:;!\"'-")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for token in words + punctuation:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>", padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def save_tiny_vlm(folder, seed: int = 0) -> Path:
    """A tiny LlavaForConditionalGeneration (CLIP vision tower + Llama) + LlavaProcessor with
    Llava-1.5's chat template ("USER: <image>\n... ASSISTANT:"); 16 image tokens per image."""
    folder = Path(folder)
    tokenizer = _vlm_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    text = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH)
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_index=image_token_id,
                         image_seq_length=(IMAGE_SIZE // PATCH) ** 2, vision_feature_layer=-1,
                         vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.save_pretrained(folder)
    # the vision tower's CLS token is dropped ("default"), so 16 image tokens per image
    processor = LlavaProcessor(image_processor=_image_processor(CLIPImageProcessorPil), tokenizer=tokenizer,
                               patch_size=PATCH, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    processor.save_pretrained(folder)
    return folder
