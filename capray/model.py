"""Show, Attend and Tell: Bahdanau attention over image regions and a recurrent decoder.

Architecture only: no IO, no Ray, no training loop. The encoder (a frozen CNN) lives in
``capray.encoders``; this file starts from its region features.

Shape legend:
    B batch (images)   P image regions   E encoder channels   R projected region dim
    A attention dim    D decoder hidden  M word embedding     V vocabulary   T tokens   K beam
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from capray.errors import ConfigError

DECODER_KINDS = ("gru", "lstm")
POSITIONS = ("grid", "learned")
END_CHECK_EVERY = 4
"""Beam search asks whether every beam has ended every this many steps (a host sync on a GPU)."""


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    """V: number of words, specials included (``<pad>`` is id 0)."""
    feature_dim: int
    """E: channels of the encoder's region features (taken from the encoder, never hard-coded)."""
    kind: str = "gru"
    """``gru``: the TensorFlow tutorial's decoder; ``lstm``: the paper's, with the sigmoid gate on the context."""
    embed_dim: int = 256
    """M: word embedding size (the seed's 256)."""
    hidden_dim: int = 512
    """D: recurrent state size (the seed's 512 units)."""
    projection_dim: int = 256
    """R: regions are projected to this size by a dense layer + ReLU (the seed's CNN_Encoder)."""
    attention_dim: int = 512
    """A: Bahdanau attention's hidden size (the seed uses the decoder's units)."""
    dropout: float = 0.0
    """Dropout before the output layer (the paper uses 0.5 on COCO; the seed none)."""
    num_regions: int = 0
    """P, for where each region lies, added to the projected regions: what the features themselves only
    hint at (relations: "left of", "above"). 0: none (the seed's, and checkpoints from before)."""
    positions: str = "learned"
    """How a region's place enters, with ``num_regions``: ``grid``, a learned linear map of its (x, y) on
    the √P × √P grid (2 numbers per channel: "left of" is the same comparison anywhere in the image);
    ``learned``, a free embedding per region (P numbers per channel, each learned from the images that
    have something there; checkpoints from before ``grid`` existed)."""
    start_id: int = 1
    """Id of ``<start>``."""
    end_id: int = 2
    """Id of ``<end>``."""

    def __post_init__(self):
        if self.kind not in DECODER_KINDS:
            raise ValueError(f"decoder must be one of {', '.join(DECODER_KINDS)}, got {self.kind!r}")
        for name in ("vocab_size", "feature_dim", "embed_dim", "hidden_dim", "projection_dim", "attention_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_regions < 0:
            raise ValueError(f"num_regions must be 0 (no position embedding) or positive, got {self.num_regions}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(POSITIONS)}, got {self.positions!r}")
        if self.num_regions and self.positions == "grid" and math.isqrt(self.num_regions) ** 2 != self.num_regions:
            raise ValueError(f"positions 'grid' needs a square grid of regions, got {self.num_regions}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Decoded:
    """What greedy and beam search return for a batch of images."""

    tokens: torch.Tensor
    """(B, T) word ids, ``<end>`` included, padded with 0 after it."""
    scores: torch.Tensor
    """(B,) mean log-probability per token (``<end>`` counted) of each chosen caption."""
    attention: torch.Tensor | None
    """(B, T, P) attention over regions for each emitted word (None from ``beam_search(attention=False)``)."""
    lengths: torch.Tensor
    """(B,) number of emitted tokens, ``<end>`` included."""


class Attention(nn.Module):
    """Bahdanau (additive) attention: score_i = v · tanh(W1 r_i + W2 h)."""

    def __init__(self, region_dim: int, hidden_dim: int, attention_dim: int):
        super().__init__()
        self.w_regions = nn.Linear(region_dim, attention_dim)
        self.w_hidden = nn.Linear(hidden_dim, attention_dim)
        self.v = nn.Linear(attention_dim, 1, bias=False)  # a bias would cancel in the softmax

    def keys(self, regions: torch.Tensor) -> torch.Tensor:
        """W1 r_i, computed once per image rather than once per word."""
        return self.w_regions(regions)  # (B, P, A)

    def forward(self, keys: torch.Tensor, regions: torch.Tensor, hidden: torch.Tensor):
        # The (B, P, A) sum is the largest tensor of a decoding step: tanh in place saves a pass over it.
        scores = self.v((keys + self.w_hidden(hidden).unsqueeze(1)).tanh_()).squeeze(2)  # (B, P)
        alpha = scores.softmax(dim=1)  # (B, P)
        context = torch.bmm(alpha.unsqueeze(1), regions).squeeze(1)  # (B, R)
        return context, alpha


class Decoder(nn.Module):
    """Attention decoder over region features; ``forward`` is teacher-forced, the searches are not."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = c = config
        # Per-channel feature standardisation, set from train-split statistics by training and
        # saved in the checkpoint so captioning applies exactly what training saw.
        self.register_buffer("feature_mean", torch.zeros(c.feature_dim))
        self.register_buffer("feature_std", torch.ones(c.feature_dim))
        self.project = nn.Sequential(nn.Linear(c.feature_dim, c.projection_dim), nn.ReLU())
        self.positions = self.position_map = None
        if c.num_regions and c.positions == "learned":
            self.positions = nn.Parameter(0.1 * torch.randn(c.num_regions, c.projection_dim))  # (P, R)
        elif c.num_regions:
            side = math.isqrt(c.num_regions)
            y, x = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
            # Regions come row by row (the encoders flatten H×W so): region i sits at (x, y) = coordinates[i].
            self.register_buffer("coordinates", torch.stack([x.flatten(), y.flatten()], dim=1), persistent=False)
            self.position_map = nn.Linear(2, c.projection_dim)
        self.attention = Attention(c.projection_dim, c.hidden_dim, c.attention_dim)
        self.embed = nn.Embedding(c.vocab_size, c.embed_dim, padding_idx=0)
        self.init_h = nn.Linear(c.projection_dim, c.hidden_dim)
        is_lstm = c.kind == "lstm"
        self.init_c = nn.Linear(c.projection_dim, c.hidden_dim) if is_lstm else None
        self.gate = nn.Linear(c.hidden_dim, c.projection_dim) if is_lstm else None
        cell = nn.LSTMCell if is_lstm else nn.GRUCell
        self.cell = cell(c.embed_dim + c.projection_dim, c.hidden_dim)
        self.dropout = nn.Dropout(c.dropout)
        self.out = nn.Linear(c.hidden_dim, c.vocab_size)

    def encode(self, features: torch.Tensor):
        """Standardise and project the regions; initial state from the mean region (the paper's f_init)."""
        x = (features.float() - self.feature_mean) / self.feature_std  # (B, P, E)
        regions = self.project(x)  # (B, P, R)
        if self.config.num_regions:
            if regions.size(1) != self.config.num_regions:
                raise ConfigError(f"the decoder was trained on {self.config.num_regions} regions per image, "
                                  f"these features have {regions.size(1)}")
            where = self.positions if self.positions is not None else self.position_map(self.coordinates)  # (P, R)
            regions = regions + where  # (B, P, R)
        keys = self.attention.keys(regions)  # (B, P, A)
        mean = regions.mean(dim=1)  # (B, R)
        h = torch.tanh(self.init_h(mean))  # (B, D)
        state = (h, torch.tanh(self.init_c(mean))) if self.init_c is not None else h
        return regions, keys, state

    def step(self, tokens: torch.Tensor, state, regions: torch.Tensor, keys: torch.Tensor):
        """One word: (B,) previous tokens → (B, V) logits, new state, (B, P) attention."""
        h = state[0] if isinstance(state, tuple) else state  # (B, D)
        context, alpha = self.attention(keys, regions, h)  # (B, R), (B, P)
        if self.gate is not None:
            context = torch.sigmoid(self.gate(h)) * context  # the paper's gating scalar β, per channel
        x = torch.cat([self.embed(tokens), context], dim=1)  # (B, M + R)
        state = self.cell(x, state)
        h = state[0] if isinstance(state, tuple) else state
        return self.out(self.dropout(h)), state, alpha  # (B, V)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, image_index: torch.Tensor | None = None):
        """Teacher forcing: features (B, P, E), tokens (N, T) → logits (N, T-1, V), attention (N, T-1, P).

        Position t predicts ``tokens[:, t + 1]`` from the true ``tokens[:, t]``. ``image_index`` (N,)
        says which image each caption belongs to (default: caption i ↔ image i), so an image with
        several captions is projected once.

        Packed: the captions run longest first, and step t computes only the captions that still have
        a word to predict there (0-padded tokens are the end of a caption). A caption's positions past
        its end come back as zeros, where the padded loop computed values that every loss masks; the
        loss and its gradients are the same, at the cost of the words actually in the batch.
        """
        regions, keys, state = self.encode(features)
        if image_index is None:
            image_index = torch.arange(tokens.size(0), device=tokens.device)
        steps = (tokens[:, 1:] != 0).sum(dim=1)  # (N,) words each caption predicts
        order = steps.argsort(descending=True)  # (N,) longest first
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        rows = image_index.index_select(0, order)  # (N,) the image of each sorted caption
        regions, keys = regions.index_select(0, rows), keys.index_select(0, rows)  # (N, P, R|A)
        state = _map_state(state, lambda s: s.index_select(0, rows))
        tokens = tokens.index_select(0, order)
        active = torch.bincount(steps, minlength=tokens.size(1)).flip(0).cumsum(0).flip(0)  # active[t] = #(steps ≥ t)
        active = active[1:].tolist()  # active[t]: captions predicting at position t (one host sync per batch)
        logits, alphas, n = [], [], tokens.size(0)
        for t in range(tokens.size(1) - 1):
            m = active[t]
            if m == 0:
                break
            state = _map_state(state, lambda s: s[:m])
            step_logits, state, alpha = self.step(tokens[:m, t], state, regions[:m], keys[:m])
            logits.append(nn.functional.pad(step_logits, (0, 0, 0, n - m)))  # (N, V), zeros past the end
            alphas.append(nn.functional.pad(alpha, (0, 0, 0, n - m)))  # (N, P)
        width = tokens.size(1) - 1
        logits = torch.stack(logits, dim=1) if logits else features.new_zeros(n, 0, self.config.vocab_size)
        alphas = torch.stack(alphas, dim=1) if alphas else features.new_zeros(n, 0, regions.size(1))
        if logits.size(1) < width:  # every caption ended before the padding did
            logits = nn.functional.pad(logits, (0, 0, 0, width - logits.size(1)))
            alphas = nn.functional.pad(alphas, (0, 0, 0, width - alphas.size(1)))
        return logits.index_select(0, inverse), alphas.index_select(0, inverse)

    @torch.no_grad()
    def greedy(self, features: torch.Tensor, *, max_length: int = 20) -> Decoded:
        """Most likely word at every step, for a whole batch at once."""
        regions, keys, state = self.encode(features)
        batch = features.size(0)
        tokens = torch.full((batch,), self.config.start_id, dtype=torch.long, device=features.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=features.device)
        total = torch.zeros(batch, device=features.device)
        out_tokens, out_alpha = [], []
        for _ in range(max_length):
            logits, state, alpha = self.step(tokens, state, regions, keys)
            logp = logits.float().log_softmax(dim=1)  # (B, V)
            best, tokens = logp.max(dim=1)  # (B,), (B,)
            total += best.masked_fill(finished, 0.0)
            tokens = tokens.masked_fill(finished, 0)
            out_tokens.append(tokens)
            out_alpha.append(alpha.masked_fill(finished.unsqueeze(1), 0.0))
            finished |= tokens == self.config.end_id
            if finished.all():
                break
        return _finish(torch.stack(out_tokens, 1), total, torch.stack(out_alpha, 1), self.config.end_id)

    @torch.no_grad()
    def beam_search(self, features: torch.Tensor, *, beam_size: int = 3, max_length: int = 20,
                    attention: bool = True) -> Decoded:
        """Beam search over a whole batch at once: B images × K beams run as one (B·K) batch.

        Beams are ranked by their summed log-probability while searching; the final caption is the
        finished beam with the best mean log-probability per token (length normalisation).
        ``attention=False`` (captioning) neither gathers nor keeps the attention maps. Whether every
        beam has ended is asked of the device only every ``END_CHECK_EVERY`` steps (each ask waits for
        it): a finished beam goes on with ``<end>`` at no cost, so the extra steps change nothing.
        """
        if beam_size < 1:
            raise ValueError(f"beam size must be at least 1, got {beam_size}")
        batch, k, device = features.size(0), beam_size, features.device
        end_id = self.config.end_id
        regions, keys, state = self.encode(features)
        # Each image's tensors repeated for its K beams: (B·K, ...), beams of one image adjacent.
        regions, keys = regions.repeat_interleave(k, 0), keys.repeat_interleave(k, 0)  # (B·K, P, R|A)
        state = _map_state(state, lambda s: s.repeat_interleave(k, 0))
        tokens = torch.full((batch * k,), self.config.start_id, dtype=torch.long, device=device)
        # Only beam 0 is alive at the start, so the K beams do not all pick the same first word.
        scores = torch.full((batch, k), float("-inf"), device=device)
        scores[:, 0] = 0.0
        finished = torch.zeros(batch * k, dtype=torch.bool, device=device)
        history = torch.empty(batch * k, 0, dtype=torch.long, device=device)  # (B·K, t)
        alphas = torch.empty(batch * k, 0, regions.size(1), device=device)  # (B·K, t, P)
        offsets = (torch.arange(batch, device=device) * k).unsqueeze(1)  # (B, 1)
        for t in range(max_length):
            logits, state, alpha = self.step(tokens, state, regions, keys)
            logp = logits.float().log_softmax(dim=1)  # (B·K, V)
            # A finished beam can only continue with <end> at no cost: its score stays frozen.
            logp[finished] = float("-inf")
            logp[finished, end_id] = 0.0
            vocab = logp.size(1)
            candidates = (scores.view(-1, 1) + logp).view(batch, k * vocab)  # (B, K·V)
            scores, flat = candidates.topk(k, dim=1)  # (B, K)
            beam = (flat // vocab + offsets).view(-1)  # (B·K,) source rows
            tokens = (flat % vocab).view(-1)  # (B·K,)
            was_finished = finished[beam]
            state = _map_state(state, lambda s: s[beam])
            history = torch.cat([history[beam], tokens.masked_fill(was_finished, 0).unsqueeze(1)], dim=1)
            if attention:
                alpha = alpha[beam].masked_fill(was_finished.unsqueeze(1), 0.0)
                alphas = torch.cat([alphas[beam], alpha.unsqueeze(1)], dim=1)
            finished = was_finished | (tokens == end_id)
            if t % END_CHECK_EVERY == END_CHECK_EVERY - 1 and finished.all():
                break
        lengths = _lengths(history, end_id).view(batch, k)  # (B, K)
        mean = scores / lengths  # (B, K)
        # Prefer beams that reached <end>; among them, the best mean log-probability per token.
        ended = finished.view(batch, k)
        best = mean.masked_fill(~ended & ended.any(dim=1, keepdim=True), float("-inf")).argmax(dim=1)
        rows = best + offsets.squeeze(1)  # (B,)
        return Decoded(tokens=history[rows], scores=mean.gather(1, best.unsqueeze(1)).squeeze(1),
                       attention=alphas[rows] if attention else None, lengths=lengths.view(-1)[rows].long())


def _finish(tokens: torch.Tensor, total: torch.Tensor, alpha: torch.Tensor, end_id: int) -> Decoded:
    lengths = _lengths(tokens, end_id)
    return Decoded(tokens=tokens, scores=total / lengths, attention=alpha, lengths=lengths.long())


def _lengths(tokens: torch.Tensor, end_id: int) -> torch.Tensor:
    """Tokens up to and including the first ``<end>`` (all of them when there is none)."""
    is_end = tokens == end_id  # (N, T)
    first = torch.where(is_end.any(1), is_end.float().argmax(1) + 1, torch.full_like(is_end[:, 0], tokens.size(1), dtype=torch.long))
    return first.float()


def _map_state(state, fn):
    return tuple(fn(s) for s in state) if isinstance(state, tuple) else fn(state)
