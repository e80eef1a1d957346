"""`blt`: the Byte Latent Transformer (Pagnoni et al. 2024, "Byte Latent Transformer: Patches
Scale Better Than Tokens", arXiv 2412.09871) — a model over raw bytes (a `data.tokenizer: bytes`
dataset) that groups them into patches and runs its large transformer once per patch.

- **Patching** (`patching`): `static` — a patch every `patch_size` bytes (the baseline the paper
  compares against); `entropy` — a patch starts at byte t when a small frozen byte LM (`entropy`,
  trained first and loaded by the job from `entropy_model`) is unsure of byte t: its next-byte
  entropy at t−1 is above `entropy_threshold` (the paper's global threshold); `monotonic` — when
  that entropy rose by more than the threshold since t−2 (its approximate monotonic constraint).
  The boundary at t depends on bytes before t only, so the same rule patches a training row and a
  byte stream while sampling; patches restart at every document.
- **Local encoder**: byte embeddings plus hash n-gram embeddings (n in `ngram_sizes`, each a
  polynomial hash of the n bytes ending here into `ngram_buckets` rows of its own table; an n-gram
  reaching before its document's start adds nothing), then `encoder_layers` causal byte blocks of
  width `local_d_model`. Each patch is pooled by cross-attention: a query made from the mean of
  its bytes' states attends to those bytes, and the result is projected to the latent width.
- **Latent transformer**: `n_layers` blocks of width `d_model` over the patches. Its input at
  patch j is patch j−1's pooled vector (a learned start vector for a document's first patch), so
  its output at j has seen only whole patches before j — what every byte of patch j may use.
- **Local decoder**: each byte's encoder state plus the projected latent output of its patch
  (cross-attention to that one patch vector is exactly a linear map of it: the paper's decoder
  cross-attention with one key), then `decoder_layers` causal byte blocks, the final norm and the
  head over the byte vocabulary.

Decoding (`BLTCache`): every byte runs the entropy model, the encoder and the decoder one step on
their own KV caches; the latent transformer runs (one step on a third cache) only for the rows
where the patcher starts a patch. Not built: the paper's cross-attention in every encoder/decoder
layer (one pooling and one read here), its patch-size-bounded latent compute under compile (the
patch count is read on the host, so shapes vary with the data), FlexAttention, tensor/expert
parallel and export to transformers (refused by name).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import Documents, init_linear
from models.cache import KVCache
from models.common import rope_tables
from models.decoder import Block, Decoder, DecoderConfig, _opt, make_norm, unused_fields
from models.llama import LlamaConfig
from models.loss import capped_logits, linear_cross_entropy, token_losses, whole

# DecoderConfig fields the byte model does not read: refused unless at their defaults.
_NOT_BLT = (
    "attention",
    "positions",
    "window",
    "global_every",
    "kv_share_group",
    "value_residual",
    "value_embeds",
    "embed_skip",
    "unet_skips",
    "bias",
    "memory_layers",
    "long_memory",
    "long_memory_layers",
    "moe_experts",
    "continuous_thoughts",
    "quiet_star_thoughts",
)
_HASH_BASE, _HASH_MOD = 257, 2_147_483_647  # a polynomial hash of byte ids, mod a prime


@dataclass
class BLTConfig(DecoderConfig):
    name: Literal["blt"] = "blt"
    local_d_model: int = _opt(96, "Width of the byte-level encoder and decoder.")
    local_heads: int = _opt(4, "Attention heads of the byte-level blocks.")
    encoder_layers: int = _opt(1, "Byte-level blocks before pooling into patches.")
    decoder_layers: int = _opt(2, "Byte-level blocks after the latent transformer.")
    local_window: int | None = _opt(256, "Sliding window of the byte-level blocks' attention; null: whole rows.")
    ngram_sizes: tuple[int, ...] = _opt((3, 4, 5, 6, 7, 8), "Byte n-grams whose hash embeddings each byte adds.")
    ngram_buckets: int = _opt(4096, "Rows of each n-gram size's hash table.")
    patching: Literal["static", "entropy", "monotonic"] = _opt(
        "entropy",
        "static: a patch every patch_size bytes; entropy: a patch starts where the entropy model's next-byte "
        "entropy exceeds entropy_threshold; monotonic: where it rose by more than entropy_threshold.",
    )
    patch_size: int = _opt(4, "static: bytes per patch; entropy/monotonic: the mean assumed by the FLOP count.")
    patch_pad: int = _opt(
        8, "Round each batch's patch count up to a multiple of this (fewer shapes for torch.compile)."
    )
    entropy_threshold: float = _opt(1.5, "entropy/monotonic: the threshold, in nats.")
    entropy_model: str | None = _opt(
        None,
        "entropy/monotonic: the trained byte LM that patches (models:/NAME/VERSION, runs:/ID or an export); "
        "the training job loads it into the frozen `entropy` submodule. Its shape must be the entropy_* fields'.",
    )
    entropy_layers: int = _opt(2, "Layers of the entropy model (a llama over bytes).")
    entropy_d_model: int = _opt(64, "Width of the entropy model.")
    entropy_heads: int = _opt(2, "Attention heads of the entropy model.")

    def __post_init__(self):
        super().__post_init__()
        changed = unused_fields(self, _NOT_BLT)
        if changed:
            raise ValueError(f"model.name='blt' does not use {', '.join(changed)}")
        for name in ("local_d_model", "local_heads", "ngram_buckets", "patch_size", "patch_pad", "entropy_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.encoder_layers < 0 or self.decoder_layers < 0:
            raise ValueError("encoder_layers and decoder_layers must be >= 0")
        if self.local_d_model % self.local_heads or (self.local_d_model // self.local_heads) % 2:
            raise ValueError(f"local_heads={self.local_heads} must divide local_d_model into even head sizes")
        if self.local_window is not None and self.local_window <= 0:
            raise ValueError(f"local_window must be positive or null, got {self.local_window}")
        if any(n < 2 for n in self.ngram_sizes) or len(set(self.ngram_sizes)) != len(self.ngram_sizes):
            raise ValueError(f"ngram_sizes must be distinct sizes >= 2, got {list(self.ngram_sizes)}")
        if self.patching == "static" and self.entropy_model is not None:
            raise ValueError("entropy_model is for patching: entropy or monotonic, not static")
        if self.patching == "entropy" and self.entropy_threshold <= 0:
            raise ValueError(f"entropy_threshold must be positive, got {self.entropy_threshold}")

    def tied_keys(self) -> list[str]:
        entropy = [f"entropy.{k}" for k in self.entropy_config().tied_keys()] if self.patching != "static" else []
        return super().tied_keys() + entropy

    def entropy_config(self) -> LlamaConfig:
        """The entropy model's config: a llama over the same bytes (what `entropy_model` must be)."""
        return LlamaConfig(
            vocab_size=self.vocab_size,
            max_seq_len=self.max_seq_len,
            n_layers=self.entropy_layers,
            n_heads=self.entropy_heads,
            d_model=self.entropy_d_model,
            tie_embeddings=True,
        )

    def part_config(self, part: str) -> DecoderConfig:
        """The config of the blocks of `part` (encoder, latent, decoder): the model's norm, MLP,
        QK-norm and init at that part's width."""
        latent = part == "latent"
        return DecoderConfig(
            vocab_size=self.vocab_size,
            max_seq_len=self.max_seq_len,
            n_layers=max(1, {"encoder": self.encoder_layers, "latent": self.n_layers}.get(part, self.decoder_layers)),
            n_heads=self.n_heads if latent else self.local_heads,
            n_kv_heads=self.n_kv_heads if latent else None,
            d_model=self.d_model if latent else self.local_d_model,
            ffn_hidden=self.ffn_hidden if latent else None,
            norm=self.norm,
            mlp=self.mlp,
            qk_norm=self.qk_norm,
            rope_theta=self.rope_theta,
            norm_eps=self.norm_eps,
            init_std=self.init_std,
            window=None if latent else self.local_window,
        )


