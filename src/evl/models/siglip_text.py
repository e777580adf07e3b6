"""The SigLIP text encoder (SigLIP and SigLIP 2), with CLIP's parameter names where the parts are CLIP's.

The tower is CLIP's text transformer with three differences: its blocks attend both ways (no causal mask),
the sentence embedding is the output at the LAST position rather than at an end-of-text token, and the
projection is a ``head`` Linear with a bias. The blocks are CLIP's pre-norm blocks
(:class:`~evl.models.clip_vit.Transformer`) with a GELU-tanh MLP; :mod:`evl.weights.siglip_text` maps
Hugging Face checkpoints onto these names.
"""

from __future__ import annotations

import torch
from torch import nn

from evl.config import SigLIPTextConfig
from evl.models.clip_text import encode_tokens
from evl.models.clip_vit import Transformer
from evl.models.layers import LayerNorm


class SigLIPTextTransformer(nn.Module):
    """SigLIP's text encoder: token ids [N, L] -> sentence embeddings [N, output_dim].

    NOTE(ref): as Hugging Face's ``SiglipTextModel`` (and big_vision's ``pool_type="last"``), the last
    position is pooled whatever it holds: rows padded to the full context, as SigLIP was trained and as
    :func:`evl.text_tokenizers.load_tokenizer` pads them, end in padding unless the text fills the context.
    There is no attention mask; the padding is attended to, as in training.
    """

    def __init__(self, config: SigLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.width))
        self.transformer = Transformer(config)
        self.ln_final = LayerNorm(config.width, eps=config.layer_norm_eps)
        self.head = nn.Linear(config.width, config.output_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """NOTE(ref): Hugging Face's ``SiglipPreTrainedModel`` initialisation, from big_vision: embeddings
        normal with std width^-0.5, attention and MLP weights Xavier-uniform (q, k and v each on its own),
        MLP biases near zero; the head LeCun-normal (written here as normal with std width^-0.5)."""
        width = self.config.width
        nn.init.normal_(self.token_embedding.weight, std=width**-0.5)
        nn.init.normal_(self.positional_embedding, std=width**-0.5)
        with torch.no_grad():
            for block in self.transformer.resblocks:
                for part in block.attn.in_proj_weight.chunk(3):
                    nn.init.xavier_uniform_(part)
                nn.init.zeros_(block.attn.in_proj_bias)
                nn.init.xavier_uniform_(block.attn.out_proj.weight)
                for linear in (block.mlp.c_fc, block.mlp.c_proj):
                    nn.init.xavier_uniform_(linear.weight)
                    nn.init.normal_(linear.bias, std=1e-6)
        nn.init.normal_(self.head.weight, std=width**-0.5)
        nn.init.zeros_(self.head.bias)

    def forward_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [N, L] -> output tokens [N, L, width] after ``ln_final`` (both ways: no causal mask)."""
        return encode_tokens(self, token_ids, causal=False)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [N, L] -> embeddings [N, output_dim]: the last position's output through ``head``."""
        return self.head(self.forward_tokens(token_ids)[:, -1])
