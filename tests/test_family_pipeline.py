"""Extraction, clustering and SKD end to end with non-BERT teachers (issue 7).

A tiny random Llama run bidirectionally (LLM2Vec) and a tiny random DeBERTa-v3, both with a
Llama-style byte-level BPE tokenizer that has a BOS token, no pad token and left padding:
nothing in the pipeline may assume BERT's special tokens, padding side or parameter names.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sense_jax
from sense_jax.convert import convert

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_llama_tokenizer(out: Path, sentences: list[str], vocab_size: int = 400):
    """A byte-level BPE trained on ``sentences``; ``<s>`` prepended (as Llama 3), ``</s>`` EOS,
    no pad token, left padding. Saved to ``out``; returns the transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(sentences, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   padding_side="left")
    fast.save_pretrained(str(out))
    return fast


def _teacher(kind: str, out: Path, vocab: int):
    torch.manual_seed(0)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaModel

        model = LlamaModel(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=128))
    else:
        from transformers import DebertaV2Config, DebertaV2Model

        model = DebertaV2Model(DebertaV2Config(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128, relative_attention=True,
            pos_att_type=["p2c", "c2p"], position_buckets=8, share_att_key=True,
            norm_rel_ebd="layer_norm", position_biased_input=False, type_vocab_size=0))
    model.save_pretrained(str(out), safe_serialization=True)


@pytest.mark.parametrize("kind", ["llama", "deberta"])
def test_extract_cluster_distill_end_to_end(tmp_path, sentences, kind):
    from sense_jax.extract import extract
    from sense_jax.sense_builder import build_sense_dictionary
    from sense_jax.store import open_store
    from sense_jax import trainer as T

    hf = tmp_path / "hf"
    tok = make_llama_tokenizer(hf, sentences)
    _teacher(kind, hf, len(tok))
    assert tok.pad_token is None and tok.padding_side == "left"
    teacher_dir = convert(hf, tmp_path / "teacher",
                          config_overrides={"causal": False} if kind == "llama" else None)
    model = sense_jax.load_model(teacher_dir)
    assert model.tokenizer.pad_token == "</s>"  # EOS stands in for the missing pad token
    if kind == "llama":
        assert model.config.causal is False
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(sentences) + "\n", encoding="utf-8")

    store = open_store(extract(model, corpus, tmp_path / "store", n_per_token=8, batch_size=8,
                               progress=False))
    n = store.n_samples()
    assert n[tok.bos_token_id] == 0 and n[tok.eos_token_id] == 0  # special tokens have no entry
    ids = [tok(s)["input_ids"] for s in sentences]
    counts = np.bincount(np.concatenate(ids), minlength=len(tok))
    counts[[tok.bos_token_id, tok.eos_token_id]] = 0
    np.testing.assert_array_equal(store.occurrences, counts)
    np.testing.assert_array_equal(n, np.minimum(counts, 8))
    # A stored vector is the teacher's state at its (passage, position), run alone, unpadded.
    t = int(np.argmax(n))
    passage, position = store.token_sources(t)[0]
    one = np.asarray(ids[passage])[None]
    h = np.asarray(model.hidden_states(one, np.ones_like(one)))
    assert one[0, position] == t
    np.testing.assert_allclose(store.token_vectors(t)[0], h[0, position], atol=1e-4)

    sd = build_sense_dictionary(store, 3, seed=0, progress=False)
    k = np.asarray(sd.n_senses)
    assert ((k >= 1) == (n >= 1)).all() and (k <= np.minimum(n, 3)).all()  # duplicates may merge
    assert (k == 3).sum() > 10
    sd.save(tmp_path / "senses")

    cfg = T.load_config(None, [f"{k}={v}" for k, v in dict(
        teacher=str(teacher_dir), senses=str(tmp_path / "senses"), train_data=str(corpus),
        out_dir=str(tmp_path / "run"), progress=False, steps=2, batch_size=4, grad_accum=1,
        max_length=16, student_layers=1, warmup_steps=1, learning_rate=1e-3, save_every=2,
        keep_checkpoints=1, eval_every=2, eval_batches=1, eval_fraction=0.1).items()])
    result = T.train(cfg)
    assert int(result.state.step) == 2
    losses = [r[k] for r in result.history for k in r if "loss" in k and isinstance(r[k], float)]
    assert losses and np.isfinite(losses).all()