def ngram_hashes(ids: torch.Tensor, doc_pos: torch.Tensor, sizes: tuple[int, ...], buckets: int) -> torch.Tensor:
    """ids (B, T) → rows (B, T, len(sizes)) of the n-gram tables (table i's rows offset by i·buckets):
    the polynomial hash of the n bytes ending at each position; −1 where the n-gram reaches before
    the document's start (`doc_pos` (B, T): each byte's position in its document)."""
    rows, h = [], torch.zeros_like(ids)
    for i in range(max(sizes)):
        back = F.pad(ids, (i, 0))[:, : ids.shape[1]]  # the byte i positions back (0 before the row)
        h = (h + back * pow(_HASH_BASE, i, _HASH_MOD)) % _HASH_MOD
        n = i + 1
        if n in sizes:
            k = sizes.index(n)
            rows.append(torch.where(doc_pos >= n - 1, h % buckets + k * buckets, -1))
    return torch.stack(rows, dim=-1)


def entropies(logits: torch.Tensor) -> torch.Tensor:
    """logits (..., V) → the entropy (...) of each next-byte distribution, in nats (fp32)."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def patch_starts(cfg: BLTConfig, doc_pos: torch.Tensor, ent: torch.Tensor | None) -> torch.Tensor:
    """(B, T) bool: the bytes that start a patch. `ent` (B, T): the entropy model's entropy at each
    position (of the byte after it); the boundary at t reads positions t−1 and t−2 only."""
    first = doc_pos == 0
    if cfg.patching == "static":
        return doc_pos % cfg.patch_size == 0
    prev = F.pad(ent, (1, 0))[:, :-1]  # entropy at t−1: how unsure the model was of byte t
    if cfg.patching == "entropy":
        return first | (prev > cfg.entropy_threshold)
    before = torch.where(doc_pos >= 2, F.pad(ent, (2, 0))[:, : ent.shape[1]], prev)
    return first | (prev - before > cfg.entropy_threshold)


class PatchPooling(nn.Module):
    """Cross-attention pooling: each patch's query (from the mean of its bytes' states) attends to
    its bytes; the result plus the mean, projected to the latent width."""

    def __init__(self, cfg: BLTConfig):
        super().__init__()
        dl = cfg.local_d_model
        self.n_heads = cfg.local_heads
        self.norm = make_norm(cfg.part_config("encoder"))
        self.q_proj = nn.Linear(dl, dl, bias=False)
        self.k_proj = nn.Linear(dl, dl, bias=False)
        self.v_proj = nn.Linear(dl, dl, bias=False)
        self.o_proj = nn.Linear(dl, dl, bias=False)
        self.to_latent = nn.Linear(dl, cfg.d_model, bias=False)

    def init_weights(self, std: float, residual_std: float) -> None:
        self.norm.reset_parameters()
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.to_latent):
            init_linear(linear, std)
        init_linear(self.o_proj, residual_std)

    def forward(self, h: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
        """h (B, T, dl), member (B, P, T) bool (byte t belongs to patch p) → (B, P, d_model). A
        patch without bytes (padding) reads byte 0: its output is never used."""
        B, T, dl = h.shape
        P, H = member.shape[1], self.n_heads
        counts = member.sum(-1, keepdim=True)
        mean = (member.to(h.dtype) @ h) / counts.clamp_min(1).to(h.dtype)
        member = member | ((counts == 0) & (torch.arange(T, device=h.device) == 0))
        hn = self.norm(h)
        q = self.q_proj(self.norm(mean)).view(B, P, H, -1).transpose(1, 2)
        k = self.k_proj(hn).view(B, T, H, -1).transpose(1, 2)
        v = self.v_proj(hn).view(B, T, H, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=member[:, None])
        return self.to_latent(mean + self.o_proj(y.transpose(1, 2).reshape(B, P, dl)))


class BLT(nn.Module):
    """The byte model: `blocks` holds the encoder's, the latent transformer's and the decoder's
    blocks in that order (what activation checkpointing, regional compile and FSDP2 wrap)."""

    one_stream = False  # the interp tools that follow one residual stream refuse it

    def __init__(self, cfg: BLTConfig):
        super().__init__()
        self.cfg = cfg
        dl = cfg.local_d_model
        self.embed = nn.Embedding(cfg.vocab_size, dl)
        self.ngram_embed = nn.Embedding(len(cfg.ngram_sizes) * cfg.ngram_buckets, dl)
        parts = {part: cfg.part_config(part) for part in ("encoder", "latent", "decoder")}
        count = {"encoder": cfg.encoder_layers, "latent": cfg.n_layers, "decoder": cfg.decoder_layers}
        self.blocks = nn.ModuleList(Block(parts[p], i) for p in parts for i in range(count[p]))
        n_enc, n_lat = cfg.encoder_layers, cfg.n_layers
        self.ranges = {"encoder": (0, n_enc), "latent": (n_enc, n_enc + n_lat), "decoder": (n_enc + n_lat, None)}
        self.pool = PatchPooling(cfg)
        self.latent_start = nn.Parameter(torch.empty(cfg.d_model))
        self.latent_norm = make_norm(parts["latent"])
        self.latent_out = nn.Linear(cfg.d_model, dl, bias=False)
        self.final_norm = make_norm(parts["decoder"])
        self.head = nn.Linear(dl, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.entropy = None
        if cfg.patching != "static":
            self.entropy = Decoder(cfg.entropy_config())
            self.entropy.requires_grad_(False)  # frozen: the job loads the trained one (entropy_model)
        self.reset_rope()
        self.init_weights()
        self.bytes_per_patch = torch.zeros(())  # of the last training forward (logged)

    # -- structure ---------------------------------------------------------------------------

    def part(self, name: str) -> nn.ModuleList:
        start, stop = self.ranges[name]
        return self.blocks[start:stop]

    def layer_modules(self) -> nn.Module:
        return self.blocks

    def reset_rope(self) -> None:
        """RoPE tables of the byte blocks and of the latent blocks (buffers checkpoints do not hold)."""
        cfg, device = self.cfg, self.embed.weight.device
        for prefix, head_dim in (("local", cfg.local_d_model // cfg.local_heads), ("latent", cfg.head_dim)):
            cos, sin = rope_tables(head_dim, cfg.max_seq_len, cfg.rope_theta)
            self.register_buffer(f"{prefix}_cos", cos.to(device), persistent=False)
            self.register_buffer(f"{prefix}_sin", sin.to(device), persistent=False)
        if self.entropy is not None:
            self.entropy.reset_rope()

    def init_weights(self) -> None:
        std = self.cfg.init_std
        for name in ("encoder", "latent", "decoder"):
            residual_std = 0.0 if self.cfg.zero_init else std / math.sqrt(2 * max(1, len(self.part(name))))
            for block in self.part(name):
                block.init_weights(std, residual_std)
        nn.init.normal_(self.embed.weight, mean=0.0, std=std)
        nn.init.normal_(self.ngram_embed.weight, mean=0.0, std=std)
        self.pool.init_weights(std, std / math.sqrt(2))
        nn.init.normal_(self.latent_start, mean=0.0, std=std)
        self.latent_norm.reset_parameters()
        init_linear(self.latent_out, std)
        self.final_norm.reset_parameters()
        if not self.cfg.tie_embeddings:
            init_linear(self.head, 0.0 if self.cfg.zero_init else std)

    # -- the forward ---------------------------------------------------------------------------

    def forward(
        self,
        idx: torch.Tensor,
        cache: BLTCache | None = None,
        last_only: bool = False,
        keep: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        loss_chunk: int = 0,
        docs: torch.Tensor | None = None,
        select=None,
        per_token: bool = False,
        thoughts=None,
        hidden: bool = False,
        layout=None,
    ) -> torch.Tensor:
        """As `models.decoder.Decoder.forward` over byte ids, for the arguments a byte model takes
        (`select`, `thoughts` and `layout` are refused)."""
        if select is not None or thoughts is not None or layout is not None:
            raise ValueError("model.name='blt' does not take token selection, thoughts or explicit layouts")
        B, T = idx.shape
        if cache is not None:
            if docs is not None:
                raise ValueError("docs (document masks) are for whole packed rows, not decoding with a cache")
            x = torch.cat([self._step(idx[:, t], cache) for t in range(T)], dim=1)
        else:
            if T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {T} bytes exceeds max_seq_len={self.cfg.max_seq_len}")
            x = self._whole(idx, docs)
        if targets is not None:
            x = self.final_norm(x).flatten(0, -2)
            if per_token:
                return token_losses(x, whole(self.head.weight), targets.flatten(), None, loss_chunk).view(B, T)
            return linear_cross_entropy(x, self.head.weight, targets.flatten(), None, loss_chunk)
        if last_only:
            x = x[:, -1:]
        elif keep is not None:
            x = x[keep]
        return self.final_norm(x) if hidden else self.unembed(x)

    def _whole(self, idx: torch.Tensor, docs: torch.Tensor | None) -> torch.Tensor:
        """Whole rows (B, T) → the decoder's output (B, T, dl)."""
        B, T = idx.shape
        documents = Documents.of(docs) if docs is not None else None
        doc_pos = documents.pos if documents is not None else torch.arange(T, device=idx.device).expand(B, T)
        ent = None
        if self.entropy is not None:
            with torch.no_grad():
                ent = entropies(self.entropy(idx, docs=docs))
        starts = patch_starts(self.cfg, doc_pos, ent)
        pid = starts.long().cumsum(1) - 1  # (B, T): each byte's patch
        P = int(pid[:, -1].max()) + 1  # (the one host sync of a training step)
        P = min(-(-P // self.cfg.patch_pad) * self.cfg.patch_pad, T)  # padding patches: never read
        if self.training:
            self.bytes_per_patch = (B * T / (pid[:, -1] + 1).sum()).detach()
        h = self._run("encoder", self._embed(idx, doc_pos), documents, doc_pos)
        member = pid[:, None, :] == torch.arange(P, device=idx.device)[None, :, None]  # (B, P, T)
        pooled = self.pool(h, member)
        # each patch's first byte: its document, and whether it starts the document
        first = torch.zeros(B, P, dtype=torch.long, device=idx.device)
        first.scatter_reduce_(1, pid, torch.arange(T, device=idx.device).expand(B, T), "amin", include_self=False)
        real = torch.arange(P, device=idx.device) <= pid[:, -1:]
        patch_doc = None
        if documents is not None:
            patch_doc = torch.where(real, documents.ids.gather(1, first), documents.ids[:, -1:] + 1)
        opens = (doc_pos.gather(1, first) == 0) & real
        inputs = torch.where(opens[..., None], self.latent_start.to(pooled.dtype), F.pad(pooled, (0, 0, 1, 0))[:, :P])
        latent_docs = Documents.of(patch_doc) if patch_doc is not None else None
        latent_pos = latent_docs.pos if latent_docs is not None else torch.arange(P, device=idx.device).expand(B, P)
        out = self._run("latent", inputs, latent_docs, latent_pos)
        up = self.latent_out(self.latent_norm(out))  # (B, P, dl)
        x = h + up.gather(1, pid[..., None].expand(-1, -1, up.shape[-1]))
        return self._run("decoder", x, documents, doc_pos)

    def _embed(self, idx: torch.Tensor, doc_pos: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        rows = ngram_hashes(idx, doc_pos, cfg.ngram_sizes, cfg.ngram_buckets)
        grams = self.ngram_embed(rows.clamp_min(0)) * (rows >= 0)[..., None]
        return self.embed(idx) + grams.sum(2)

    def _rope(self, name: str, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prefix = "latent" if name == "latent" else "local"
        return getattr(self, f"{prefix}_cos")[pos], getattr(self, f"{prefix}_sin")[pos]

    def _run(self, name, x, documents, pos, cache: KVCache | None = None) -> torch.Tensor:
        rope = self._rope(name, pos)
        for block in self.part(name):
            x, _ = block(x, rope, cache, None, pos if cache is not None else None, documents)
        if cache is not None:
            cache.advance(x.shape[1])
        return x

    # -- decoding --------------------------------------------------------------------------------

    def new_cache(self, batch: int, capacity: int | None = None, dtype: torch.dtype | None = None) -> BLTCache:
        return BLTCache(self, batch, capacity, dtype)

    def _step(self, byte: torch.Tensor, cache: BLTCache) -> torch.Tensor:
        """One byte per row of the cache's view (b,) → the decoder's output (b, 1, dl)."""
        rows, s = cache.rows(), cache.state
        pos = cache.encoder.positions(1)[:, 0]  # (b,): the byte's position (the encoder's length)
        ent = s.entropy[rows]  # (b, 2): the entropies at t−1 and t−2
        doc_pos = pos[:, None]
        # the rule over positions t−2, t−1, t (what it reads of t−2 and t−1), for byte t
        history = torch.stack([ent[:, 1], ent[:, 0], ent[:, 0]], dim=1)
        starts = patch_starts(self.cfg, pos[:, None] + torch.arange(-2, 1, device=pos.device), history)[:, 2]
        s.ids[rows, pos] = byte
        window = max(self.cfg.ngram_sizes)
        back = (pos[:, None] - torch.arange(window - 1, -1, -1, device=pos.device)).clamp_min(0)  # (b, window)
        recent = s.ids[rows[:, None], back]
        recent_pos = pos[:, None] - torch.arange(window - 1, -1, -1, device=pos.device)
        x = self._embed(recent, recent_pos)[:, -1:]
        h = self._run("encoder", x, None, doc_pos, cache.encoder)
        opening = starts.nonzero().flatten()
        if len(opening):
            self._next_patch(cache, opening, rows, int(pos[opening].max()))
        s.states[rows, pos] = h[:, 0].to(s.states.dtype)
        s.pid[rows, pos] = s.patches[rows] - 1
        x = self._run("decoder", h + s.up[rows][:, None].to(h.dtype), None, doc_pos, cache.decoder)
        if self.entropy is not None:
            e = entropies(self.entropy(byte[:, None], cache.entropy)[:, 0])
            s.entropy[rows] = torch.stack([e, ent[:, 0]], dim=1)
        return x

    def _next_patch(self, cache: BLTCache, opening: torch.Tensor, rows: torch.Tensor, span: int) -> None:
        """The rows at `opening` (indices into the view's rows) start a patch: the one they close is
        pooled and the latent transformer takes it (a document's first patch: the start vector).
        `span`: the bytes the longest of them held before this one."""
        s = cache.state
        sub = rows[opening]
        member = (s.pid[sub, :span] == (s.patches[sub] - 1)[:, None]) & (s.patches[sub] > 0)[:, None]
        inputs = self.latent_start.expand(len(sub), -1).to(s.states.dtype)
        if span:
            pooled = self.pool(s.states[sub, :span], member[:, None])[:, 0]
            inputs = torch.where((s.patches[sub] > 0)[:, None], pooled, inputs)
        view = cache.latent.view([cache.host_rows[i] for i in opening.tolist()])
        view.reserve(1)
        out = self._run("latent", inputs[:, None], None, view.positions(1), view)
        s.up[sub] = self.latent_out(self.latent_norm(out))[:, 0].to(s.up.dtype)
        s.patches[sub] += 1

    # -- what the platform reads -----------------------------------------------------------------

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        return capped_logits(self.final_norm(x), whole(self.head.weight), None)

    def logits_of(self, hidden: torch.Tensor) -> torch.Tensor:
        return capped_logits(hidden, whole(self.head.weight), None)

    def aux_loss(self) -> torch.Tensor | None:
        return None

    def after_optimizer_step(self, keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"bytes_per_patch": self.bytes_per_patch}

    def num_params(self, embeddings: bool = True, active: bool = False) -> int:
        """Trained parameters (the frozen entropy model is not counted; `entropy_params` is it);
        without embeddings: less the byte and n-gram tables (a tied head counted back). All
        parameters are active."""
        n = sum(p.numel() for name, p in self.named_parameters() if not name.startswith("entropy."))
        if not embeddings:
            n -= self.embed.weight.numel() + self.ngram_embed.weight.numel()
            if self.cfg.tie_embeddings:
                n += self.head.weight.numel()
        return n

    def entropy_params(self) -> int:
        return sum(p.numel() for p in self.entropy.parameters()) if self.entropy is not None else 0

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per byte: 6 per weight of the byte-level parts (encoder, pooling read per
        byte, decoder, head) per byte and of the latent ones per patch (patch_size bytes on average,
        the static stride or the assumed mean), attention scores at each part's length, and the
        frozen entropy model's forward (2 per weight)."""
        cfg = self.cfg
        latent = sum(p.numel() for p in self.part("latent").parameters())
        latent += self.latent_out.weight.numel() + self.pool.to_latent.weight.numel() + cfg.d_model
        local = self.num_params(embeddings=False) - latent
        local_span = min(seq_len, cfg.local_window or seq_len)
        per_byte = 6 * local + 12 * (cfg.encoder_layers + cfg.decoder_layers) * cfg.local_d_model * local_span
        per_patch = 6 * latent + 12 * cfg.n_layers * cfg.d_model * (seq_len // cfg.patch_size)
        return int(per_byte + per_patch / cfg.patch_size + 2 * self.entropy_params())


class BLTCache:
    """The decoding state of a batch of byte rows: KV caches of the entropy model, the encoder,
    the latent transformer (one entry per patch) and the decoder, and per row its bytes, their
    encoder states and patches (what pooling a finished patch reads), the latent output of its
    current patch and its last two entropies. `view`, `reset`, `reserve`, `lengths` and
    `host_lengths` as `models.cache.KVCache`'s (the engine's interface)."""

    def __init__(self, model: BLT, batch: int, capacity: int | None = None, dtype: torch.dtype | None = None):
        cfg = model.cfg
        self.capacity = min(capacity or cfg.max_seq_len, cfg.max_seq_len)
        device = model.embed.weight.device
        dtype = dtype or model.embed.weight.dtype

        def part(name: str) -> KVCache:
            blocks = model.part(name)
            return KVCache(SimpleNamespace(cfg=cfg, blocks=blocks, embed=model.embed), batch, self.capacity, dtype)

        self.encoder, self.latent, self.decoder = part("encoder"), part("latent"), part("decoder")
        self.entropy = KVCache(model.entropy, batch, self.capacity, dtype) if model.entropy is not None else None
        cap, dl = self.capacity, cfg.local_d_model
        self.state = SimpleNamespace(
            ids=torch.zeros(batch, cap, dtype=torch.long, device=device),
            states=torch.zeros(batch, cap, dl, dtype=dtype, device=device),
            pid=torch.full((batch, cap), -1, dtype=torch.long, device=device),
            patches=torch.zeros(batch, dtype=torch.long, device=device),
            up=torch.zeros(batch, dl, dtype=dtype, device=device),
            entropy=torch.zeros(batch, 2, device=device),
        )
        self.batch = batch
        self.host_rows = list(range(batch))
        self._all = torch.arange(batch, device=device)
        self._rows: torch.Tensor | None = None

    def _caches(self) -> list[KVCache]:
        return [c for c in (self.encoder, self.latent, self.decoder, self.entropy) if c is not None]

    @property
    def trim(self) -> bool:
        return self.encoder.trim

    @trim.setter
    def trim(self, value: bool) -> None:
        for c in self._caches():
            c.trim = value

    @property
    def lengths(self) -> torch.Tensor:
        """The bytes each row holds: the encoder cache's count (every byte passes through it)."""
        return self.encoder.lengths

    @property
    def host_lengths(self) -> list[int]:
        return self.encoder.host_lengths

    def rows(self) -> torch.Tensor:
        return self._all if self._rows is None else self._rows

    def view(self, rows) -> BLTCache:
        view = object.__new__(BLTCache)
        view.__dict__.update(self.__dict__)
        view.host_rows = list(rows)
        view._rows = torch.tensor(view.host_rows, dtype=torch.long, device=self._all.device)
        view.encoder, view.decoder = self.encoder.view(rows), self.decoder.view(rows)
        view.entropy = self.entropy.view(rows) if self.entropy is not None else None
        return view

    def reset(self, rows) -> None:
        for c in self._caches():
            c.reset(rows)
        index = torch.tensor(list(rows), dtype=torch.long, device=self._all.device)
        s = self.state
        s.patches[index], s.pid[index], s.entropy[index] = 0, -1, 0.0

    def reserve(self, T: int) -> None:
        """As KVCache.reserve (the encoder's checks the capacity before any cache counts); the latent
        cache reserves a step per patch as the model starts one."""
        for c in (self.encoder, self.decoder, self.entropy):
            if c is not None:
                c.reserve(T)

    def rollback(self, lengths) -> None:
        raise ValueError("a byte model's cache cannot roll back (its patches and latent steps are not undone)")

    def nbytes(self) -> int:
        s = self.state
        own = sum(t.numel() * t.element_size() for t in vars(s).values())
        return own + sum(c.nbytes() for c in self._caches())
