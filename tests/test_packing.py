"""Packed rows (issue 15, item 2): several passages per row with segment ids, per family.

The reference is each family's unpacked forward of each passage alone (its parity with
transformers' PyTorch models is tested in test_bert.py, test_llama.py, test_deberta.py). Tiny
random configs; parameters drawn at a scale where attention is far from uniform, so that a
leak across segments or a wrong position would show.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sense_jax.batching import pack_passages, packed_batches
from sense_jax.models import count_in_segment, get_family
from sense_jax.models.bert import BertConfig, position_ids
from sense_jax.models.deberta_v2 import DebertaV2Config
from sense_jax.models.llama import LlamaConfig, position_ids_from_mask

V = 61

CONFIGS = {
    "bert": BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=48, max_position_embeddings=64, add_pooler=False),
    # RoBERTa: position ids start after padding_idx (pad id 1).
    "roberta": BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=48, max_position_embeddings=66, pad_token_id=1,
                          position_offset=2, add_pooler=False, model_type="roberta", type_vocab_size=1),
    "llama": LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, head_dim=8, pad_token_id=0),
    "llama_bidirectional": LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=48, head_dim=8,
                                       pad_token_id=0, causal=False),
    # Mistral / Qwen2 style: a sliding window shorter than the passages, biases on q/k/v.
    "mistral_window": LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=1, intermediate_size=48, head_dim=8, pad_token_id=0,
                                  sliding_windows=(4, None), qkv_bias=True, model_type="qwen2"),
    "deberta_v3": DebertaV2Config(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, head_dim=8, position_buckets=4,
                                  max_relative_positions=64),
    # v2 xlarge style: absolute positions too, token types, separate position projections, the conv.
    "deberta_v2_conv": DebertaV2Config(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=48, head_dim=8, position_buckets=4,
                                       max_relative_positions=64, position_biased_input=True,
                                       type_vocab_size=2, share_att_key=False, norm_rel_ebd_layer_norm=False,
                                       embedding_size=24, conv_kernel_size=3, conv_groups=2,
                                       max_position_embeddings=64),
}
LENGTHS = (5, 11, 3, 7, 9)   # five passages; the packer puts several in a row
ROW = 16


def _family(cfg):
    return get_family(cfg.model_type)


def _init_value(path, x):
    # The init's own vectors (norm scales 1, biases 0); matrices are all redrawn below.
    return np.ones(x.shape, np.float32) if path[-1].key == "scale" else np.zeros(x.shape, np.float32)


@functools.lru_cache(maxsize=None)
def _params(cfg, seed=0):
    # The parameter tree by shape only (eval_shape: the init is traced, never compiled).
    shapes = jax.eval_shape(_family(cfg).init_fn(cfg), jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    # Weights at 0.3 (not the init's 0.02) so that attention weights are far from uniform.
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(rng.normal(0, 0.3, x.shape) if x.ndim >= 2 else _init_value(path, x),
                                    jnp.float32), shapes)


def _passages(cfg, seed=1):
    rng = np.random.default_rng(seed)
    pad = cfg.pad_token_id or 0
    out = []
    for n in LENGTHS:
        ids = rng.integers(2, V, n)
        ids[ids == pad] = pad + 2
        out.append(ids.astype(np.int32))
    return out


def _types(passages, seed=2):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 2, len(p)).astype(np.int32) for p in passages]


@functools.lru_cache(maxsize=None)
def _forward(cfg):
    module = _family(cfg).make_module(cfg)

    def fn(params, ids, mask, tt, seg):
        return module.apply({"params": params}, ids, mask, tt, output_all_hidden_states=True,
                            **({} if seg is None else {"segment_ids": seg}))[1]
    return jax.jit(fn)


# Every forward of a config runs at one padded shape [B_PAD, T_PAD] (extra rows and columns are
# padding: mask 0, segment 0), so a family compiles two programs (with and without segment ids)
# for the whole module instead of two per test; right padding leaves the real tokens' states
# unchanged (each family's padded parity with transformers is tested in its own file).
B_PAD, T_PAD = 5, 18


def _apply(module, params, ids, mask, tt, seg=None):
    """All hidden states [L + 1, B, T, D] of the [B, T] inputs (computed at [B_PAD, T_PAD])."""
    B, T = ids.shape
    pad = module.cfg.pad_token_id or 0

    def padded(x, fill=0):
        out = np.full((B_PAD, T_PAD), fill, np.int32)
        out[:B, :T] = x
        return jnp.asarray(out)

    seg = None if seg is None else padded(seg)
    h = _forward(module.cfg)(params, padded(ids, pad), padded(mask), padded(tt), seg)
    return np.asarray(h)[:, :B, :T]


def _packed_inputs(cfg, passages, types, packed):
    pad = cfg.pad_token_id or 0
    R = len(packed.row_tokens)
    ids = np.full((R, packed.row_length), pad, np.int32)
    tt = np.zeros((R, packed.row_length), np.int32)
    for i, (r, o) in enumerate(zip(packed.row, packed.offset)):
        ids[r, o:o + len(passages[i])] = passages[i]
        tt[r, o:o + len(passages[i])] = types[i]
    return ids, (packed.segment_ids > 0).astype(np.int32), tt


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_packed_forward_equals_each_passage_alone(name):
    cfg = CONFIGS[name]
    module, params = _family(cfg).make_module(cfg), _params(cfg)
    passages = _passages(cfg)
    types = _types(passages) if getattr(cfg, "type_vocab_size", 0) > 1 else [np.zeros_like(p) for p in passages]
    packed = pack_passages([len(p) for p in passages], ROW)
    assert len(packed.row_tokens) < len(passages)  # some row holds two passages or more
    ids, mask, tt = _packed_inputs(cfg, passages, types, packed)
    got = _apply(module, params, ids, mask, tt, packed.segment_ids)
    # The unpacked forward: one passage per row, right-padded (its parity with each passage
    # alone, unpadded, is tested per family against transformers).
    pad = cfg.pad_token_id or 0
    u_ids = np.full((len(passages), ROW), pad, np.int32)
    u_mask, u_tt = np.zeros_like(u_ids), np.zeros_like(u_ids)
    for i, p in enumerate(passages):
        u_ids[i, :len(p)], u_mask[i, :len(p)], u_tt[i, :len(p)] = p, 1, types[i]
    alone = _apply(module, params, u_ids, u_mask, u_tt)
    worst = 0.0
    for i, p in enumerate(passages):
        r, o = packed.row[i], packed.offset[i]
        worst = max(worst, float(np.abs(got[:, r, o:o + len(p)] - alone[:, i, :len(p)]).max()))
    assert worst < 1e-5, (name, worst)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_no_attention_across_segments(name):
    """Changing the tokens of segment 2 leaves segments 1 and 3 unchanged, bit for bit; the same
    row without segment ids (one passage) changes everywhere, so the check has teeth."""
    cfg = CONFIGS[name]
    module, params = _family(cfg).make_module(cfg), _params(cfg)
    rng = np.random.default_rng(3)
    T = 18
    seg = np.array([[1] * 5 + [2] * 6 + [3] * 4 + [0] * 3], np.int32)
    ids = rng.integers(2, V, (1, T)).astype(np.int32)
    ids[seg == 0] = cfg.pad_token_id or 0
    mask, tt = (seg > 0).astype(np.int32), np.zeros_like(ids)
    changed = ids.copy()
    changed[seg == 2] = (changed[seg == 2] + 7) % (V - 2) + 2
    a = _apply(module, params, ids, mask, tt, seg)
    b = _apply(module, params, changed, mask, tt, seg)
    others = (seg[0] == 1) | (seg[0] == 3)
    np.testing.assert_array_equal(a[:, 0, others], b[:, 0, others])
    assert not np.array_equal(a[-1, 0, seg[0] == 2], b[-1, 0, seg[0] == 2])
    # Unpacked (one passage over the whole row), segment 1 or 3 would see the change.
    ua = _apply(module, params, ids, mask, tt)
    ub = _apply(module, params, changed, mask, tt)
    assert not np.array_equal(ua[-1, 0, others], ub[-1, 0, others])


def test_positions_restart_per_segment_by_hand():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]], jnp.int32)
    ones = jnp.ones_like(seg)
    np.testing.assert_array_equal(count_in_segment(seg, ones),
                                  [[1, 2, 3, 1, 2, 1, 1, 2], [1, 2, 3, 4, 5, 6, 7, 1]])
    bert = CONFIGS["bert"]
    ids = jnp.full(seg.shape, 5, jnp.int32)
    np.testing.assert_array_equal(position_ids(ids, bert, seg)[0, :6], [0, 1, 2, 0, 1, 0])
    # RoBERTa: non-pad tokens count from padding_idx + 1 = 2 within each segment; pad (id 1) at 1.
    rob = CONFIGS["roberta"]
    ids = jnp.asarray([[7, 7, 7, 7, 7, 7, 1, 1], [7, 7, 7, 7, 7, 7, 7, 1]], jnp.int32)
    np.testing.assert_array_equal(position_ids(ids, rob, seg), [[2, 3, 4, 2, 3, 2, 1, 1],
                                                                [2, 3, 4, 5, 6, 7, 8, 1]])
    # Llama (RoPE): cumsum(mask) - 1 within each segment, 0 at padding.
    mask = (seg > 0).astype(jnp.int32)
    np.testing.assert_array_equal(position_ids_from_mask(mask, seg), [[0, 1, 2, 0, 1, 0, 0, 0],
                                                                      [0, 1, 2, 3, 4, 5, 6, 0]])
    # Unpacked defaults unchanged.
    np.testing.assert_array_equal(position_ids_from_mask(mask)[0], [0, 1, 2, 3, 4, 5, 0, 0])


@pytest.mark.parametrize("name", ["roberta", "llama", "deberta_v2_conv"])
def test_second_segment_equals_the_passage_alone_at_position_zero(name):
    """A passage placed second in a row (after another one) gives the states it gives alone,
    where it starts at position 0; with positions not restarted it would not."""
    cfg = CONFIGS[name]
    module, params = _family(cfg).make_module(cfg), _params(cfg)
    first, second = _passages(cfg)[:2]
    ids = np.concatenate([first, second])[None]
    seg = np.array([[1] * len(first) + [2] * len(second)], np.int32)
    tt = np.zeros_like(ids)
    packed = _apply(module, params, ids, np.ones_like(ids), tt, seg)[:, 0, len(first):]
    alone = _apply(module, params, second[None], np.ones((1, len(second)), np.int32),
                   np.zeros((1, len(second)), np.int32))[:, 0]
    np.testing.assert_allclose(packed, alone, atol=1e-5, rtol=0)


# --- The packer -------------------------------------------------------------------------------

def test_packer_first_fit_decreasing_by_hand():
    # Longest first: 7 -> row 0; 6 -> row 1 (0 has 3 left); 5 -> row 2; 3 -> row 0 (fits 3);
    # 3 -> row 1 (4 left); 2 -> row 2 (5 left); 1 -> row 1 (1 left).
    p = pack_passages([3, 7, 2, 6, 1, 5, 3], 10)
    np.testing.assert_array_equal(p.row, [0, 0, 2, 1, 1, 2, 1])
    np.testing.assert_array_equal(p.offset, [7, 0, 5, 0, 9, 0, 6])
    np.testing.assert_array_equal(p.segment, [2, 1, 2, 1, 3, 1, 2])
    np.testing.assert_array_equal(p.row_tokens, [10, 10, 7])
    np.testing.assert_array_equal(p.segment_ids[2], [1] * 5 + [2] * 2 + [0] * 3)
    assert p.padding_fraction == pytest.approx(3 / 30)


def test_packer_invariants_on_random_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 65, 500)
    p = pack_passages(lengths, 64)
    seg = p.segment_ids
    # Every passage occupies exactly its run, in its row, with its segment id; no overlaps.
    assert (seg > 0).sum() == lengths.sum()
    for i in range(len(lengths)):
        run = seg[p.row[i], p.offset[i]:p.offset[i] + lengths[i]]
        assert (run == p.segment[i]).all()
    assert (p.row_tokens <= 64).all() and p.row_tokens.sum() == lengths.sum()
    # First fit: no later row holds a passage that fitted in an earlier row's final gap.
    free = 64 - p.row_tokens
    for i in range(len(lengths)):
        assert not (free[:p.row[i]] >= lengths[i]).any()
    assert p.n_rows <= int(np.ceil(11 / 9 * lengths.sum() / 64)) + 1
    # Deterministic.
    q = pack_passages(lengths, 64)
    np.testing.assert_array_equal(p.row, q.row)
    np.testing.assert_array_equal(p.offset, q.offset)


def test_packer_refuses_a_passage_longer_than_a_row():
    with pytest.raises(ValueError, match="passage 1 has 9 tokens"):
        pack_passages([3, 9], 8)


def test_packed_batches_have_one_shape_and_hold_every_sequence_once_at_its_offset():
    seqs = [[7] * 5, [3], [9] * 8, [4, 5, 6], [2] * 6, [8, 8]]  # 25 tokens, rows of 8 -> 4 rows
    batches = list(packed_batches(seqs, row_length=8, rows_per_batch=3, pad_id=-1))
    assert [b.input_ids.shape for b in batches] == [(3, 8), (3, 8)]
    assert all(b.segment_ids.shape == (3, 8) for b in batches)
    assert (batches[1].segment_ids[1:] == 0).all() and (batches[1].input_ids[1:] == -1).all()  # filler rows
    seen = []
    for b in batches:
        for i, r, o in zip(b.items, b.row, b.offset):
            n = len(seqs[i])
            assert list(b.input_ids[r, o:o + n]) == seqs[i]
            assert len(set(b.segment_ids[r, o:o + n])) == 1 and b.segment_ids[r, o] > 0
            seen.append(int(i))
        assert ((b.input_ids == -1) == (b.segment_ids == 0)).all()
        np.testing.assert_array_equal(b.attention_mask, b.segment_ids > 0)
        h = np.arange(3 * 8).reshape(3, 8)  # "states": position numbers, to check the slices
        for i, rows in b.states_of(h, [len(s) for s in seqs]):
            j = list(b.items).index(i)
            assert list(rows) == list(h[b.row[j], b.offset[j]:b.offset[j] + len(seqs[i])])
    assert sorted(seen) == list(range(len(seqs)))
    with pytest.raises(ValueError, match="passage 0 has 9 tokens; rows hold 1..8"):
        next(packed_batches([[1] * 9], row_length=8, rows_per_batch=2))
