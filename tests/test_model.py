"""capray.model: the attention decoder, teacher-forced forward, greedy and beam search."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from capray.model import Decoder, DecoderConfig

KINDS = ("gru", "lstm")
START, END = 1, 2
TINY = dict(embed_dim=16, hidden_dim=32, projection_dim=16, attention_dim=16)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread, and do not stall when other processes hold the cores."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def tiny_decoder(kind: str, *, vocab_size: int = 12, feature_dim: int = 16, seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(DecoderConfig(vocab_size=vocab_size, feature_dim=feature_dim, kind=kind, **TINY))


def random_tokens(batch: int, length: int, vocab_size: int) -> torch.Tensor:
    """<start> w.. <end>, words drawn from the non-special ids."""
    words = torch.randint(4, vocab_size, (batch, length - 2))
    return torch.cat([torch.full((batch, 1), START), words, torch.full((batch, 1), END)], dim=1)


def lively_decoder(kind: str, num_images: int = 10, max_length: int = 12):
    """A random decoder whose greedy captions differ between images and end at various steps.

    A freshly initialised decoder tends to say the same thing for every image (or end at once), which
    would make "beam 1 equals greedy" or "batched equals one at a time" trivially true. Sharpen it
    (all weights ×2, output ×4) and look for a bias on <end> that gives varied captions.
    Returns the decoder and ``num_images`` region features (B, 9, 16).
    """
    for seed in range(6):
        for end_bias in (0.0, 0.5, 1.0, 1.5, -0.5):
            decoder = tiny_decoder(kind, seed=seed).eval()
            with torch.no_grad():
                for p in decoder.parameters():
                    p.mul_(2.0)
                decoder.out.weight.mul_(2.0)
                decoder.out.bias.zero_()
                decoder.out.bias[END] = end_bias
                decoder.out.bias[[0, START]] = -1e4  # like a trained model: never <pad> or <start>
            features = torch.randn(num_images, 9, 16)
            greedy = decoder.greedy(features, max_length=max_length)
            lengths = set(greedy.lengths.tolist())
            captions = {tuple(t.tolist()) for t in greedy.tokens}
            if len(lengths) >= 4 and len(captions) >= num_images // 2 and min(lengths) < max_length:
                return decoder, features
    raise AssertionError(f"no random {kind} decoder gives varied captions: the test would be trivial")


def pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    """Right-pad dim 1 with zeros (searches stop at different steps for different batches)."""
    pad = [0, 0] * (x.dim() - 2) + [0, width - x.size(1)]
    return F.pad(x, pad)


def teacher_forced_mean_logp(decoder: Decoder, features: torch.Tensor, tokens: torch.Tensor, length: int) -> float:
    """Mean log-probability per token of ``tokens[:length]`` (``<end>`` included) given ``<start>``."""
    sequence = torch.cat([torch.tensor([START]), tokens[:length]]).unsqueeze(0)  # (1, L+1)
    with torch.no_grad():
        logits, _ = decoder(features.unsqueeze(0), sequence)  # (1, L, V)
    logp = logits.log_softmax(dim=2)[0].gather(1, sequence[0, 1:].unsqueeze(1))  # (L, 1)
    return logp.sum().item() / length


# --- config ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    dict(kind="transformer"), dict(vocab_size=0), dict(feature_dim=-1), dict(embed_dim=0),
    dict(hidden_dim=0), dict(projection_dim=0), dict(attention_dim=0), dict(dropout=1.0),
    dict(dropout=-0.1), dict(num_regions=-1),
])
def test_config_rejects_invalid_values(bad):
    args = dict(vocab_size=10, feature_dim=8) | bad
    with pytest.raises(ValueError):
        DecoderConfig(**args)


def test_config_round_trips_through_dict():
    config = DecoderConfig(vocab_size=10, feature_dim=8, kind="lstm", dropout=0.5)
    assert DecoderConfig(**config.to_dict()) == config


# --- teacher-forced forward --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("regions,channels", [(4, 8), (49, 112), (64, 2048)])
def test_forward_shapes_and_finite(kind, regions, channels):
    decoder = tiny_decoder(kind, vocab_size=20, feature_dim=channels)
    features = torch.randn(2, regions, channels)
    tokens = random_tokens(2, 7, 20)
    logits, alpha = decoder(features, tokens)
    assert logits.shape == (2, 6, 20)
    assert alpha.shape == (2, 6, regions)
    assert torch.isfinite(logits).all() and torch.isfinite(alpha).all()


@pytest.mark.parametrize("kind", KINDS)
def test_forward_attention_sums_to_one_over_regions(kind):
    decoder = tiny_decoder(kind)
    _, alpha = decoder(torch.randn(3, 9, 16), random_tokens(3, 6, 12))
    assert (alpha >= 0).all()
    torch.testing.assert_close(alpha.sum(dim=2), torch.ones(3, 5))


@pytest.mark.parametrize("kind", KINDS)
def test_forward_accepts_float16_features(kind):
    # Feature shards store float16; the decoder computes in float32 and gives the same answer.
    decoder = tiny_decoder(kind)
    features = torch.randn(2, 9, 16).half()
    tokens = random_tokens(2, 5, 12)
    logits16, _ = decoder(features, tokens)
    logits32, _ = decoder(features.float(), tokens)
    assert logits16.dtype == torch.float32
    torch.testing.assert_close(logits16, logits32)


@pytest.mark.parametrize("kind", KINDS)
def test_every_parameter_receives_a_gradient(kind):
    decoder = tiny_decoder(kind, vocab_size=20)
    tokens = random_tokens(4, 8, 20)
    logits, _ = decoder(torch.randn(4, 9, 16), tokens)
    F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:]).backward()
    params = dict(decoder.named_parameters())
    assert all(p.grad is not None for p in params.values())
    largest = max(p.grad.abs().max().item() for p in params.values())
    # relative: a parameter whose gradient is only rounding noise (~1e-10) gets no gradient
    dead = [name for name, p in params.items() if p.grad.abs().max().item() < 1e-6 * largest]
    # attention.v.bias adds the same constant to every region's score, and softmax ignores a
    # constant: its gradient is zero up to rounding, so it can never learn.
    assert dead == [], f"parameters without a gradient: {dead}"


def padded_forward(decoder: Decoder, features: torch.Tensor, tokens: torch.Tensor, image_index: torch.Tensor):
    """The textbook teacher-forced loop: every caption, every position, padding included."""
    regions, keys, state = decoder.encode(features)
    regions, keys = regions[image_index], keys[image_index]
    state = tuple(s[image_index] for s in state) if isinstance(state, tuple) else state[image_index]
    logits, alphas = [], []
    for t in range(tokens.size(1) - 1):
        step_logits, state, alpha = decoder.step(tokens[:, t], state, regions, keys)
        logits.append(step_logits)
        alphas.append(alpha)
    return torch.stack(logits, 1), torch.stack(alphas, 1)


@pytest.mark.parametrize("kind", KINDS)
def test_packed_forward_gives_the_padded_loops_loss_and_gradients(kind):
    # Captions of many lengths, several per image, in no order: the packed forward computes only the
    # words in the batch; every unmasked position, the loss and every gradient must be the padded loop's.
    decoder = tiny_decoder(kind, vocab_size=20)
    features = torch.randn(3, 9, 16)
    lengths = [7, 3, 5, 9, 4, 9, 2]
    image_index = torch.tensor([0, 2, 1, 0, 2, 1, 1])
    tokens = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for row, length in enumerate(lengths):
        tokens[row, :length] = random_tokens(1, length, 20)[0]
    targets = tokens[:, 1:]
    mask = targets != 0

    def loss_and_grads(forward):
        decoder.zero_grad()
        logits, alphas = forward(decoder, features, tokens, image_index)
        ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        coverage = (alphas * mask.unsqueeze(2)).sum(1)
        loss = (ce * mask).sum() / mask.sum() + ((1 - coverage) ** 2).sum(1).mean()
        loss.backward()
        return logits, alphas, loss.detach(), {n: p.grad.clone() for n, p in decoder.named_parameters()}

    packed = loss_and_grads(Decoder.forward)
    padded = loss_and_grads(padded_forward)
    torch.testing.assert_close(packed[0][mask], padded[0][mask])
    torch.testing.assert_close(packed[1][mask], padded[1][mask])
    assert (packed[0][~mask] == 0).all() and (packed[1][~mask] == 0).all()  # past a caption's end: nothing
    torch.testing.assert_close(packed[2], padded[2])
    for name in packed[3]:
        torch.testing.assert_close(packed[3][name], padded[3][name], msg=name)


def test_lstm_has_gate_and_cell_init_and_gru_does_not():
    gru, lstm = tiny_decoder("gru"), tiny_decoder("lstm")
    assert isinstance(gru.cell, torch.nn.GRUCell) and gru.gate is None and gru.init_c is None
    assert isinstance(lstm.cell, torch.nn.LSTMCell) and lstm.gate is not None and lstm.init_c is not None


def test_feature_standardisation_buffers_are_applied():
    # features standardised with (mean, std) must give the same logits as raw features with the
    # statistics stored in the buffers: that is what lets captioning apply what training saw.
    decoder = tiny_decoder("gru")
    raw = torch.randn(2, 9, 16) * 5 + 3
    mean, std = raw.mean(dim=(0, 1)), raw.std(dim=(0, 1))
    tokens = random_tokens(2, 5, 12)
    expected, _ = decoder((raw - mean) / std, tokens)
    decoder.feature_mean.copy_(mean)
    decoder.feature_std.copy_(std)
    got, _ = decoder(raw, tokens)
    torch.testing.assert_close(got, expected)
    assert "feature_mean" in decoder.state_dict() and "feature_std" in decoder.state_dict()


@pytest.mark.parametrize("positions,parameter", [("learned", "positions"), ("grid", "position_map.weight")])
def test_positions_tell_regions_with_the_same_features_apart(positions, parameter):
    # Two images with one object in different places: without a position per region, a permutation of
    # the regions is invisible to the decoder (attention pools a set); with one, the captions' logits differ.
    torch.manual_seed(0)
    plain = Decoder(DecoderConfig(vocab_size=12, feature_dim=16, **TINY))
    placed = Decoder(DecoderConfig(vocab_size=12, feature_dim=16, num_regions=9, positions=positions, **TINY))
    features = torch.randn(1, 9, 16)
    moved = features[:, torch.randperm(9, generator=torch.Generator().manual_seed(1))]
    tokens = random_tokens(1, 6, 12)
    with torch.no_grad():
        torch.testing.assert_close(plain(features, tokens)[0], plain(moved, tokens)[0])
        assert not torch.allclose(placed(features, tokens)[0], placed(moved, tokens)[0], atol=1e-4)
    assert parameter in placed.state_dict() and parameter not in plain.state_dict()
    loss = placed(features, tokens)[0].square().mean()
    loss.backward()
    grad = dict(placed.named_parameters())[parameter].grad
    assert grad is not None and grad.abs().sum() > 0


def test_grid_positions_are_a_linear_map_of_each_regions_place():
    # Region i of a 3×3 grid lies at row i // 3, column i % 3 (encoders flatten H×W row by row): what the
    # grid adds to a region is W·(x, y) + b, so regions of one column get the same x-part, and stepping one
    # column right adds the same vector anywhere in the image.
    decoder = Decoder(DecoderConfig(vocab_size=12, feature_dim=16, num_regions=9, positions="grid", **TINY))
    added = decoder.position_map(decoder.coordinates).detach()  # (9, R)
    grid = added.view(3, 3, -1)  # (row, column, R)
    torch.testing.assert_close(grid[:, 1] - grid[:, 0], grid[:, 2] - grid[:, 1])  # a step right, every row
    torch.testing.assert_close(grid[0, :, :] - grid[1, :, :], grid[1, :, :] - grid[2, :, :])  # a step down
    torch.testing.assert_close(grid[0, 1] - grid[0, 0], grid[2, 1] - grid[2, 0])
    assert "coordinates" not in decoder.state_dict()  # derived from num_regions, not saved
    torch.testing.assert_close(decoder.coordinates[[0, 2, 6]], torch.tensor([[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]]))


def test_grid_positions_need_a_square_grid():
    with pytest.raises(ValueError, match="square grid of regions, got 12"):
        DecoderConfig(vocab_size=12, feature_dim=16, num_regions=12, positions="grid")
    with pytest.raises(ValueError, match="positions must be one of grid, learned"):
        DecoderConfig(vocab_size=12, feature_dim=16, num_regions=9, positions="sinusoid")


@pytest.mark.parametrize("positions", ["learned", "grid"])
def test_positions_refuse_features_with_another_number_of_regions(positions):
    decoder = Decoder(DecoderConfig(vocab_size=12, feature_dim=16, num_regions=9, positions=positions, **TINY))
    with pytest.raises(ValueError, match="trained on 9 regions per image, these features have 16"):
        decoder.greedy(torch.randn(1, 16, 16), max_length=4)


def test_checkpoint_configs_from_before_position_embeddings_still_load():
    old = {k: v for k, v in DecoderConfig(vocab_size=12, feature_dim=16, **TINY).to_dict().items()
           if k not in ("num_regions", "positions")}
    decoder = Decoder(DecoderConfig(**old))
    decoder.load_state_dict(tiny_decoder("gru").state_dict())  # strict: same tensors as before
    assert decoder.positions is None and decoder.position_map is None


def test_checkpoint_configs_from_before_grid_positions_load_as_learned_embeddings():
    learned = Decoder(DecoderConfig(vocab_size=12, feature_dim=16, num_regions=9, **TINY))
    old = {k: v for k, v in learned.config.to_dict().items() if k != "positions"}  # a config saved before
    decoder = Decoder(DecoderConfig(**old))
    decoder.load_state_dict(learned.state_dict())  # strict
    assert decoder.config.positions == "learned"


# --- greedy and beam search --------------------------------------------------------------------------

@pytest.fixture(scope="module", params=KINDS)
def lively(request):
    torch.manual_seed(1234)
    return lively_decoder(request.param)


def test_beam_size_one_equals_greedy(lively):
    decoder, features = lively
    greedy = decoder.greedy(features, max_length=12)
    beam = decoder.beam_search(features, beam_size=1, max_length=12)
    assert torch.equal(beam.tokens, greedy.tokens)
    assert torch.equal(beam.lengths, greedy.lengths)
    torch.testing.assert_close(beam.scores, greedy.scores)
    torch.testing.assert_close(beam.attention, greedy.attention)


@pytest.mark.parametrize("beam_size", [3, 5])
def test_batched_beam_search_equals_one_image_at_a_time(lively, beam_size):
    decoder, features = lively
    batched = decoder.beam_search(features, beam_size=beam_size, max_length=12)
    singles = [decoder.beam_search(f.unsqueeze(0), beam_size=beam_size, max_length=12) for f in features]
    width = max([batched.tokens.size(1)] + [s.tokens.size(1) for s in singles])
    for i, single in enumerate(singles):
        assert torch.equal(pad_to(batched.tokens, width)[i], pad_to(single.tokens, width)[0]), i
        assert batched.lengths[i] == single.lengths[0]
        torch.testing.assert_close(batched.scores[i], single.scores[0])
        torch.testing.assert_close(pad_to(batched.attention, width)[i], pad_to(single.attention, width)[0])


def test_beam_search_finds_other_captions_than_greedy(lively):
    # Otherwise the beam tests above compare greedy with itself.
    decoder, features = lively
    greedy = decoder.greedy(features, max_length=12)
    beam = decoder.beam_search(features, beam_size=3, max_length=12)
    width = max(greedy.tokens.size(1), beam.tokens.size(1))
    differ = (pad_to(greedy.tokens, width) != pad_to(beam.tokens, width)).any(dim=1)
    assert differ.any()


@pytest.mark.parametrize("search", ["greedy", "beam1", "beam3", "beam5"])
def test_reported_score_is_mean_log_probability_of_the_caption(lively, search):
    decoder, features = lively
    if search == "greedy":
        out = decoder.greedy(features, max_length=12)
    else:
        out = decoder.beam_search(features, beam_size=int(search[4:]), max_length=12)
    for i in range(features.size(0)):
        expected = teacher_forced_mean_logp(decoder, features[i], out.tokens[i], int(out.lengths[i]))
        assert out.scores[i].item() == pytest.approx(expected, abs=1e-4), i


@pytest.mark.parametrize("search", ["greedy", "beam1", "beam3"])
def test_lengths_and_padding_after_end(lively, search):
    decoder, features = lively
    if search == "greedy":
        out = decoder.greedy(features, max_length=12)
    else:
        out = decoder.beam_search(features, beam_size=int(search[4:]), max_length=12)
    for tokens, length in zip(out.tokens, out.lengths.tolist()):
        ends = (tokens == END).nonzero().flatten().tolist()
        if ends:  # length counts up to and including the first <end>; nothing but 0 after it
            assert length == ends[0] + 1
            assert (tokens[length:] == 0).all()
        else:  # ran out of steps
            assert length == tokens.size(0) == 12
        assert (tokens[:length - 1] != 0).all() and (tokens[:length - 1] != END).all()


@pytest.mark.parametrize("search", ["greedy", "beam3"])
def test_search_attention_sums_to_one_until_end_then_zero(lively, search):
    decoder, features = lively
    if search == "greedy":
        out = decoder.greedy(features, max_length=12)
    else:
        out = decoder.beam_search(features, beam_size=3, max_length=12)
    assert out.attention.shape == (*out.tokens.shape, 9)
    for alpha, length in zip(out.attention, out.lengths.tolist()):
        torch.testing.assert_close(alpha[:length].sum(dim=1), torch.ones(length))
        assert (alpha[length:] == 0).all()


@pytest.mark.parametrize("search", ["greedy", "beam1", "beam3"])
@pytest.mark.parametrize("max_length", [1, 3])
def test_max_length_is_respected(lively, search, max_length):
    decoder, features = lively
    if search == "greedy":
        out = decoder.greedy(features, max_length=max_length)
    else:
        out = decoder.beam_search(features, beam_size=int(search[4:]), max_length=max_length)
    assert out.tokens.size(1) <= max_length
    assert (out.lengths <= max_length).all()
    # the lively decoder does not end every caption within 3 words, so the cap really bites
    assert out.tokens.size(1) == max_length


def test_beam_search_rejects_beam_size_zero():
    with pytest.raises(ValueError, match="beam size"):
        tiny_decoder("gru").beam_search(torch.randn(1, 9, 16), beam_size=0)


# --- learning ----------------------------------------------------------------------------------------

def _loss_floor(captions: list[list[list[int]]]) -> float:
    """The lowest achievable mean token cross-entropy when an image has several captions.

    Where an image's captions share a prefix and then diverge, the best the model can do is give
    each continuation its share of the captions with that prefix.
    """
    total, count = 0.0, 0
    for image_captions in captions:
        for caption in image_captions:
            for t in range(1, len(caption)):
                same_prefix = [c for c in image_captions if c[:t] == caption[:t]]
                same_next = [c for c in same_prefix if c[:t + 1] == caption[:t + 1]]
                total -= math.log(len(same_next) / len(same_prefix))
                count += 1
    return total / count


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_model_overfits_one_batch(kind):
    torch.manual_seed(0)
    decoder = Decoder(DecoderConfig(vocab_size=12, feature_dim=8, kind=kind, **TINY))
    features = torch.randn(4, 4, 8)
    # 4 images x 2 captions; the two captions of an image diverge after a shared or empty prefix.
    captions = [
        [[1, 4, 5, 6, 2], [1, 7, 5, 6, 2]],
        [[1, 4, 8, 9, 10, 2], [1, 4, 8, 11, 2]],
        [[1, 9, 9, 5, 2], [1, 6, 10, 2]],
        [[1, 11, 4, 7, 8, 9, 2], [1, 11, 4, 2]],
    ]
    width = max(len(c) for caps in captions for c in caps)
    tokens = torch.tensor([c + [0] * (width - len(c)) for caps in captions for c in caps])  # (8, T)
    image_features = features.repeat_interleave(2, dim=0)  # (8, P, E)
    floor = _loss_floor(captions)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    for _ in range(300):
        logits, _ = decoder(image_features, tokens)
        loss = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], ignore_index=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < floor + 0.02, (loss.item(), floor)
    decoder.eval()
    out = decoder.greedy(features, max_length=10)
    for i, caps in enumerate(captions):
        said = out.tokens[i, : int(out.lengths[i])].tolist()
        assert [START] + said in caps, (i, said)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_beam_search_without_attention_gives_the_same_captions_and_scores(lively, beam_size):
    decoder, features = lively
    kept = decoder.beam_search(features, beam_size=beam_size, max_length=12)
    dropped = decoder.beam_search(features, beam_size=beam_size, max_length=12, attention=False)
    assert dropped.attention is None and kept.attention is not None
    assert torch.equal(kept.tokens, dropped.tokens) and torch.equal(kept.lengths, dropped.lengths)
    assert torch.equal(kept.scores, dropped.scores)
