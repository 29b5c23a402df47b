"""Tiny random text-to-image pipelines in diffusers' ``save_pretrained`` layout, made here (nothing downloaded).

``write_pipelines(folder)`` writes a ``StableDiffusionPipeline`` (``sd``), a ``StableDiffusionXLPipeline``
(``sdxl``) and a ``StableDiffusion3Pipeline`` (``sd3``, without the optional T5 encoder) under ``folder``, each
with seeded random weights and a byte-level BPE tokenizer of a few hundred tokens built here. The configurations
follow diffusers' own dummy components for these pipelines, shrunk so that a step takes milliseconds on a CPU.

Run as a script to write them somewhere: ``python tests/tiny_pipelines.py OUT_FOLDER``.
"""

from __future__ import annotations

import os
import sys

import torch

MAX_TOKENS = 16  # the tokenizers' model_max_length: prompts longer than this are truncated (as diffusers does)
MERGES = ["e</w>", "t h", "th e</w>", "a t</w>", "c at</w>", "o g</w>", "d og</w>"]  # a few, so words merge


def tokenizer():
    """A CLIP tokenizer over the 256 byte symbols (alone and word-final), a few merges and the two specials."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    merges = []
    for pair in MERGES:
        first, _, second = pair.partition(" ")
        if second:
            merges.append((first, second))
            vocab.setdefault(first + second, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def _clip_config(vocab_size: int, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=MAX_TOKENS,
        hidden_act="gelu",
        projection_dim=projection_dim,
    )


def _vae(latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
        **extra,
    )


def cross_attention_unet(in_channels: int = 4, cross_attention_dim: int = 16):
    """A tiny UNet2DConditionModel (seeded: the same weights every time) with latents of 4 channels; ``in_channels``
    9 is an inpainting UNet's (latents, mask, masked image latents)."""
    import diffusers

    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()


def stable_diffusion(prediction_type: str = "epsilon"):
    """SD 1.x/2.x: one CLIP text encoder, a cross-attention UNet, a VAE with factor 2, a DDIM scheduler."""
    import diffusers
    from transformers import CLIPTextModel

    tok = tokenizer()
    unet = cross_attention_unet(cross_attention_dim=32)
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(_clip_config(len(tok)))
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return diffusers.StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def stable_diffusion_xl():
    """SDXL: two CLIP text encoders (the second with projection: pooled embeddings), ``text_time`` added
    conditioning, an Euler scheduler."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok = tokenizer()
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80,  # 6 time ids * 8 + the pooled 32
        cross_attention_dim=64,  # the two encoders' hidden states side by side
        norm_num_groups=1,
    )
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(_clip_config(len(tok)))
    torch.manual_seed(2)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(len(tok)))
    scheduler = diffusers.EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    return diffusers.StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tok,
        tokenizer_2=tokenizer(),
        unet=unet,
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
    )


def stable_diffusion_3():
    """SD3: a flow-matching transformer, two CLIP encoders with projection, no T5 (optional, as diffusers allows),
    a VAE with a shift factor."""
    import diffusers
    from transformers import CLIPTextModelWithProjection

    tok = tokenizer()
    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    torch.manual_seed(1)
    text_encoder = CLIPTextModelWithProjection(_clip_config(len(tok)))
    torch.manual_seed(2)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(len(tok)))
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=text_encoder,
        tokenizer=tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )


PIPELINES = {"sd": stable_diffusion, "sdxl": stable_diffusion_xl, "sd3": stable_diffusion_3}


def write_pipelines(folder: str) -> dict[str, str]:
    """Writes every tiny pipeline under ``folder`` (one subfolder each); returns name -> folder."""
    out = {}
    for name, make in PIPELINES.items():
        path = os.path.join(folder, name)
        make().save_pretrained(path)
        out[name] = path
    return out


if __name__ == "__main__":
    for name, path in write_pipelines(sys.argv[1] if len(sys.argv) > 1 else "tiny-pipelines").items():
        print(name, path)
