"""A literal, unoptimised EVL forward written from the official code's description.

It reads the official key layout (``decoder.*``, ``proj.*``) and OpenAI visual names directly, uses a Linear
patch embedding, explicit softmax attention and the materialised relative-position table: deliberately a
different route to the same numbers. It is checked against the official fixture, then serves as the oracle
for shapes the fixture does not cover.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _ln(x, state, prefix):
    return F.layer_norm(x, x.shape[-1:], state[f"{prefix}.weight"], state[f"{prefix}.bias"], 1e-5)


def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def _softmax_attention(q, k, v):
    """q [N, H, Lq, D], k/v [N, H, Lk, D]."""
    scores = (q / q.shape[-1] ** 0.5) @ k.transpose(-2, -1)
    return scores.softmax(-1) @ v


def backbone(visual, video, heads, blocks):
    """video [B, 3, T, H, W] -> {block: (out [B,T,L,C], q [B,T,L,H,D], k)} for the requested blocks."""
    b, _, t, _, _ = video.shape
    x = video.permute(0, 2, 1, 3, 4).flatten(0, 1)
    w = visual["conv1.weight"]
    c, p = w.shape[0], w.shape[-1]
    patches = x.unfold(2, p, p).unfold(3, p, p)  # [N, 3, gh, gw, p, p]
    patches = patches.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)  # (C, pH, pW) order, row-major grid
    tokens = patches @ w.flatten(1).T
    cls = visual["class_embedding"].expand(tokens.shape[0], 1, c)
    x = _ln(torch.cat([cls, tokens], 1) + visual["positional_embedding"], visual, "ln_pre")
    n, length, _ = x.shape
    d = c // heads
    out = {}
    for i in range(max(blocks) + 1):
        pre = f"transformer.resblocks.{i}"
        h = _ln(x, visual, f"{pre}.ln_1")
        qkv = h @ visual[f"{pre}.attn.in_proj_weight"].T + visual[f"{pre}.attn.in_proj_bias"]
        q, k, v = (z.view(n, length, heads, d) for z in qkv.split(c, -1))
        a = _softmax_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        a = a.transpose(1, 2).reshape(n, length, c)
        x = x + a @ visual[f"{pre}.attn.out_proj.weight"].T + visual[f"{pre}.attn.out_proj.bias"]
        h = _ln(x, visual, f"{pre}.ln_2")
        h = _quick_gelu(h @ visual[f"{pre}.mlp.c_fc.weight"].T + visual[f"{pre}.mlp.c_fc.bias"])
        x = x + h @ visual[f"{pre}.mlp.c_proj.weight"].T + visual[f"{pre}.mlp.c_proj.bias"]
        if i in blocks:
            out[i] = tuple(z.reshape(b, t, *z.shape[1:]) for z in (x, q, k))
    return out


def _cross_term(q, k, table, grid):
    """q, k [B, T', P, H, D] -> [B, T', P, C] with the table gathered per (query, key) pair."""
    gh, gw = grid
    rows = torch.arange(gh * gw) // gw
    cols = torch.arange(gh * gw) % gw
    idx = (rows[:, None] - rows[None, :] + gh - 1) * (2 * gw - 1) + (cols[:, None] - cols[None, :] + gw - 1)
    d = q.shape[-1]
    scores = (q.transpose(2, 3) / d**0.5) @ k.transpose(2, 3).transpose(-2, -1)
    attn = scores.softmax(-1).mean(2)  # [B, T', P, P]
    return torch.einsum("btqk,qkc->btqc", attn, table[idx])


def evl_logits(visual, official, video, backbone_heads, decoder_heads, grid):
    """Official-layout decoder state (``decoder.*``, ``proj.*``; no ``module.``) -> logits [B, classes]."""
    layers = sorted({int(k.split(".")[2]) for k in official if k.startswith("decoder.decoder_layers.")})
    num_blocks = len({k.split(".")[2] for k in visual if k.startswith("transformer.resblocks.")})
    blocks = [num_blocks - len(layers) + i for i in layers]
    feats = backbone(visual, video, backbone_heads, blocks)
    b = video.shape[0]
    query = official["decoder.cls_token"].expand(b, 1, -1)
    for i in layers:
        f, q, k = feats[blocks[i]]
        _, t, length, c = f.shape
        m = f
        if f"decoder.temporal_conv.{i}.weight" in official:
            conv = F.conv1d(
                f.permute(0, 2, 3, 1).flatten(0, 1),
                official[f"decoder.temporal_conv.{i}.weight"],
                official[f"decoder.temporal_conv.{i}.bias"],
                padding=1,
                groups=c,
            )
            m = m + conv.view(b, length, c, t).permute(0, 3, 1, 2)
        if f"decoder.temporal_pos_embed.{i}" in official:
            m = m + official[f"decoder.temporal_pos_embed.{i}"][None, :, None, :]
        if f"decoder.cross_attention.{i}.w1" in official:
            x = torch.zeros_like(f)
            qp, kp = q[:, :, 1:], k[:, :, 1:]
            x[:, 1:, 1:] += _cross_term(
                qp[:, 1:], kp[:, :-1], official[f"decoder.cross_attention.{i}.w1"], grid
            )
            x[:, :-1, 1:] += _cross_term(
                qp[:, :-1], kp[:, 1:], official[f"decoder.cross_attention.{i}.w2"], grid
            )
            m = m + x
        mem = m.flatten(1, 2)
        pre = f"decoder.decoder_layers.{i}"

        def lin(z, name, pre=pre):
            return z @ official[f"{pre}.{name}.weight"].T + official[f"{pre}.{name}.bias"]

        hq, hm = _ln(query, official, f"{pre}.norm1"), _ln(mem, official, f"{pre}.norm3")
        dh = c // decoder_heads

        def split(z, dh=dh):
            return z.view(b, -1, decoder_heads, dh).transpose(1, 2)

        a = _softmax_attention(
            split(lin(hq, "attn.q_proj")), split(lin(hm, "attn.k_proj")), split(lin(hm, "attn.v_proj"))
        )
        query = query + lin(a.transpose(1, 2).reshape(b, 1, c), "attn.out_proj")
        h = _quick_gelu(lin(_ln(query, official, f"{pre}.norm2"), "mlp.fc1"))
        query = query + lin(h, "mlp.fc2")
    x = _ln(query[:, 0], official, "proj.0")
    return x @ official["proj.2.weight"].T + official["proj.2.bias"]
